"""Probe a checkpoint: linear probe (and kNN) on frozen features, in-domain or on another dataset.

    python evaluate.py --checkpoint runs/split_cifar10/ckpt.pt
    python evaluate.py --checkpoint runs/split_cifar100 --transfer cifar10 --patches 16 --knn
    python evaluate.py --checkpoint runs/split_cifar10 --transfer folder:/data/svhn npz:/data/digits.npz
    python evaluate.py --checkpoint runs/offline_cifar10/ckpt.pt --random-init   # the floor, same architecture
    streaming-ssl-evaluate --checkpoint runs/split_cifar10                         # installed console script

Features are h (the pre-feature layer), of the whole image or a bag of P patches, computed once under
inference_mode; the linear probe trains on the cached features and reports its final-epoch accuracy.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from streaming_ssl.cli import reexec_with_allocator

log = logging.getLogger("streaming_ssl")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a ckpt_*.pt / ckpt.pt file, or a run directory (its latest)")
    p.add_argument("--dataset", help="in-domain dataset to probe (default: the one the checkpoint was trained on); "
                   "a built-in name, folder:PATH or npz:PATH")
    p.add_argument("--transfer", nargs="*", default=[], action="extend", metavar="DATASET",
                   help="also probe these datasets (out-of-domain transfer), e.g. --transfer cifar100 "
                        "folder:/data/svhn; repeating --transfer adds to the list. Each is reported under its short "
                        "name (the folder's name, the .npz file's stem), which must be unique")
    p.add_argument("--no-in-domain", action="store_true", help="skip the in-domain probe (only --transfer)")
    p.add_argument("--patches", type=int, default=None,
                   help="0: whole-image features; P: bag of features over P patches (paper: 128; costs P forwards); "
                        "default: the checkpoint config's eval.patches")
    p.add_argument("--knn", action="store_true", help="also report weighted kNN accuracy (k from the config)")
    p.add_argument("--train-per-class", type=int, default=None,
                   help="fit the probe on the first N training images per class (default: all) to save time")
    p.add_argument("--test-per-class", type=int, default=None, help="score on the first N test images per class")
    p.add_argument("--probe-epochs", type=int, default=None, help="linear-probe epochs (default: the config's)")
    p.add_argument("--data-root", help="data folder (default: the config's data.root or $STREAMING_SSL_DATA)")
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"],
                   help="where features are computed (default: auto, CUDA when visible, wherever the run trained)")
    p.add_argument("--random-init", action="store_true",
                   help="ignore the weights: probe a randomly initialised encoder of the same architecture (the floor)")
    p.add_argument("--probe-select", action="store_true",
                   help="also fit a probe whose weight decay is chosen on a held-out 10%% of the TRAINING images "
                        "(stratified, seeded) and refit on all of them; reported next to the default probe")
    p.add_argument("--features-cache", metavar="DIR",
                   help="keep extracted features in DIR and reuse them when checkpoint, dataset, patches, seed and "
                        "image subset match, and with patches or --bn-recalibrate the batch size (bag-of-features "
                        "extraction is the expensive part of a probe)")
    p.add_argument("--bn-recalibrate", type=int, default=None, metavar="N",
                   help="before extracting features, re-estimate the BatchNorm running statistics on N random "
                        "unlabelled training images of the probed dataset, in the form the probe reads (whole "
                        "images or plain patches); the stored ones are those of the last training batches "
                        "(default: the checkpoint config's eval.bn_recalibrate, 0 = off)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="images per feature-extraction batch (default: the checkpoint config's eval.batch_size); "
                        "lower it where the device runs out of memory. Whole-image features do not depend on it; "
                        "with --patches or --bn-recalibrate the patches and images drawn do (seeded per batch)")
    p.add_argument("--out", help="also write the JSON result to this file (its folder must exist)")
    return p.parse_args(argv)  # no positional arguments: nothing to intermix


def check_out(out: str | None) -> None:
    """Refuse an --out the result could not be written to, before probing: its folder must exist (a missing one is
    more likely a typo than a wish) and be writable, and the path must not be a folder."""
    from streaming_ssl.config import ConfigError

    if not out:
        return
    path = Path(out).expanduser().absolute()
    if path.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file path, e.g. --out {Path(out) / 'result.json'}")
    if not path.parent.is_dir():
        raise ConfigError(f"--out {out}: the folder {path.parent} does not exist; create it (mkdir -p {path.parent}) "
                          f"or correct the path")
    if not os.access(path.parent, os.W_OK):
        raise ConfigError(f"--out {out}: the folder {path.parent} is not writable; choose a folder you can write in")


def request_from_args(args: argparse.Namespace):
    from streaming_ssl.probe_run import ProbeRequest

    return ProbeRequest(checkpoint=args.checkpoint, datasets=[args.dataset] if args.dataset else [],
                        transfer=list(args.transfer), in_domain=not args.no_in_domain, patches=args.patches,
                        knn=args.knn, train_per_class=args.train_per_class, test_per_class=args.test_per_class,
                        probe_epochs=args.probe_epochs, data_root=args.data_root, device=args.device,
                        random_init=args.random_init, probe_select=args.probe_select,
                        features_cache=args.features_cache, bn_recalibrate=args.bn_recalibrate,
                        batch_size=args.batch_size)


def describe(name: str, entry: dict, result: dict) -> str:
    """One line per probed dataset."""
    extra = f", kNN {100 * entry['knn']:.2f}%" if "knn" in entry else ""
    if "linear_selected" in entry:
        sel = entry["linear_selected"]
        extra += f", selected-decay probe {100 * sel['accuracy']:.2f}% (weight decay {sel['weight_decay']:g})"
    recal = (f", BatchNorm re-estimated on {result['bn_recalibrate']} images" if "bn_recalibrate" in result else "")
    return (f"{name}: linear probe {100 * entry['linear']:.2f}%{extra} ({entry['train_images']} train / "
            f"{entry['test_images']} test images, patches={result['patches']}{recal})")


def main(argv=None) -> int:
    from scenarios.datasets import DataError
    from streaming_ssl.atomic import atomic_write_text
    from streaming_ssl.checkpoint import CheckpointError
    from streaming_ssl.config import ConfigError
    from streaming_ssl.probe_run import ProbeOutOfMemory, probe_checkpoint

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        check_out(args.out)
        if args.no_in_domain and not args.transfer:
            raise ConfigError("--no-in-domain without --transfer leaves nothing to probe: add --transfer DATASET "
                              "(e.g. --transfer cifar100 folder:/data/svhn), or drop --no-in-domain")
        result = probe_checkpoint(request_from_args(args))
    except (DataError, CheckpointError, ConfigError, ProbeOutOfMemory) as err:
        log.error("%s: %s", type(err).__name__, err)
        return 2
    for name, entry in result.items():
        if isinstance(entry, dict):
            print(describe(name, entry, result))
    print(json.dumps(result))
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=2))
    return 0


def entry() -> None:
    """Console script streaming-ssl-evaluate."""
    reexec_with_allocator(parse_args().device or "auto")
    sys.exit(main())
