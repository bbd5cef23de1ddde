#!/usr/bin/env python
"""Where the time of one training step goes: torch.profiler over our end-to-end step. Not a test.

    STREAMING_SSL_DATA=../shared/data .venv/bin/python bench/profile_step.py --width 0.25

Runs EMPSSLStrategy.train on an in-memory offline stream of (warmup + steps) batches of CIFAR-10 (batch
100 x 20 patches by default), profiles the measured steps on the CPU, and sorts every operator's self
time into parts: convolution, batch norm, linear (matmul), elementwise, the optimizer (LARS), the
objective (Gram, Cholesky, logdet), the augmentation, the batch gather, and the rest. Writes
bench/results/profile_w<width>.json and prints the parts and the top operators.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT / "bench"), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

# operator name fragments -> part; the first match wins, so the specific come before the general
PARTS = (
    ("objective", ("cholesky", "logdet", "linalg", "diagonal", "log_")),
    ("convolution", ("conv", "mkldnn_convolution")),
    ("batch_norm", ("batch_norm",)),
    ("linear", ("addmm", "aten::mm", "aten::bmm", "matmul", "linear")),
    ("augmentation", ("grid_sampler", "grid_sample", "affine_grid", "rgb_to", "hsv", "solarize")),
    ("elementwise", ("relu", "threshold", "add", "mul", "div", "sub", "neg", "copy_", "clone", "fill_", "zero_",
                     "where", "clamp", "sqrt", "pow", "norm", "sum", "mean", "avg_pool", "adaptive")),
)


def part_of(name: str) -> str:
    low = name.lower()
    for part, keys in PARTS:
        if any(k in low for k in keys):
            return part
    return "other"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--patches", type=int, default=20)
    p.add_argument("--steps", type=int, default=2, help="profiled steps")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--recompute-stages", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default bench/results/profile_w<width>.json)")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    import speed

    torch.set_num_threads(os.cpu_count() or 1)
    from avalanche.core import SupervisedPlugin

    from streaming_ssl import build

    sizes = speed.Sizes(batch=args.batch, patches=args.patches, steps=args.steps, warmup=args.warmup)
    splits = speed.load_cifar(None)
    cfg = speed.bench_config(args.width, sizes, "cpu", model__recompute_stages=args.recompute_stages)
    train = speed.first_n(splits.train, (args.warmup + args.steps) * args.batch)
    stream = build.stream_from_config(cfg, speed.with_train(splits, train))
    model, augment, device, amp, cl = speed.build_parts(cfg, splits)
    marks: list[float] = []
    state = {"prof": None}

    class StartProfiler(SupervisedPlugin):
        def after_training_iteration(self, strategy, **kwargs) -> None:
            marks.append(time.perf_counter())
            if len(marks) == args.warmup:  # warm-up done: start recording
                state["prof"].start()

    strategy = speed.bench_strategy(cfg, model=model, augment=augment, device=device, amp=amp, channels_last=cl,
                                    total_updates=stream.n_updates(args.batch), plugins=[StartProfiler()])
    prof = profile(activities=[ProfilerActivity.CPU], record_shapes=False)
    state["prof"] = prof
    with record_function("train"):
        strategy.train(iter(stream), eval_streams=[])
    prof.stop()
    measured = marks[-1] - marks[args.warmup - 1]
    events = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
    total_self = sum(e.self_cpu_time_total for e in events)
    parts: dict[str, float] = {}
    for e in events:
        parts[part_of(e.key)] = parts.get(part_of(e.key), 0.0) + e.self_cpu_time_total
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.top]
    result = {
        "width": args.width, "batch": args.batch, "patches": args.patches, "steps": args.steps,
        "recompute_stages": args.recompute_stages, "threads": torch.get_num_threads(), "channels_last": cl,
        "seconds_per_step": measured / args.steps,
        "note": "self CPU time of the main thread's operators (intra-op threads run inside them); shares sum to 1",
        "parts_share": {k: v / total_self for k, v in sorted(parts.items(), key=lambda kv: -kv[1])},
        "top_ops": [{"op": e.key, "self_share": e.self_cpu_time_total / total_self, "calls": e.count,
                     "part": part_of(e.key)} for e in top],
    }
    out = Path(args.out or ROOT / "bench" / "results" / f"profile_w{args.width:g}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"width {args.width:g}: {result['seconds_per_step']:.2f} s/step ({args.batch} x {args.patches} patches)")
    for k, v in result["parts_share"].items():
        print(f"  {k:<14} {100 * v:5.1f}%")
    print("top operators by self time:")
    for row in result["top_ops"]:
        print(f"  {100 * row['self_share']:5.1f}%  {row['calls']:>6}  {row['op']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
