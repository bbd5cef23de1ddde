#!/usr/bin/env python
"""Probe a checkpoint: linear probe (and kNN) on frozen features, in-domain or on another dataset.

    python evaluate.py --checkpoint runs/split_cifar10/ckpt.pt
    python evaluate.py --checkpoint runs/split_cifar100 --transfer cifar10 --patches 16 --knn
    python evaluate.py --checkpoint runs/offline_cifar10/ckpt.pt --random-init   # the floor, same architecture

Features are h (the pre-feature layer), of the whole image or a bag of P patches, computed once under
inference_mode; the linear probe trains on the cached features and reports its final-epoch accuracy.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("streaming_ssl")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a ckpt_*.pt / ckpt.pt file, or a run directory (its latest)")
    p.add_argument("--dataset", help="in-domain dataset to probe (default: the one the checkpoint was trained on)")
    p.add_argument("--transfer", nargs="*", default=[], metavar="DATASET",
                   help="also probe these datasets (out-of-domain transfer), e.g. --transfer cifar100")
    p.add_argument("--no-in-domain", action="store_true", help="skip the in-domain probe (only --transfer)")
    p.add_argument("--patches", type=int, default=None,
                   help="0: whole-image features; P: bag of features over P patches (paper: 128; costs P forwards)")
    p.add_argument("--knn", action="store_true", help="also report weighted kNN accuracy (k from the config)")
    p.add_argument("--train-per-class", type=int, default=None,
                   help="fit the probe on the first N training images per class (default: all) to save time")
    p.add_argument("--test-per-class", type=int, default=None, help="score on the first N test images per class")
    p.add_argument("--probe-epochs", type=int, default=None, help="linear-probe epochs (default: the config's)")
    p.add_argument("--data-root", help="data folder (default: the config's data.root or $STREAMING_SSL_DATA)")
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"], help="where features are computed")
    p.add_argument("--random-init", action="store_true",
                   help="ignore the weights: probe a randomly initialised encoder of the same architecture (the floor)")
    p.add_argument("--probe-select", action="store_true",
                   help="also fit a probe whose weight decay is chosen on a held-out 10%% of the TRAINING images "
                        "(stratified, seeded) and refit on all of them; reported next to the default probe")
    p.add_argument("--features-cache", metavar="DIR",
                   help="keep extracted features in DIR and reuse them when checkpoint, dataset, patches, seed and "
                        "image subset match (bag-of-features extraction is the expensive part of a probe)")
    p.add_argument("--bn-recalibrate", type=int, default=None, metavar="N",
                   help="before extracting features, re-estimate the BatchNorm running statistics on N random "
                        "unlabelled training images of the probed dataset, in the form the probe reads (whole "
                        "images or plain patches); the stored ones are those of the last training batches "
                        "(default: the checkpoint config's eval.bn_recalibrate, 0 = off)")
    p.add_argument("--out", help="also write the JSON result to this file")
    return p.parse_args(argv)


def evaluate(args) -> dict:
    from run_stream import build_augment, build_model, load_splits, per_class_subset, probe_kwargs
    from streaming_ssl import checkpoint as ckpt
    from streaming_ssl.config import ConfigError, config_from_dict
    from streaming_ssl.device import resolve_device, resolve_precision
    from streaming_ssl.probe import (extract_features, knn_predict, linear_probe_accuracy, recalibrate_batchnorm,
                                     select_weight_decay)

    if args.bn_recalibrate is not None and args.bn_recalibrate < 0:
        raise ConfigError(f"--bn-recalibrate takes a number of images >= 0 (e.g. 10000), got {args.bn_recalibrate}")
    path = ckpt.resolve(args.checkpoint)
    state = ckpt.load(path)
    cfg = config_from_dict(state["config"])
    if args.bn_recalibrate is None:
        args.bn_recalibrate = cfg.eval.bn_recalibrate
    if args.data_root:
        cfg.data.root = args.data_root
    if args.device:
        cfg.train.device = args.device
    if args.probe_epochs:
        cfg.eval.probe_epochs = args.probe_epochs
    device = resolve_device(cfg.train.device)
    amp_dtype = resolve_precision(cfg.train.precision, device)
    torch.manual_seed(cfg.train.seed)
    train_splits = load_splits(cfg)
    model = build_model(cfg, train_splits.name)
    if not args.random_init:
        ckpt.check_model_matches(state, model, str(path))
        model.load_state_dict(state["model"])
    model.to(device)
    stored = {k: v.clone() for k, v in model.state_dict().items()} if args.bn_recalibrate else None
    augment = build_augment(cfg, train_splits).to(device)
    patches = cfg.eval.patches if args.patches is None else args.patches
    result = {"checkpoint": str(path), "updates": int(state["position"]["global_step"]),
              "samples_seen": int(state["position"]["samples_seen"]), "patches": patches,
              "random_init": bool(args.random_init)}
    if args.bn_recalibrate:
        result["bn_recalibrate"] = args.bn_recalibrate
    names = ([] if args.no_in_domain else [args.dataset or cfg.data.dataset]) + list(args.transfer)
    for name in names:
        splits = train_splits if name == train_splits.name else load_splits(cfg, name)
        tr = per_class_subset(splits.train, args.train_per_class)
        te = per_class_subset(splits.test, args.test_per_class)
        t0 = time.perf_counter()
        kw = dict(device=device, batch_size=cfg.eval.batch_size, patches=patches, amp_dtype=amp_dtype,
                  channels_last=False, seed=cfg.train.seed)
        key = {"checkpoint": str(path.resolve()), "updates": result["updates"], "random_init": result["random_init"],
               "dataset": name, "patches": patches, "seed": cfg.train.seed}
        pending = {"recalibrate": bool(args.bn_recalibrate)}

        def features(images, **kwargs):  # called within this iteration: splits and name are this dataset's
            if pending.pop("recalibrate", False):  # once per dataset, and only if some features are not cached
                model.load_state_dict(stored)  # statistics of this dataset only, from the stored ones each time
                recalibrate_batchnorm(model, splits.train.images, augment, n_images=args.bn_recalibrate,
                                      device=device, batch_size=cfg.eval.batch_size, patches=patches,
                                      amp_dtype=amp_dtype, seed=cfg.train.seed, progress=f"batchnorm {name}")
            return extract_features(model, images, augment, **kwargs)

        if args.bn_recalibrate:
            key["bn_recalibrate"] = args.bn_recalibrate
        ftr = cached_features(args.features_cache, {**key, "split": "train", "n": len(tr)}, features,
                              tr.images, progress=f"features {name}/train", **kw)
        fte = cached_features(args.features_cache, {**key, "split": "test", "n": len(te)}, features,
                              te.images, progress=f"features {name}/test", **kw)
        acc, _ = linear_probe_accuracy(ftr, tr.targets, fte, te.targets, splits.num_classes, seed=cfg.train.seed,
                                       **probe_kwargs(cfg))
        entry = {"linear": acc, "train_images": len(tr), "test_images": len(te),
                 "probe": {**probe_kwargs(cfg), "features": "standardised h", "reported": "final epoch"}}
        if args.probe_select:
            kwargs = probe_kwargs(cfg)
            best, scores = select_weight_decay(ftr, tr.targets, splits.num_classes, seed=cfg.train.seed, **kwargs)
            kwargs["weight_decay"] = best
            sel_acc, _ = linear_probe_accuracy(ftr, tr.targets, fte, te.targets, splits.num_classes,
                                               seed=cfg.train.seed, **kwargs)
            entry["linear_selected"] = {"accuracy": sel_acc, "weight_decay": best, "held_out_fraction": 0.1,
                                        "held_out_accuracy": {str(k): v for k, v in scores.items()}}
        if args.knn:
            pred = knn_predict(ftr, tr.targets, fte, splits.num_classes, k=cfg.eval.knn_k or 20,
                               temperature=cfg.eval.knn_temperature)
            entry["knn"] = float((pred == te.targets).float().mean())
        entry["seconds"] = time.perf_counter() - t0
        result[name] = entry
    return result


def cached_features(folder: str | None, key: dict, compute, *args, **kwargs) -> torch.Tensor:
    """compute(*args, **kwargs), or the tensor saved under `folder` for exactly this key (the key stored in the
    file is compared, the file name is not trusted)."""
    if not folder:
        return compute(*args, **kwargs)
    import hashlib

    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(folder) / f"{key['dataset']}_{key['split']}_p{key['patches']}_{digest}.pt"
    if path.exists():
        saved = torch.load(path, weights_only=True)
        if saved.get("key") == json.dumps(key, sort_keys=True):
            log.info("features from %s", path)
            return saved["features"]
    feats = compute(*args, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"key": json.dumps(key, sort_keys=True), "features": feats}, tmp)
    tmp.replace(path)
    return feats


def main(argv=None) -> int:
    from scenarios.datasets import DataError
    from streaming_ssl.checkpoint import CheckpointError
    from streaming_ssl.config import ConfigError

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        result = evaluate(args)
    except (DataError, CheckpointError, ConfigError) as err:
        log.error("%s: %s", type(err).__name__, err)
        return 2
    for name, entry in result.items():
        if isinstance(entry, dict):
            extra = f", kNN {100 * entry['knn']:.2f}%" if "knn" in entry else ""
            if "linear_selected" in entry:
                sel = entry["linear_selected"]
                extra += f", selected-decay probe {100 * sel['accuracy']:.2f}% (weight decay {sel['weight_decay']:g})"
            print(f"{name}: linear probe {100 * entry['linear']:.2f}%{extra} "
                  f"({entry['train_images']} train / {entry['test_images']} test images, patches={result['patches']}"
                  + (f", BatchNorm re-estimated on {result['bn_recalibrate']} images" if "bn_recalibrate" in result
                     else "") + ")")
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


def choose_allocator(argv=None) -> None:
    """On CPU, re-execute once with the faster allocator setting (streaming_ssl/allocator.py)."""
    from streaming_ssl import allocator

    try:
        allocator.reexec_if_needed(allocator.device_type_of(parse_args(argv).device or "auto"))
    except allocator.AllocatorError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    choose_allocator()
    sys.exit(main())
