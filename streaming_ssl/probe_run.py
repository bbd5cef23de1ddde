"""Probe a checkpoint: linear probe (and kNN) on frozen features, in-domain or on other datasets.

The library behind evaluate.py. The checkpoint's own config rebuilds the model and augmentation
(build.py); the explicit arguments say what to probe and how.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scenarios.datasets import DataError, check_dataset_name, dataset_spec
from scenarios.sources import is_generic, parse_source, short_name
from streaming_ssl import build
from streaming_ssl import checkpoint as ckpt
from streaming_ssl import oom, provenance
from streaming_ssl.config import ConfigError, config_from_dict
from streaming_ssl.device import resolve_device, resolve_precision
from streaming_ssl.features_cache import cached_features, data_fingerprint
from streaming_ssl.probe import (extract_features, knn_predict, linear_probe_accuracy, recalibrate_batchnorm,
                                 select_weight_decay)

log = logging.getLogger(__name__)

# the result's own fields: a probed dataset's entry sits beside them under its short name, which must differ
RESULT_FIELDS = ("checkpoint", "updates", "samples_seen", "patches", "random_init", "bn_recalibrate", "probed_on",
                 "trained_on")
IN_DOMAIN = "the checkpoint's data.dataset"  # names the in-domain dataset in messages when --dataset is not given


class ProbeOutOfMemory(RuntimeError):
    """The device ran out of memory while probing; the message names the --batch-size that holds less."""


@dataclass
class ProbeRequest:
    """What to probe. None means the checkpoint config's value, except for `train_per_class` / `test_per_class`,
    where it means every image of the split."""

    checkpoint: str
    datasets: list[str] = field(default_factory=list)  # empty: the dataset the checkpoint was trained on
    transfer: list[str] = field(default_factory=list)
    in_domain: bool = True
    patches: int | None = None
    knn: bool = False
    train_per_class: int | None = None
    test_per_class: int | None = None
    probe_epochs: int | None = None
    data_root: str | None = None
    device: str | None = None
    random_init: bool = False
    probe_select: bool = False
    features_cache: str | None = None
    bn_recalibrate: int | None = None
    batch_size: int | None = None  # images per feature-extraction batch


@dataclass
class CheckpointModel:
    """A checkpoint's model rebuilt by its own config (load_checkpoint_model)."""

    path: Path
    state: dict
    cfg: object  # streaming_ssl.config.Config, with the data root and device asked for
    # scenarios.datasets.DatasetSplits of the run's dataset (whole, no per-class slice); None when not loaded
    train_splits: object
    model: torch.nn.Module  # on `device`, in train mode
    augment: object  # streaming_ssl.augment.MultiPatchAugment on `device`
    device: torch.device
    amp_dtype: torch.dtype | None
    data: build.TrainingData  # what the model and augment were built with: the run's, as trained


def load_checkpoint_model(checkpoint: str | Path, *, data_root: str | None = None, device: str | None = None,
                          random_init: bool = False, loaded: tuple[Path, dict] | None = None,
                          need_data: bool = True, device_setting: str = "device") -> CheckpointModel:
    """The model and augmentation of a checkpoint file or run directory (its newest checkpoint).

    The checkpoint's config builds them; its weights are loaded (weights_only) unless `random_init`, which keeps
    the seeded initialisation of the same architecture (the floor). `data_root` overrides the config's (None: the
    config's); `device` is where it runs (None: CUDA when visible, else the CPU, wherever the run trained). The run's
    precision is kept, except that an fp16 run probed on a CPU runs in precision auto there. `loaded`: the
    (file, state) that checkpoint.load_latest(checkpoint) returned, when the caller has read it already.
    `device_setting`: what an error about `device` calls it (the caller's argument, or a flag such as "--device").

    The training data's image size and normalisation come from the checkpoint (`state["data"]`): with `need_data`
    False the training data is not loaded at all (train_splits None); loaded, a difference from the checkpoint's
    (a generic source changed since the run) is logged and the checkpoint's kept. Checkpoints written before it
    was saved take them from the loaded data.
    """
    path, state = loaded or ckpt.load_latest(checkpoint)
    if not state.get("config"):  # a CheckpointPlugin(config={}) of a run built by hand: no default may stand in
        raise ckpt.CheckpointError(
            f"checkpoint {path} was saved without a config (a run built from Python whose CheckpointPlugin got "
            "config={}), so the model cannot be rebuilt from it: load its weights with "
            "load_checkpoint(path)['model'] into the EMPSSLModel(...) you trained, or save the run's Config "
            "(config=cfg.to_dict()) with its checkpoints")
    cfg = config_from_dict(state["config"], import_methods=False, saved=True)
    cfg.data.root = data_root or cfg.data.root
    cfg.train.device = device or "auto"
    dev = resolve_device(cfg.train.device, setting=device_setting)
    precision = cfg.train.precision
    if precision == "fp16" and dev.type == "cpu":  # float16 is emulated on most CPUs (many times slower)
        log.info("the run trained in fp16 (for GPUs without bf16); on the CPU its features are computed in precision "
                 "auto (bf16 where native, else float32)")
        precision = "auto"
    amp_dtype = resolve_precision(precision, dev)
    torch.manual_seed(cfg.train.seed)
    data = build.TrainingData.from_state(state["data"]) if state.get("data") else None
    train_splits = build.load_splits(cfg) if need_data or data is None else None
    if train_splits is not None:
        now = build.TrainingData.of(train_splits)
        if data is not None and now != data:
            log.warning("the training data %s is not what the run trained on (image size %d, mean %s, std %s now; "
                        "%d, %s, %s in the checkpoint): the model and its probes normalise as in training",
                        cfg.data.dataset, now.image_size, now.mean, now.std, data.image_size, data.mean, data.std)
        data = data or now
    model = build.build_model(cfg, build.model_stem(cfg, data))
    if not random_init:
        ckpt.check_model_matches(state, model, str(path))
        model.load_state_dict(state["model"])
    model.to(dev)
    augment = build.build_augment(cfg, data).to(dev)
    return CheckpointModel(path, state, cfg, train_splits, model, augment, dev, amp_dtype, data)


