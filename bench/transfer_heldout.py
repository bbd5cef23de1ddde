#!/usr/bin/env python
"""A real out-of-domain probe with only CIFAR-10 on disk: train on five classes, probe the other five.

Not a test. Writes the two halves of CIFAR-10 as .npz sources (the format of shared/data/README.md), trains
one pass of EMP-SSL on `npz:<first five classes>` through run_stream.py with `eval.transfer:
[npz:<other five>]` (so the stream's evaluations log `transfer/cifar10_last5`), then probes the final
checkpoint and a random-init encoder of the same architecture on both halves with evaluate.py.

    STREAMING_SSL_DATA=../shared/data python bench/transfer_heldout.py --per-class 2000   # the committed result:
                                                                   # 12 min of training on 2 Zen 4 cores (bf16)
    python bench/transfer_heldout.py --per-class 200 --width 0.125 --probe-per-class 100 --runs /tmp/th \
        --out /tmp/t.json                                          # a quick check

Each setting (--per-class, --width) has its own folder under --runs (its data, run and probe results): a run
stopped part way resumes there, on the same data, and another setting never continues it.

Results: bench/results/transfer_heldout.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from streaming_ssl.atomic import atomic_write  # noqa: E402 - after the repository is on the path
FIRST, LAST = list(range(5)), list(range(5, 10))


def write_half(src: dict, classes: list[int], per_class: int | None, path: Path) -> None:
    """The images of `classes` (first `per_class` training images of each; all test images), relabelled 0..4."""
    out = {}
    for split in ("train", "test"):
        y = src[f"y_{split}"]
        keep = np.concatenate([np.flatnonzero(y == c)[: per_class if split == "train" else None] for c in classes])
        keep.sort()
        out[f"x_{split}"] = src[f"x_{split}"][keep]
        out[f"y_{split}"] = np.searchsorted(classes, y[keep]).astype(np.int64)
    out["class_names"] = src["class_names"][classes]
    atomic_write(path, lambda fh: np.savez(fh, **out))  # a kill mid-write leaves no half file for a resume to read


def evaluate(ckpt: Path, sources: list[str], random_init: bool, out: Path, log, per_class: int | None) -> dict:
    cmd = [sys.executable, "evaluate.py", "--checkpoint", str(ckpt), "--dataset", sources[0], "--transfer",
           *sources[1:], "--probe-select", "--knn", "--out", str(out)] + (["--random-init"] if random_init else [])
    if per_class:
        cmd += ["--train-per-class", str(per_class), "--test-per-class", str(per_class)]
    subprocess.run(cmd, cwd=REPO, check=True, stdout=log, stderr=subprocess.STDOUT)
    return json.loads(out.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-class", type=int, default=5000, help="training images per class of the trained half")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--probe-per-class", type=int, default=None, help="probe on fewer images (quick checks only)")
    p.add_argument("--runs", default="runs/transfer_heldout")
    p.add_argument("--out", default="bench/results/transfer_heldout.json")
    args = p.parse_args(argv)
    data = Path(os.environ.get("STREAMING_SSL_DATA", "")) / "cifar10.npz"
    if not data.is_file():
        p.error("set STREAMING_SSL_DATA to the folder holding cifar10.npz")
    runs = (REPO / args.runs).resolve() / f"per_class{args.per_class}_width{args.width:g}"
    runs.mkdir(parents=True, exist_ok=True)
    first, last = runs / "cifar10_first5.npz", runs / "cifar10_last5.npz"
    if not (first.is_file() and last.is_file()):  # written once: a resumed run checks it trains on the same data
        src = dict(np.load(data))
        write_half(src, FIRST, args.per_class, first)
        write_half(src, LAST, None, last)
    sources = [f"npz:{first}", f"npz:{last}"]
    run_dir = runs / "run"
    t0 = time.time()
    with (runs / "log.txt").open("a") as log:
        cmd = [sys.executable, "run_stream.py", "--config", "configs/accuracy/offline_1epoch.yaml",
               f"data.dataset={sources[0]}", f"eval.transfer=[{sources[1]}]", f"model.width={args.width}",
               "eval.probe_epochs=30", f"run.out_dir={run_dir}"]
        cmd.append("--resume" if (run_dir / "config.yaml").exists() else "--overwrite")
        if cmd[-1] == "--resume":
            cmd = [sys.executable, "run_stream.py", "--resume", str(run_dir)]
        subprocess.run(cmd, cwd=REPO, check=True, stdout=log, stderr=subprocess.STDOUT)
        train_seconds = time.time() - t0
        trained = evaluate(run_dir, sources, False, runs / "trained.json", log, args.probe_per_class)
        floor = evaluate(run_dir, sources, True, runs / "random_init.json", log, args.probe_per_class)
    result = {"trained_on": f"CIFAR-10 classes {FIRST} ({args.per_class} images each), one pass",
              "probed": {"in_domain": "cifar10_first5", "held_out": "cifar10_last5 (classes 5-9, never trained on)"},
              "width": args.width, "train_seconds": train_seconds, "trained": trained, "random_init": floor}
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    rows = ["| encoder | first five classes (trained on): linear / held-out decay / kNN | other five (held out): "
            "linear / held-out decay / kNN |", "| --- | --- | --- |"]
    for name, res in (("one pass on the first five classes", trained), ("random init (the floor)", floor)):
        cells = [f"{100 * e['linear']:.1f}% / {100 * e['linear_selected']['accuracy']:.1f}% / {100 * e['knn']:.1f}%"
                 for e in (res["cifar10_first5"], res["cifar10_last5"])]
        rows.append(f"| {name} | {cells[0]} | {cells[1]} |")
    out.with_suffix(".md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
