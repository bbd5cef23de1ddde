"""The one adapter from a Config to the objects of a run.

The CLIs (streaming_ssl/cli/), bench/ and examples call these builders; nothing else reads a Config.
Each builder takes the config and what it builds on, and returns a plain library object: datasets
and probe sets, stream, model (stem from the dataset registry), augmentation, optimizer, evaluator,
loggers, plugins, strategy. `build_run` assembles all of them for one training run.
"""

from __future__ import annotations

import logging
import os
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from scenarios.datasets import DatasetSplits, ImageData, dataset_spec, load_dataset, stem_for_size
from scenarios.sources import is_generic
from scenarios.streams import SSLStream, build_stream
from streaming_ssl import distributed as ddp
from streaming_ssl.augment import MultiPatchAugment
from streaming_ssl.config import Config, ConfigError
from streaming_ssl.device import resolve_device, resolve_precision
from streaming_ssl.evaluation import ProbeMetric, ProbeSet, StreamEvaluator
from streaming_ssl.features_cache import data_fingerprint
from streaming_ssl.lars import LARS, param_groups
from streaming_ssl.models import EMPSSLModel
from streaming_ssl.strategy import EMPSSLStrategy

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ runtime
def setup_runtime(cfg: Config) -> tuple[torch.device, torch.dtype | None]:
    """Threads, determinism, seeds, device, precision, process group. Returns (device, amp_dtype).

    train.deterministic sets CUBLAS_WORKSPACE_CONFIG, which PyTorch reads once, at the process's first cuBLAS call:
    call this before anything runs on a CUDA device (the CLIs do), or set the variable before the process starts.
    """
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    _, local_rank, _ = ddp.env_world()
    device = resolve_device(t.device, local_rank)
    ddp.init_from_env(device.type)
    if device.type == "cuda":
        # fixed shapes: pick the fastest convolution kernels once. Not when deterministic: the pick is timed, so a
        # resumed process may choose other kernels than the run it continues, and sum in another order.
        torch.backends.cudnn.benchmark = not t.deterministic
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    np.random.seed(t.seed % 2**32)
    return device, resolve_precision(t.precision, device)


# ------------------------------------------------------------------------------------------ data
def per_class_subset(data: ImageData, per_class: int | None) -> ImageData:
    """The first `per_class` samples of every class (all when None), in the original order."""
    if per_class is None:
        return data
    keep = torch.zeros(len(data.targets), dtype=torch.bool)
    for c in data.targets.unique():
        keep[(data.targets == c).nonzero().flatten()[:per_class]] = True
    return data.subset(keep.nonzero().flatten())


def load_splits(cfg: Config, name: str | None = None, *, image_size: int | None = None) -> DatasetSplits:
    """The train/test splits of `name` (default: the run's dataset), from cfg.data.root."""
    return load_dataset(name or cfg.data.dataset, cfg.data.root, download=cfg.data.download,
                        image_size=image_size or (cfg.data.image_size if name is None else None))


def load_train_data(cfg: Config) -> DatasetSplits:
    """The run's dataset with cfg.data.train_per_class / test_per_class applied."""
    splits = load_splits(cfg)
    splits.train = per_class_subset(splits.train, cfg.data.train_per_class)
    splits.test = per_class_subset(splits.test, cfg.data.test_per_class)
    return splits


def stream_from_config(cfg: Config, splits: DatasetSplits) -> SSLStream:
    s = cfg.stream
    return build_stream(splits.train, splits.num_classes, mode=s.mode, n_experiences=s.n_experiences,
                        classes_per_experience=s.classes_per_experience, experience_classes=s.experience_classes,
                        class_order_seed=s.class_order_seed, epochs=s.epochs, online_base=s.online_base,
                        online_experience_size=s.online_experience_size,
                        access_task_boundaries=s.access_task_boundaries, seed=cfg.train.seed)