def check_request(req: ProbeRequest) -> None:
    """Refuse a request that cannot be probed (impossible numbers, unknown dataset names, missing folder: or npz:
    sources) before any checkpoint or data is read; the message names the argument and the fix."""
    for flag, value, least, what, hint in (
            ("--patches", req.patches, 0, "patches", "0: whole-image features; e.g. 16 for a bag of 16 patches"),
            ("--train-per-class", req.train_per_class, 1, "images per class", "e.g. 100; leave it out to use all"),
            ("--test-per-class", req.test_per_class, 1, "images per class", "e.g. 100; leave it out to use all"),
            ("--probe-epochs", req.probe_epochs, 1, "epochs",
             "e.g. 30; leave it out for the checkpoint config's eval.probe_epochs"),
            ("--bn-recalibrate", req.bn_recalibrate, 0, "images", "e.g. 10000"),
            ("--batch-size", req.batch_size, 1, "images", "e.g. 64")):
        if value is not None and value < least:
            raise ConfigError(f"{flag} takes a number of {what} >= {least} ({hint}), got {value}")
    for flag, name in [("--dataset", n) for n in req.datasets] + [("--transfer", n) for n in req.transfer]:
        try:
            check_dataset_name(name, key=flag)
        except DataError as err:
            raise ConfigError(str(err)) from None
        if is_generic(name):
            ref = parse_source(name)
            if not (ref.path.is_dir() if ref.kind == "folder" else ref.path.is_file()):
                what = "is not a folder" if ref.kind == "folder" else "is not a file"
                what = what if ref.path.exists() else "does not exist"
                layout = ("an image folder (PATH/train/<class>/ and PATH/test/<class>/), e.g. folder:/data/svhn"
                          if ref.kind == "folder" else "an .npz file (x_train, y_train, x_test, y_test), e.g. "
                          "npz:/data/digits.npz")
                raise ConfigError(f"{flag} {name}: {ref.path} {what}; give the path of {layout}")


def check_result_names(named: list[tuple[str, str]]) -> None:
    """Refuse datasets whose results would overwrite each other's or the result's own fields.

    `named`: (what names it, e.g. "--transfer", spelling) in probe order.
    """
    seen: dict[str, tuple[str, str]] = {}
    for flag, name in named:
        short = short_name(name)
        if short in RESULT_FIELDS:
            raise ConfigError(f"{flag} {name} would be reported as {short!r}, a field of the result itself "
                              f"({', '.join(RESULT_FIELDS)}); rename the folder or file (e.g. to {short}_data)")
        if short in seen:
            first_flag, first = seen[short]
            drop = ("drop it from --transfer (it is probed in-domain already)" if first_flag == IN_DOMAIN
                    else "drop the duplicate")
            raise ConfigError(f"{first_flag} {first} and {flag} {name} would both be reported as {short!r}, one "
                              f"result replacing the other; {drop}, or rename one folder or .npz file")
        seen[short] = (flag, name)


