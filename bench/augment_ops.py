#!/usr/bin/env python
"""What one augmentation call asks of the host, eager and compiled (augment.compile). Not a test.

    .venv/bin/python bench/augment_ops.py [--device cuda] [--batch 100] [--patches 20]

On a GPU every op the host dispatches is at least one kernel launch, so at small widths their number, not the
GPU, can set the pace of an update. For one call of MultiPatchAugment on a uint8 batch this counts:
  eager     the ops dispatched (a TorchDispatchMode; views included), masked path (sync_free, the GPU default)
            and indexed path (the CPU default)
  compiled  what inductor generated for the masked path: its fused loops (kernels; on CUDA each is one Triton
            launch) and the calls it left to ATen (convolutions, sort), read from the generated code
and times calls of the three (median of interleaved rounds, after warm-up; on CUDA synchronised per call).
Writes bench/results/augment_ops_<device>.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from streaming_ssl.augment import MultiPatchAugment  # noqa: E402
from streaming_ssl.device import cpu_kind, cpu_supports_bf16  # noqa: E402


class OpCounter(TorchDispatchMode):
    """Counts the ops dispatched under it (by ATen name)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def count_ops(aug: MultiPatchAugment, x: torch.Tensor) -> int:
    with OpCounter() as counter:
        aug(x, torch.Generator(device=x.device).manual_seed(0))
    return counter.n


def inductor_calls(aug: MultiPatchAugment, x: torch.Tensor) -> dict:
    """Fused loops and ATen calls of the compiled augmentation, from inductor's generated code."""
    import torch._inductor.metrics as metrics
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    metrics.reset()
    _, codes = run_and_get_code(lambda: aug(x, torch.Generator(device=x.device).manual_seed(0)))
    calls = "\n".join(code[code.index("def call("):] for code in codes if "def call(" in code)
    aten = re.findall(r"(extern_kernels\.\w+|torch\.ops\.aten\.[\w.]+)\(", calls)
    return {"graphs": len(codes), "fused_kernels": metrics.generated_kernel_count,
            "aten_calls": len(aten), "aten_call_names": sorted(set(aten))}


def time_calls(augs: dict, x: torch.Tensor, rounds: int) -> dict:
    gen = torch.Generator(device=x.device).manual_seed(1)
    times: dict = {name: [] for name in augs}
    for r in range(rounds + 2):  # two warm-up rounds
        for name, aug in augs.items():
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            aug(x, gen)
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            if r >= 2:
                times[name].append(time.perf_counter() - t0)
    return {name: {"median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t), "max_ms": 1e3 * max(t)}
            for name, t in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--patches", type=int, default=20)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    x = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0)).to(device)
    augs = {name: MultiPatchAugment(args.patches, args.size, **kw).to(device) for name, kw in
            (("eager_masked", dict(sync_free=True)), ("eager_indexed", dict(sync_free=False)),
             ("compiled", dict(compiled=True)))}
    result = {
        "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": cpu_kind(),
        "bf16_cpu": cpu_supports_bf16(),
        "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "images": args.batch, "patches_per_image": args.patches, "size": args.size,
        "eager_ops_per_call": {name: count_ops(augs[name], x) for name in ("eager_masked", "eager_indexed")},
        "compiled": inductor_calls(augs["compiled"], x),
        "ms_per_call": time_calls(augs, x, args.rounds),
    }
    t = result["ms_per_call"]
    result["eager_masked_over_compiled_time"] = t["eager_masked"]["median_ms"] / t["compiled"]["median_ms"]
    result["eager_indexed_over_compiled_time"] = t["eager_indexed"]["median_ms"] / t["compiled"]["median_ms"]
    out = args.out or ROOT / "bench" / "results" / f"augment_ops_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    raise SystemExit(main())
