#!/usr/bin/env python
"""Which classes a run's buffer holds: the label-free buffers of replay and mixup, read back through the labels
of the training set. Not a test.

    STREAMING_SSL_DATA=../shared/data .venv/bin/python bench/buffer_classes.py \
        runs/acc_bf16/online_cifar10_replay runs/acc_bf16/online_cifar10_minred [--dataset cifar10]

For each run directory (its latest checkpoint) or checkpoint file: every buffer in its plugins' state (uint8
images, never labels), each image matched byte for byte to the training images of the dataset (it is one of
them: buffers only ever hold stream images), and the class histogram, the largest class share and the number of
classes with at least 10% of a uniform share; when the run's stream is split by class, also the images from each
experience's classes and the share from the experience the checkpoint is in (bench/minred_buffer.py reads the
split from the checkpoint's config). Writes bench/results/buffer_classes.json and prints a table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.minred_buffer import current_experience, experience_split  # noqa: E402
from scenarios.datasets import load_dataset  # noqa: E402
from streaming_ssl import checkpoint as ckpt  # noqa: E402
from streaming_ssl.build import per_class_subset  # noqa: E402
from streaming_ssl.config import config_from_dict  # noqa: E402


def image_buffers(state, path: str = "") -> list[tuple[str, torch.Tensor]]:
    """Every uint8 (N, C, H, W) tensor in a (nested) plugin state, with its key path."""
    if isinstance(state, dict):
        return [b for k, v in state.items() for b in image_buffers(v, f"{path}{k}/")]
    if isinstance(state, (list, tuple)):
        return [b for i, v in enumerate(state) for b in image_buffers(v, f"{path}{i}/")]
    if torch.is_tensor(state) and state.dtype == torch.uint8 and state.dim() == 4:
        return [(path.rstrip("/"), state)]
    return []


def digest(image: torch.Tensor) -> str:
    return hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest()


def class_histogram(images: torch.Tensor, index: dict[str, int], n_classes: int) -> dict:
    labels = [index.get(digest(x), -1) for x in images]
    counts = [labels.count(c) for c in range(n_classes)]
    n = max(1, len(images))
    return {"images": len(images), "unmatched": labels.count(-1), "per_class": counts,
            "largest_share": max(counts) / n, "classes_at_least_10pct_of_uniform": sum(
                c >= 0.1 * n / n_classes for c in counts)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (latest checkpoint) or checkpoint files")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data", default=None, help="data root (default: $STREAMING_SSL_DATA)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "buffer_classes.json")
    args = p.parse_args(argv)
    splits = load_dataset(args.dataset, args.data)
    index = {digest(x): int(y) for x, y in zip(splits.train.images, splits.train.targets)}
    n_classes = len(splits.class_names)
    result = {"dataset": splits.name, "class_names": splits.class_names, "runs": {}}
    for run in args.runs:
        path = ckpt.resolve(run)
        state = ckpt.load(path)
        buffers = image_buffers(state.get("plugins", {}))
        entry = {"checkpoint": str(path), "updates": state.get("position"),
                 "buffers": {key: class_histogram(images, index, n_classes) for key, images in buffers}}
        cfg = config_from_dict(state["config"], import_methods=False, saved=True)
        split = experience_split(cfg, n_classes)
        if split is not None and cfg.data.dataset == args.dataset:
            targets = per_class_subset(splits.train, cfg.data.train_per_class).targets
            cur = current_experience(split, targets, int(state["position"]["samples_seen"]), cfg.stream.epochs)
            entry.update(experience_classes=split, current_experience=cur)
            for h in entry["buffers"].values():
                h["per_experience"] = [sum(h["per_class"][c] for c in e) for e in split]
                if cur is not None and h["images"]:
                    h["share_current_experience"] = h["per_experience"][cur] / h["images"]
        result["runs"][str(run)] = entry
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    names = " ".join(f"{n[:5]:>5}" for n in splits.class_names)
    print(f"{'run / buffer':60} {names}  largest share  current experience's share")
    for run, r in result["runs"].items():
        for key, h in r["buffers"].items():
            counts = " ".join(f"{c:5d}" for c in h["per_class"])
            cur = h.get("share_current_experience")
            print(f"{(run + ' ' + key)[-60:]:60} {counts}  {h['largest_share']:.2f}  {'-' if cur is None else f'{cur:.2f}'}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
