#!/usr/bin/env python
"""Training throughput of one process (N threads) vs torchrun N processes (1 thread each) on CPU (gloo).

    STREAMING_SSL_DATA=/path/to/data python bench/ddp_throughput.py [--repeats 2] [--procs 2]

Runs the same short offline run (configs/offline_cifar10.yaml, shrunk by --set overrides) alternately as
one process with train.threads=PROCS and as `torchrun --nproc_per_node PROCS` with train.threads=1 per
rank, on 127.0.0.1. Throughput is read from the run's own metrics.jsonl: samples_seen divided by the
training time, time/wall_seconds - time/eval_seconds (the clock starts after data loading and model
construction, so interpreter start-up and imports are not counted). Writes bench/results/ddp_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SET = ["data.train_per_class=100", "data.test_per_class=20", "model.width=0.25", "augment.n_patches=20",
               "train.batch_size=100", "eval.probe_epochs=1", "eval.knn_k=0", "eval.patches=0",
               "train.precision=fp32", "run.tensorboard=false", "run.plot=false", "run.checkpoint_every=0"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run(kind: str, procs: int, config: str, overrides: list[str], workdir: Path, timeout: float) -> dict:
    """One launch; returns its throughput numbers (raises on failure)."""
    out_dir = workdir / f"{kind}_{time.monotonic_ns()}"
    threads = procs if kind == "single" else 1
    args = ["run_stream.py", "--config", config, f"run.out_dir={out_dir}", *overrides, f"train.threads={threads}"]
    if kind == "single":
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), *args]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS=str(threads))
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = proc.stdout.decode(errors="replace")[-3000:]
        raise RuntimeError(f"{kind} run failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    train_s = last["time/wall_seconds"] - sum(r["time/eval_seconds"] for r in rows)
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"kind": kind, "processes": 1 if kind == "single" else procs, "threads_per_process": threads,
            "samples_seen": last["samples_seen"], "updates": last["updates"], "train_seconds": train_s,
            "eval_seconds": sum(r["time/eval_seconds"] for r in rows), "process_seconds": elapsed,
            "samples_per_second": last["samples_seen"] / train_s, "loadavg_1min_before": load_before,
            "loadavg_1min_after": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=2, help="pairs of (1 process, torchrun) runs, interleaved")
    p.add_argument("--procs", type=int, default=2, help="torchrun processes (and the threads of the 1-process run)")
    p.add_argument("--config", default="configs/offline_cifar10.yaml")
    p.add_argument("--set", nargs="*", default=None, metavar="key.sub=value",
                   help=f"config overrides (default: {' '.join(DEFAULT_SET)})")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "ddp_throughput.json"))
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per launch")
    args = p.parse_args(argv)
    if not os.environ.get("STREAMING_SSL_DATA"):
        p.error("set STREAMING_SSL_DATA to the folder holding cifar10.npz")
    overrides = DEFAULT_SET if args.set is None else args.set

    runs: list[dict] = []
    ratios: list[float] = []
    with tempfile.TemporaryDirectory(prefix="ddp_throughput_") as tmp:
        for i in range(args.repeats):
            order = ("single", "ddp") if i % 2 == 0 else ("ddp", "single")  # alternate, so drift in load cancels
            pair = {}
            for kind in order:
                r = one_run(kind, args.procs, args.config, overrides, Path(tmp), args.timeout)
                r["repeat"] = i
                runs.append(r)
                pair[kind] = r
                print(f"repeat {i} {kind:6s}: {r['samples_per_second']:8.1f} samples/s "
                      f"({r['samples_seen']} samples in {r['train_seconds']:.1f} s of training, "
                      f"load {r['loadavg_1min_before']:.1f})", flush=True)
            ratios.append(pair["ddp"]["samples_per_second"] / pair["single"]["samples_per_second"])

    single = [r["samples_per_second"] for r in runs if r["kind"] == "single"]
    ddp = [r["samples_per_second"] for r in runs if r["kind"] == "ddp"]
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": args.config, "overrides": overrides, "procs": args.procs, "repeats": args.repeats,
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "single_samples_per_second": {"values": single, "median": statistics.median(single)},
        "ddp_samples_per_second": {"values": ddp, "median": statistics.median(ddp)},
        "ratio_ddp_over_single": {"per_repeat": ratios, "mean": statistics.fmean(ratios), "min": min(ratios),
                                  "max": max(ratios), "stdev": statistics.stdev(ratios) if len(ratios) > 1 else 0.0,
                                  "of_medians": statistics.median(ddp) / statistics.median(single)},
        "runs": runs,
        "note": "throughput = samples_seen / (time/wall_seconds - time/eval_seconds) of each run's metrics.jsonl; "
                "the machine may be shared: see loadavg_1min_* of each run",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    rr = result["ratio_ddp_over_single"]
    print(f"ratio {args.procs}-rank / 1-process: mean {rr['mean']:.3f} (min {rr['min']:.3f}, max {rr['max']:.3f}, "
          f"per repeat {', '.join(f'{x:.3f}' for x in ratios)}); written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