def probe_checkpoint(req: ProbeRequest) -> dict:
    """Probe every requested dataset with the checkpoint's encoder; one result entry per dataset, under its short
    name (short_name), beside the result's own fields (RESULT_FIELDS).

    Every argument, dataset name and generic source path is checked before the checkpoint's data is loaded.
    """
    check_request(req)
    path, state = ckpt.load_latest(req.checkpoint)
    trained_on = config_from_dict(state["config"], import_methods=False, saved=True).data.dataset
    in_domain = req.datasets or [trained_on]
    named = [("--dataset" if req.datasets else IN_DOMAIN, n) for n in in_domain] if req.in_domain else []
    named += [("--transfer", n) for n in req.transfer]
    check_result_names(named)
    try:
        run = load_checkpoint_model(req.checkpoint, data_root=req.data_root, device=req.device,
                                    random_init=req.random_init, loaded=(path, state),
                                    need_data=any(name == trained_on for _, name in named), device_setting="--device")
    except DataError as err:  # the run's own data: a folder: or npz: source may have moved since it trained
        ref = parse_source(trained_on) if is_generic(trained_on) else None
        if ref is None or ref.path.exists():
            raise
        fix = (f"if it moved, pass --dataset {ref.kind}:NEWPATH; to probe other datasets only, pass --no-in-domain "
               "--transfer DATASET" if state.get("data") else
               f"put it back at {ref.path}: this checkpoint is older than the image size and normalisation kept in "
               "checkpoints, so its model is rebuilt from that data")
        raise DataError(f"{err} The run trained on {trained_on} (its data.dataset), which is gone: {fix}.") from None
    path, state, cfg, train_splits = run.path, run.state, run.cfg, run.train_splits
    n_recal = cfg.eval.bn_recalibrate if req.bn_recalibrate is None else req.bn_recalibrate
    cfg.eval.batch_size = cfg.eval.batch_size if req.batch_size is None else req.batch_size
    cfg.eval.probe_epochs = cfg.eval.probe_epochs if req.probe_epochs is None else req.probe_epochs
    patches = cfg.eval.patches if req.patches is None else req.patches
    result = {"checkpoint": str(path), "updates": int(state["position"]["global_step"]),
              "samples_seen": int(state["position"]["samples_seen"]), "patches": patches,
              "random_init": bool(req.random_init)}
    result.update(machines(path.parent, run.device, run.amp_dtype, None if req.random_init else result["updates"]))
    if n_recal:
        result["bn_recalibrate"] = n_recal
    prober = _Prober(cfg, req, run.model, run.augment, run.device, run.amp_dtype, patches, n_recal, path, result)
    try:
        for _, name in named:
            splits = train_splits if name == cfg.data.dataset else build.load_splits(
                cfg, name, image_size=run.data.image_size if is_generic(name) else None)
            result[splits.name] = prober.probe(name, splits)
    except RuntimeError as err:  # torch.OutOfMemoryError is one
        if not oom.is_out_of_memory(err):
            raise
        raise ProbeOutOfMemory(oom.probe_out_of_memory_message(
            err, device=oom.device_memory(run.device), checkpoint=str(path), batch_size=cfg.eval.batch_size,
            patches=patches)) from err
    return result


def machines(run_dir: Path, device: torch.device, amp_dtype: torch.dtype | None, updates: int | None) -> dict:
    """{"probed_on": this machine and precision, "trained_on": where the checkpoint's `updates` updates trained,
    from its run's run_info.jsonl ([] where it has none; ["unreadable: ..."] where it cannot be read)}
    (provenance.py); without `updates` (a random-init encoder) probed_on alone."""
    out = {"probed_on": provenance.label({"machine": provenance.device_kind(device),
                                          "precision": provenance.precision_name(amp_dtype)})}
    if updates is not None:
        try:
            out["trained_on"] = provenance.machine_labels(provenance.read_rows(run_dir), before_update=updates)
        except provenance.ProvenanceError as err:
            out["trained_on"] = [f"unreadable: {err}"]
    return out


