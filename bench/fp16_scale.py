#!/usr/bin/env python
"""Where float16 training's loss scale must start: the scales at which the EMP-SSL objective's gradients overflow
float16, and the updates a stream loses to them. Not a test.

    STREAMING_SSL_DATA=../shared/data .venv/bin/python bench/fp16_scale.py --widths 0.125 1.0

With `train.precision=fp16` EMPSSLStrategy scales the loss before backward (torch.amp.GradScaler); an update whose
scaled gradients overflow is skipped and halves the scale. In a single pass a skipped update is a batch of the
stream never learned from. For each width, on the first CIFAR-10 training images cut into patches as in training:

1. `first_finite_scale`: the largest power of two, from 2^16 down, at which the first batch's gradients (float16
   autocast forward and backward, a freshly initialised model) are all finite.
2. `skipped`: EMPSSLStrategy trained `--updates` updates in float16 over the next images, once with torch's
   initial scale 2^16 and once with ours (strategy.FLOAT16_INIT_SCALE): how many updates each skipped.

On a CPU float16 is emulated (slow), but overflow is a matter of float16's range, not of the device: the scales
are the GPU's too (the same model, data and rounding of each op up to kernel order). Writes
bench/results/fp16_scale.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from scenarios.datasets import ImageData, load_dataset  # noqa: E402
from scenarios.streams import build_stream  # noqa: E402
from streaming_ssl.augment import MultiPatchAugment  # noqa: E402
from streaming_ssl.device import cpu_kind  # noqa: E402
from streaming_ssl.lars import LARS, param_groups  # noqa: E402
from streaming_ssl.models import EMPSSLModel  # noqa: E402
from streaming_ssl.objective import emp_ssl_loss  # noqa: E402
from streaming_ssl.strategy import FLOAT16_INIT_SCALE, EMPSSLStrategy  # noqa: E402


def first_finite_scale(width: float, images: torch.Tensor, n_patches: int, device: torch.device) -> int:
    """log2 of the largest power of two <= 2^16 at which the first batch's float16 gradients are all finite."""
    torch.manual_seed(0)
    model = EMPSSLModel(width=width).to(device)
    patches = MultiPatchAugment(n_patches, 32).to(device)(images.to(device),
                                                          torch.Generator(device=device).manual_seed(0))
    with torch.autocast(device.type, dtype=torch.float16):
        _, z = model(patches)
    loss, _ = emp_ssl_loss(z, n_patches)
    for k in range(16, -1, -1):
        model.zero_grad(set_to_none=True)
        (loss * 2.0 ** k).backward(retain_graph=True)
        if all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None):
            return k
    return -1


def skipped_updates(width: float, images: torch.Tensor, n_patches: int, batch: int, init_scale: float,
                    device: torch.device) -> int:
    """Updates EMPSSLStrategy skipped training `images` (batch `batch`, one experience) in float16 from init_scale."""
    torch.manual_seed(0)
    model = EMPSSLModel(width=width).to(device)
    data = ImageData(images, torch.zeros(len(images), dtype=torch.long))
    stream = build_stream(data, 1, mode="class_incremental", experience_classes=[[0]])
    strategy = EMPSSLStrategy(model=model, optimizer=LARS(param_groups(model, 1e-4), lr=0.3),
                              augment=MultiPatchAugment(n_patches, 32), batch_size=batch,
                              total_updates=stream.n_updates(batch), device=device, amp_dtype=torch.float16,
                              fp16_init_scale=init_scale)
    strategy.train(list(stream), eval_streams=[])
    return strategy.counters.skipped_updates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", type=float, nargs="+", default=[0.125, 1.0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--patches", type=int, default=8)
    p.add_argument("--updates", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(ROOT / "bench/results/fp16_scale.json"))
    args = p.parse_args()
    device = torch.device(args.device)
    train = load_dataset("cifar10", os.environ.get("STREAMING_SSL_DATA", "data")).train
    first = train.images[: args.batch]
    stream_images = train.images[args.batch: args.batch * (1 + args.updates)]
    rows = []
    for width in tqdm(args.widths, desc="widths"):
        t0 = time.perf_counter()
        row = {"width": width, "first_finite_scale": f"2^{first_finite_scale(width, first, args.patches, device)}",
               "skipped": {f"from 2^{int(math.log2(s))}": skipped_updates(
                   width, stream_images, args.patches, args.batch, s, device)
                   for s in (2.0 ** 16, FLOAT16_INIT_SCALE)}}
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_kind(),
           "torch": torch.__version__, "batch": args.batch, "patches": args.patches, "updates": args.updates,
           "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
