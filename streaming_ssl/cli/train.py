"""Train EMP-SSL on a continual stream (or offline, E epochs) and evaluate after every experience.

    python run_stream.py --config configs/split_cifar10.yaml [key.sub=value ...]
    python run_stream.py --resume runs/split_cifar10          # continue a run exactly where it stopped
    python run_stream.py --config configs/split_cifar10.yaml --auto-resume   # start, or continue: for requeued jobs
    python run_stream.py --config configs/split_cifar10.yaml --auto-resume --wait-lock 120  # the predecessor may
                                                                    # still be saving: wait for it up to 120 s
    torchrun --nproc_per_node 4 run_stream.py --config configs/split_imagenet100.yaml
    streaming-ssl-train --config configs/split_cifar10.yaml   # the same, installed as a console script

A thin CLI: arguments, the config, then streaming_ssl.runner.train.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from streaming_ssl.cli import reexec_with_allocator

log = logging.getLogger("streaming_ssl")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="run_stream.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML recipe in configs/; change it to pick the dataset, stream and model")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint "
                   "(uses the config saved there; after a crash, Ctrl-C or a time limit)")
    p.add_argument("--overwrite", action="store_true", help="delete a non-empty run directory and start afresh")
    p.add_argument("--auto-resume", action="store_true",
                   help="with --config: continue the run in its run.out_dir if one is there (with the same config), "
                        "else start it; one command for a job that a scheduler may stop and requeue")
    p.add_argument("--wait-lock", type=float, default=0.0, metavar="SECONDS",
                   help="if another process is writing the run directory (a requeued job whose predecessor is still "
                        "saving), wait up to SECONDS for it to end instead of exiting 2 at once")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="override config values, e.g. train.batch_size=50 run.out_dir=runs/try2 (before, after or "
                        "between the flags)")
    return p.parse_intermixed_args(argv)


def resolve_config(args: argparse.Namespace):
    from streaming_ssl.config import ConfigError, load_config
    from streaming_ssl.runner import RunError

    if args.resume and args.overwrite:
        raise RunError(f"--resume {args.resume} continues that run and --overwrite deletes it: pass one of them (to "
                       f"start it afresh: python run_stream.py --config CONFIG run.out_dir={args.resume} --overwrite)")
    if args.resume:
        saved = Path(args.resume) / "config.yaml"
        if not saved.is_file():
            raise RunError(f"cannot resume {args.resume!r}: no config.yaml there (is it a run directory?)")
        if args.config:
            cfg = load_config(args.config, args.overrides + [f"run.out_dir={args.resume}"])
        else:  # the run is where its config.yaml is, wherever it was saved (a run directory moved or copied)
            cfg = load_config(saved, [f"run.out_dir={args.resume}", *args.overrides], saved=True)
        if Path(cfg.run.out_dir).resolve() != Path(args.resume).resolve():
            raise ConfigError(f"--resume {args.resume} but the config's run.out_dir is {cfg.run.out_dir}")
        return cfg
    if not args.config:
        raise RunError("pass --config configs/<recipe>.yaml (see configs/) or --resume RUN_DIR")
    return load_config(args.config, args.overrides)


def resumes(args: argparse.Namespace) -> bool | str:
    """Whether this command continues a run: True (--resume), or "auto" (--auto-resume: runner.train continues
    run.out_dir if it holds a run, deciding once it holds the run's lock)."""
    from streaming_ssl.runner import RunError

    if not args.auto_resume:
        return bool(args.resume)
    if args.resume or args.overwrite or not args.config:
        raise RunError("--auto-resume goes with --config alone (it resumes the config's run.out_dir when that holds a "
                       "run); drop --resume / --overwrite")
    return "auto"


def main(argv: list[str] | None = None) -> int:
    from scenarios.datasets import DataError
    from scenarios.streams import StreamError
    from streaming_ssl.checkpoint import CheckpointError
    from streaming_ssl.config import ConfigError
    from streaming_ssl.plugins import CheckpointWriteError, Interrupted
    from streaming_ssl.runlock import RunLocked
    from streaming_ssl.runner import RunError, train
    from streaming_ssl.strategy import NonFiniteLossError

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        if not args.wait_lock >= 0:
            raise RunError(f"--wait-lock {args.wait_lock}: give a number of seconds >= 0")
        cfg = resolve_config(args)
        train(cfg, resume=resumes(args), overwrite=args.overwrite, lock_wait=args.wait_lock)
    except (ConfigError, DataError, StreamError, CheckpointError, RunError, NonFiniteLossError,
            CheckpointWriteError, RunLocked) as err:
        log.error("%s: %s", type(err).__name__, err)
        return 2
    except Interrupted:
        return 130
    return 0


def choose_allocator(argv: list[str] | None = None) -> None:
    """On CPU runs, re-execute once with the faster allocator setting. A config that does not load is left
    for main() to report."""
    try:
        device = resolve_config(parse_args(argv)).train.device
    except Exception:  # noqa: BLE001 - main() reports bad input properly
        return
    reexec_with_allocator(device)


def entry() -> None:
    """Console script streaming-ssl-train."""
    choose_allocator()
    sys.exit(main())