class _Prober:
    """Features (cached, BatchNorm re-estimated if asked) and probes of one dataset at a time."""

    def __init__(self, cfg, req: ProbeRequest, model, augment, device, amp_dtype, patches: int, n_recal: int,
                 path: Path, result: dict) -> None:
        self.cfg, self.req, self.model, self.augment = cfg, req, model, augment
        self.device, self.amp_dtype, self.patches, self.n_recal = device, amp_dtype, patches, n_recal
        self.channels_last = build.uses_channels_last(cfg, device)
        self.stored = {k: v.clone() for k, v in model.state_dict().items()} if n_recal else None
        self.key = {"checkpoint": str(path.resolve()), "updates": result["updates"],
                    "random_init": result["random_init"], "patches": patches, "seed": cfg.train.seed,
                    "precision": str(amp_dtype or "fp32"),  # bf16 features differ from fp32 ones by a few %
                    "normalise": [list(map(float, augment.mean.flatten())), list(map(float, augment.std.flatten()))],
                    "size": augment.out_size,  # the training data's, as the checkpoint keeps them
                    "channels_last": self.channels_last}
        if n_recal:
            self.key["bn_recalibrate"] = n_recal
        if patches or n_recal:  # their patches and images are drawn per batch
            self.key["batch_size"] = cfg.eval.batch_size
        if req.features_cache:  # the weights themselves: a run redone with --overwrite writes the same file names
            self.key["weights"] = data_fingerprint(*model.state_dict().values())

    def _features_of(self, name: str, splits):
        pending = {"recalibrate": bool(self.n_recal)}

        def features(images, **kwargs):
            if pending.pop("recalibrate", False):  # once per dataset, and only if some features are not cached
                self.model.load_state_dict(self.stored)  # this dataset's statistics, from the stored ones each time
                recalibrate_batchnorm(self.model, splits.train.images, self.augment, n_images=self.n_recal,
                                      device=self.device, batch_size=self.cfg.eval.batch_size, patches=self.patches,
                                      amp_dtype=self.amp_dtype, seed=self.cfg.train.seed, progress=f"batchnorm {name}")
            return extract_features(self.model, images, self.augment, **kwargs)
        return features

    def probe(self, name: str, splits) -> dict:
        cfg, req = self.cfg, self.req
        tr = build.per_class_subset(splits.train, req.train_per_class)
        te = build.per_class_subset(splits.test, req.test_per_class)
        t0 = time.perf_counter()
        # the memory layout the run's own evaluations used: under bf16 it changes features by up to ~0.06
        kw = dict(device=self.device, batch_size=cfg.eval.batch_size, patches=self.patches, amp_dtype=self.amp_dtype,
                  channels_last=self.channels_last, seed=cfg.train.seed)
        key = {**self.key, "dataset": splits.name, "source": _source(name)}
        if req.features_cache:  # the data itself: a source rewritten in place (same name and counts) is recomputed
            key["data"] = data_fingerprint(splits.train.images, splits.train.targets, splits.test.images,
                                           splits.test.targets)
        features = self._features_of(name, splits)
        ftr = cached_features(req.features_cache, {**key, "split": "train", "n": len(tr)}, features, tr.images,
                              progress=f"features {splits.name}/train", **kw)
        fte = cached_features(req.features_cache, {**key, "split": "test", "n": len(te)}, features, te.images,
                              progress=f"features {splits.name}/test", **kw)
        pk = build.probe_kwargs(cfg)
        acc, _ = linear_probe_accuracy(ftr, tr.targets, fte, te.targets, splits.num_classes, seed=cfg.train.seed, **pk)
        entry = {"linear": acc, "train_images": len(tr), "test_images": len(te),
                 "probe": {**pk, "features": "standardised h", "reported": "final epoch"}}
        if req.probe_select:
            best, scores = select_weight_decay(ftr, tr.targets, splits.num_classes, seed=cfg.train.seed, **pk)
            sel_acc, _ = linear_probe_accuracy(ftr, tr.targets, fte, te.targets, splits.num_classes,
                                               seed=cfg.train.seed, **{**pk, "weight_decay": best})
            entry["linear_selected"] = {"accuracy": sel_acc, "weight_decay": best, "held_out_fraction": 0.1,
                                        "held_out_accuracy": {str(k): v for k, v in scores.items()}}
        if req.knn:
            pred = knn_predict(ftr, tr.targets, fte, splits.num_classes, k=cfg.eval.knn_k or 20,
                               temperature=cfg.eval.knn_temperature)
            entry["knn"] = float((pred == te.targets).float().mean())
        entry["seconds"] = time.perf_counter() - t0
        return entry


def _source(name: str) -> str:
    """Where a dataset comes from, for the features cache: a built-in's registry name; a generic source's kind and
    resolved path (symbolic links followed)."""
    if not is_generic(name):
        return dataset_spec(name).name
    ref = parse_source(name)
    return f"{ref.kind}:{ref.path.resolve()}"