@dataclass(frozen=True)
class TrainingData:
    """What a model keeps of the dataset it trained on: its short name, image size, normalisation and class count.

    Every checkpoint holds it (`state["data"]`), so that a model is rebuilt and its probes normalise as in training
    without the training data: evaluate.py probes transfer targets alone, and a generic source changed since the run
    does not change the model's input normalisation.
    """

    name: str
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int

    @classmethod
    def of(cls, splits: DatasetSplits) -> TrainingData:
        return cls(splits.name, int(splits.image_size), tuple(map(float, splits.mean)), tuple(map(float, splits.std)),
                   int(splits.num_classes))

    def state_dict(self) -> dict:
        return {"name": self.name, "image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                "num_classes": self.num_classes}

    @classmethod
    def from_state(cls, state: dict) -> TrainingData:
        return cls(str(state["name"]), int(state["image_size"]), tuple(map(float, state["mean"])),
                   tuple(map(float, state["std"])), int(state["num_classes"]))


def stream_data(splits: DatasetSplits) -> dict:
    """What a resume checks it trains on the same data (saved with every checkpoint, in `state["data"]`): the number
    of training images and a digest of them and their labels (features_cache.data_fingerprint, without file times)."""
    return {"images": len(splits.train), "digest": data_fingerprint(splits.train.images, splits.train.targets,
                                                                    mtimes=False)}


# ------------------------------------------------------------------------------------------ model
def model_stem(cfg: Config, splits: DatasetSplits | TrainingData) -> str:
    """cfg.model.stem, or (auto) the registry's stem of the dataset (generic sources: from the image size)."""
    if cfg.model.stem != "auto":
        return cfg.model.stem
    if is_generic(cfg.data.dataset):
        return stem_for_size(splits.image_size)
    return dataset_spec(cfg.data.dataset, image_size=cfg.data.image_size).stem


def build_model(cfg: Config, stem: str) -> EMPSSLModel:
    m = cfg.model
    return EMPSSLModel(arch=m.arch, stem=stem, width=m.width, feature_dim=m.feature_dim,
                       proj_hidden_dim=m.proj_hidden_dim, proj_dim=m.proj_dim, recompute_stages=m.recompute_stages,
                       recompute_bn_relu=m.recompute_bn_relu)


def uses_channels_last(cfg: Config, device: torch.device) -> bool:
    """cfg.train.channels_last, except on CPU below 8 stem channels (torch's BatchNorm backward hangs there)."""
    if cfg.train.channels_last and device.type == "cpu" and round(64 * cfg.model.width) < 8:
        log.warning("channels_last disabled: the stem has fewer than 8 channels (model.width %s) on CPU",
                    cfg.model.width)
        return False
    return cfg.train.channels_last


def wrap_for_training(cfg: Config, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Under DDP: SyncBatchNorm (CUDA, model.sync_bn) and the DDP wrapper; else the model itself."""
    if not ddp.is_dist():
        return model
    train_model = model
    sync = ddp.syncs_batchnorm(cfg.model.sync_bn, device.type)
    if sync:
        train_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif cfg.model.sync_bn:
        log.warning("SyncBatchNorm needs CUDA in PyTorch; on CPU (gloo) each rank normalises with its own "
                    "batch statistics (the objective still sees the global batch)")
    log.info("DDP over %s, world %d, SyncBatchNorm %s", torch.distributed.get_backend(), ddp.world_size(),
             "on" if sync else "off")
    return torch.nn.parallel.DistributedDataParallel(
        train_model, device_ids=[device.index] if device.type == "cuda" else None)


def build_augment(cfg: Config, splits: DatasetSplits | TrainingData) -> MultiPatchAugment:
    a = cfg.augment
    size = a.size or splits.image_size
    if a.blur_kernel is not None and a.blur_kernel > 2 * size - 1:
        raise ConfigError(f"augment.blur_kernel: {a.blur_kernel} taps do not fit {size} px patches (reflect padding: "
                          f"at most {2 * size - 1}); set augment.blur_kernel=null (+-3 sigma) or a smaller odd number")
    return MultiPatchAugment(a.n_patches, size, crop_area=a.crop_area,
                             crop_ratio=tuple(a.crop_ratio), flip_p=a.flip_p, jitter=tuple(a.jitter),
                             jitter_p=a.jitter_p, gray_p=a.gray_p, blur_p=a.blur_p, blur_sigma=tuple(a.blur_sigma),
                             blur_kernel_size=a.blur_kernel, solarize_p=a.solarize_p, mean=tuple(splits.mean),
                             std=tuple(splits.std),
                             sync_free=a.sync_free, compiled=a.compile, compile_backend=cfg.train.compile_backend)


def build_optimizer(cfg: Config, model: torch.nn.Module, extra: list[torch.nn.Module] = ()) -> LARS:
    """LARS over the model (and extra trainable modules, e.g. a distillation predictor)."""
    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    for module in extra:
        groups += param_groups(module, o.weight_decay)
    return LARS(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay,
                eta=o.eta, clip=o.clip, foreach=o.foreach)


# ------------------------------------------------------------------------------------------ evaluation
def probe_kwargs(cfg: Config) -> dict:
    e = cfg.eval
    return {"epochs": e.probe_epochs, "lr": e.probe_lr, "weight_decay": e.probe_weight_decay,
            "batch_size": e.probe_batch_size}


def probe_set(cfg: Config, splits: DatasetSplits) -> ProbeSet:
    tr = per_class_subset(splits.train, cfg.eval.train_per_class)
    te = per_class_subset(splits.test, cfg.eval.test_per_class)
    return ProbeSet(splits.name, tr.images, tr.targets, te.images, te.targets, splits.num_classes)


def build_evaluator(cfg: Config, splits: DatasetSplits, stream: SSLStream, augment: MultiPatchAugment, *,
                    device: torch.device, amp_dtype: torch.dtype | None, channels_last: bool) -> StreamEvaluator:
    """In-domain probes on `splits` plus one probe set per cfg.eval.transfer dataset (resized to the encoder)."""
    transfer = [probe_set(cfg, load_splits(cfg, name, image_size=splits.image_size if is_generic(name) else None))
                for name in cfg.eval.transfer]
    e = cfg.eval
    return StreamEvaluator(in_domain=probe_set(cfg, splits), transfer=transfer, parent_classes=stream.parent_classes,
                           augment=augment, device=device, amp_dtype=amp_dtype, channels_last=channels_last,
                           patches=e.patches, batch_size=e.batch_size, knn_k=e.knn_k,
                           knn_temperature=e.knn_temperature, seen_classes=e.seen_classes,
                           probe_kwargs=probe_kwargs(cfg), seed=cfg.train.seed, bn_recalibrate=e.bn_recalibrate,
                           forward_transfer=e.forward_transfer)


def initial_baseline(cfg: Config) -> dict:
    """Forward transfer's baseline for a run of `cfg` (StreamEvaluator.evaluate_baseline): its model at
    initialisation, built as train() builds it (the same seed and the same draws before it, so the same weights),
    probed by the run's own evaluator. What `eval.forward_transfer: true` logs as `probe/init_*`, computed afterwards
    for a run trained without it (bench/forward_transfer.py). Writes nothing."""
    device, amp_dtype = setup_runtime(cfg)
    splits = load_train_data(cfg)
    stream = stream_from_config(cfg, splits)
    model = build_model(cfg, model_stem(cfg, splits)).to(device)
    channels_last = uses_channels_last(cfg, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    evaluator = build_evaluator(cfg, splits, stream, build_augment(cfg, splits), device=device, amp_dtype=amp_dtype,
                                channels_last=channels_last)
    return evaluator.evaluate_baseline(model)


def build_loggers(cfg: Config, run_dir: Path, *, resumed_after: int | None = None) -> list:
    """metrics.jsonl, log.txt (Avalanche's TextLogger, one row per evaluation) and TensorBoard; rank 0 only. Close
    them after the run. `resumed_after`: the experiences trained at the checkpoint a resumed run continues from
    (TensorBoard then hides the evaluations logged after it, which are logged again)."""
    from streaming_ssl.evaluation import (ExperienceTextLogger, JSONLLogger, ResumedTensorboardLogger,
                                          ScalarTensorboardLogger)

    if not ddp.is_main():
        return []
    text = ExperienceTextLogger(open(run_dir / "log.txt", "a"))  # noqa: SIM115 - closed by close_loggers
    loggers = [JSONLLogger(run_dir / "metrics.jsonl"), text]
    if cfg.run.tensorboard:
        # a new run too (1): what a run killed before its first checkpoint logged is hidden
        purge = (resumed_after or 0) + 1
        loggers.append(ScalarTensorboardLogger(ResumedTensorboardLogger(run_dir / "tb", purge_step=purge)))
    return loggers


def close_loggers(loggers: list) -> None:
    for lg in loggers:
        if hasattr(lg, "close"):
            lg.close()
        elif hasattr(lg, "file") and hasattr(lg.file, "close"):  # Avalanche's TextLogger
            lg.file.close()


# ------------------------------------------------------------------------------------------ a whole run
@dataclass
class Run:
    """Everything one training run is made of (build_run); the runner trains `strategy` on `stream`."""

    cfg: Config
    run_dir: Path
    splits: DatasetSplits
    stream: SSLStream
    model: EMPSSLModel
    strategy: EMPSSLStrategy
    metric: ProbeMetric
    checkpoint: object
    stop: object
    progress: object
    train_log: object = None
    loggers: list = field(default_factory=list)
    device: torch.device | None = None
    amp_dtype: torch.dtype | None = None


def build_strategy(cfg: Config, *, model: torch.nn.Module, optimizer, augment: MultiPatchAugment,
                   total_updates: int, device: torch.device, amp_dtype: torch.dtype | None, channels_last: bool,
                   plugins: list, evaluator) -> EMPSSLStrategy:
    o = cfg.optim
    return EMPSSLStrategy(model=model, optimizer=optimizer, augment=augment, n_patches=cfg.augment.n_patches,
                          eps2=cfg.objective.eps2, lam=cfg.objective.lam, batch_size=cfg.train.batch_size,
                          epochs=cfg.stream.epochs, total_updates=total_updates, base_lr=o.lr,
                          warmup_steps=o.warmup_steps, final_lr=o.final_lr, device=device, amp_dtype=amp_dtype,
                          channels_last=channels_last, seed=cfg.train.seed, plugins=plugins, evaluator=evaluator)


def build_run(cfg: Config, run_dir: Path, *, device: torch.device, amp_dtype: torch.dtype | None,
              splits: DatasetSplits, stream: SSLStream, model: EMPSSLModel) -> Run:
    """Assemble strategy, evaluator (transfer data included) and plugins for a run whose data, stream and model
    are built. Writes nothing: the run's loggers join `Run.loggers` (the evaluation plugin's own list) once
    the run directory exists, so bad input found here leaves the directory untouched."""
    from avalanche.training.plugins import EvaluationPlugin

    from streaming_ssl.cl import build_cl_plugins
    from streaming_ssl.plugins import (CheckpointPlugin, EvalSchedule, GracefulStop, ProgressPlugin, SyncBuffers,
                                       TrainLog)

    channels_last = uses_channels_last(cfg, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_model = wrap_for_training(cfg, model, device)
    augment = build_augment(cfg, splits)
    cl_plugins = build_cl_plugins(cfg, model=model, train_size=len(splits.train), device=device)
    optimizer = build_optimizer(cfg, model, [m for p in cl_plugins for m in getattr(p, "trainable_modules", [])])
    evaluator = build_evaluator(cfg, splits, stream, augment, device=device, amp_dtype=amp_dtype,
                                channels_last=channels_last)
    metric = ProbeMetric(evaluator, model)
    checkpoint = CheckpointPlugin(run_dir, model=model, optimizer=optimizer, evaluator=evaluator, metric=metric,
                                  config=cfg.to_dict(), keep_last=cfg.run.keep_last, every=cfg.run.checkpoint_every,
                                  each_experience=cfg.stream.mode != "online",
                                  data={**TrainingData.of(splits).state_dict(), "stream_data": stream_data(splits)})
    stop = GracefulStop(checkpoint)
    total_updates = stream.n_updates(cfg.train.batch_size)
    progress = ProgressPlugin(total_updates, desc=f"{cfg.stream.mode} {splits.name}", log_every=cfg.train.log_every)
    train_log = TrainLog(run_dir, every=cfg.train.log_every, tensorboard=cfg.run.tensorboard)
    plugins = [EvalSchedule(stream.step_parent, cfg.stream.eval_every)]
    if ddp.is_dist():
        plugins.append(SyncBuffers(model))
    plugins += [*cl_plugins, progress, train_log, checkpoint, stop]
    loggers: list = []
    with warnings.catch_warnings():  # the loggers join once the run directory exists
        warnings.filterwarnings("ignore", message="No loggers specified")
        evaluation = EvaluationPlugin(metric, loggers=loggers)
    strategy = build_strategy(cfg, model=train_model, optimizer=optimizer, augment=augment,
                              total_updates=total_updates, device=device, amp_dtype=amp_dtype,
                              channels_last=channels_last, plugins=plugins, evaluator=evaluation)
    if cfg.train.compile:  # compiles lazily, at the first update (and at a new batch size)
        train_model.compile(backend=cfg.train.compile_backend)
    return Run(cfg=cfg, run_dir=run_dir, splits=splits, stream=stream, model=model, strategy=strategy, metric=metric,
               checkpoint=checkpoint, stop=stop, progress=progress, train_log=train_log, loggers=loggers,
               device=device, amp_dtype=amp_dtype)
