"""Compare finished runs: a table of each group's mean ± std over seeds, and accuracy against its compute.

    python compare_runs.py runs/split_cifar10 runs/split_cifar10@seed1 runs/split_cifar10_replay
    python compare_runs.py runs/sweep --out runs/sweep_compared     # every run in a folder; writes
                                                                    # compare.md, compare.json, compare.png
    streaming-ssl-compare runs/sweep                                # installed console script

Runs whose configs differ only in train.seed (and in settings that do not change what is learned) are one group.
See streaming_ssl/compare.py for how every figure is computed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("streaming_ssl")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="compare_runs.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories, or folders of run directories")
    p.add_argument("--out", metavar="DIR", help="also write compare.md, compare.json and compare.png into DIR "
                                                "(created if missing)")
    p.add_argument("--allow-mixed", action="store_true",
                   help="list runs measured on different test sets (datasets, image sizes, test subsets) together")
    p.add_argument("--allow-same-seed", action="store_true",
                   help="average runs that learn with the same config and seed (e.g. one seed on two devices) as if "
                        "they were two seeds; without it they are refused as a copy of one run")
    p.add_argument("--include-incomplete", action="store_true",
                   help="include runs that have not finished (their last evaluation stands for the run)")
    p.add_argument("--title", default="", help="the plot's title")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from streaming_ssl.atomic import atomic_write_text
    from streaming_ssl.compare import (CompareError, code_warning, machines_warning, markdown_table, plot_compare,
                                       summarize)

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        out = Path(args.out) if args.out else None
        if out is not None and (out / "config.yaml").is_file():
            raise CompareError(f"--out {args.out} is a run directory; give another folder to write into")
        summary = summarize(args.runs, allow_mixed=args.allow_mixed, include_incomplete=args.include_incomplete,
                            allow_same_seed=args.allow_same_seed)
        if out is not None:
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise CompareError(f"--out {args.out}: cannot make that folder ({err.strerror}: a file is in the way, "
                                   "or no permission); give a folder to write into") from None
    except CompareError as err:
        log.error("%s", err)
        return 2
    for left in summary["left_out"]:
        log.warning("left out %s: %s", left["run"], left["why"])
    for problem in summary["record_problems"]:
        log.warning("%s: where that run trained is taken as not recorded", problem)
    if warning := machines_warning(summary):
        log.warning("%s (%s; under the table, each group's)", warning, "; ".join(summary["machines"]))
    if warning := code_warning(summary):
        log.warning("%s (under the table, each run's)", warning)
    table = markdown_table(summary)
    print(table, end="")
    if out is not None:
        atomic_write_text(out / "compare.md", table)
        atomic_write_text(out / "compare.json", json.dumps(summary, indent=2, allow_nan=False))
        plot_compare(summary, out / "compare.png", title=args.title)
        log.info("wrote %s, %s and %s", out / "compare.md", out / "compare.json", out / "compare.png")
    return 0


def entry() -> None:
    """Console script streaming-ssl-compare."""
    sys.exit(main())
