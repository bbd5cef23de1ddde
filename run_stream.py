#!/usr/bin/env python
"""Train EMP-SSL on a continual stream (or offline, E epochs) and evaluate after every experience.

    python run_stream.py --config configs/split_cifar10.yaml [key.sub=value ...]
    python run_stream.py --resume runs/split_cifar10          # continue a run exactly where it stopped
    torchrun --nproc_per_node 4 run_stream.py --config configs/split_imagenet100.yaml

This file is the adapter between the config and the library: it is the only place (with evaluate.py)
that reads the config object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("streaming_ssl")

STEM_OF = {"cifar10": "cifar", "cifar100": "cifar", "tinyimagenet": "tiny", "imagenet100": "imagenet"}


class RunError(RuntimeError):
    """A problem with the run directory or the command line; the message says what to do."""


class Interrupted(Exception):
    """Ctrl-C / SIGTERM arrived; the run saved a checkpoint at the last finished update."""


# ------------------------------------------------------------------------------------------ adapters
def per_class_subset(data, per_class: int | None):
    """The first `per_class` samples of every class (all when None), in the original order."""
    if per_class is None:
        return data
    keep = torch.zeros(len(data.targets), dtype=torch.bool)
    for c in data.targets.unique():
        keep[(data.targets == c).nonzero().flatten()[:per_class]] = True
    return data.subset(keep.nonzero().flatten())


def load_splits(cfg, name: str | None = None):
    from scenarios.datasets import load_dataset

    return load_dataset(name or cfg.data.dataset, cfg.data.root, download=cfg.data.download, image_size=cfg.data.image_size)


def build_model(cfg, dataset: str):
    from streaming_ssl.models import EMPSSLModel

    m = cfg.model
    return EMPSSLModel(arch=m.arch, stem=STEM_OF[dataset] if m.stem == "auto" else m.stem, width=m.width,
                       feature_dim=m.feature_dim, proj_hidden_dim=m.proj_hidden_dim, proj_dim=m.proj_dim,
                       recompute_stages=m.recompute_stages, recompute_bn_relu=m.recompute_bn_relu)


def build_augment(cfg, splits):
    from streaming_ssl.augment import MultiPatchAugment

    a = cfg.augment
    return MultiPatchAugment(a.n_patches, a.size or splits.image_size, crop_area=a.crop_area,
                             crop_ratio=tuple(a.crop_ratio), flip_p=a.flip_p, jitter=tuple(a.jitter),
                             jitter_p=a.jitter_p, gray_p=a.gray_p, blur_p=a.blur_p, blur_sigma=tuple(a.blur_sigma),
                             solarize_p=a.solarize_p, mean=tuple(splits.mean), std=tuple(splits.std))


def probe_set(cfg, splits):
    from streaming_ssl.evaluation import ProbeSet

    tr = per_class_subset(splits.train, cfg.eval.train_per_class)
    te = per_class_subset(splits.test, cfg.eval.test_per_class)
    return ProbeSet(splits.name, tr.images, tr.targets, te.images, te.targets, splits.num_classes)


def probe_kwargs(cfg) -> dict:
    e = cfg.eval
    return {"epochs": e.probe_epochs, "lr": e.probe_lr, "weight_decay": e.probe_weight_decay, "batch_size": e.probe_batch_size}


def setup_runtime(cfg):
    """Threads, determinism, seeds, device, precision, process group. Returns (device, amp_dtype)."""
    from streaming_ssl import distributed as ddp
    from streaming_ssl.device import resolve_device, resolve_precision

    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    if t.deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    _, local_rank, _ = ddp.env_world()
    device = resolve_device(t.device, local_rank)
    ddp.init_from_env(device.type)
    torch.manual_seed(t.seed)
    import random

    import numpy as np

    random.seed(t.seed)
    np.random.seed(t.seed % 2**32)
    return device, resolve_precision(t.precision, device)


def setup_logging(run_dir: Path | None) -> logging.Handler | None:
    """Log to stderr and (rank 0) to RUN/train.log; returns the file handler, to be removed after the run."""
    from streaming_ssl import distributed as ddp

    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger().setLevel(logging.INFO if ddp.is_main() else logging.WARNING)
    if run_dir is None or not ddp.is_main():
        return None
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


# ------------------------------------------------------------------------------------------ run dir
def prepare_run_dir(cfg, args) -> tuple[Path, dict | None]:
    """Create or check the run directory; with --resume return the checkpoint to continue from."""
    from streaming_ssl import checkpoint as ckpt
    from streaming_ssl.config import config_from_dict

    run_dir = Path(cfg.run.out_dir)
    if args.resume:
        saved_cfg_path = run_dir / "config.yaml"
        if not saved_cfg_path.is_file():
            raise RunError(f"cannot resume {str(run_dir)!r}: it holds no config.yaml (not a run directory)")
        import yaml

        saved = config_from_dict(yaml.safe_load(saved_cfg_path.read_text()))
        if saved.to_dict() != cfg.to_dict():
            diffs = _dict_diff(saved.to_dict(), cfg.to_dict())
            raise RunError(f"cannot resume {str(run_dir)!r} with a different config ({'; '.join(diffs[:5])}); "
                           "resume without --config/overrides, or start a new run with another run.out_dir")
        path = ckpt.latest(run_dir)
        if path is None:
            log.warning("no checkpoint in %s yet: starting the run from the beginning", run_dir)
            return run_dir, None
        return run_dir, ckpt.load(path)
    if run_dir.exists() and any(run_dir.iterdir()) and not args.overwrite:
        raise RunError(f"run directory {str(run_dir)!r} is not empty; pass --resume {run_dir} to continue it, "
                       "--overwrite to replace it, or choose another run.out_dir")
    return run_dir, None


def create_run_dir(cfg, args, run_dir: Path) -> None:
    """Called once data, stream and model are known to be good: nothing is written or deleted before."""
    from streaming_ssl import distributed as ddp
    from streaming_ssl.config import save_config

    if ddp.is_main():
        if args.overwrite and not args.resume and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    ddp.barrier()


def _dict_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _dict_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: run has {va!r}, now {vb!r}")
    return out


# ------------------------------------------------------------------------------------------ main
def run(cfg, args) -> dict:
    """Train and evaluate one run; returns the last evaluation row."""
    handlers_before = list(logging.getLogger().handlers)
    try:
        return _run(cfg, args)
    finally:  # a run's log file must not collect what later runs in this process log
        for handler in logging.getLogger().handlers:
            if handler not in handlers_before:
                logging.getLogger().removeHandler(handler)
                handler.close()


def _run(cfg, args) -> dict:
    from avalanche.logging import TensorboardLogger, TextLogger
    from avalanche.training.plugins import EvaluationPlugin
    from tqdm import tqdm

    from scenarios.streams import build_stream
    from streaming_ssl import allocator
    from streaming_ssl import checkpoint as ckpt
    from streaming_ssl import distributed as ddp
    from streaming_ssl.evaluation import (JSONLLogger, ProbeMetric, ScalarTensorboardLogger, StreamEvaluator,
                                          plot_run, read_rows)
    from streaming_ssl.lars import LARS, param_groups
    from streaming_ssl.strategy import EMPSSLStrategy, NonFiniteLossError

    run_dir, state = prepare_run_dir(cfg, args)
    device, amp_dtype = setup_runtime(cfg)

    splits = load_splits(cfg)
    train = per_class_subset(splits.train, cfg.data.train_per_class)
    test = per_class_subset(splits.test, cfg.data.test_per_class)
    splits.train, splits.test = train, test
    s = cfg.stream
    stream = build_stream(train, splits.num_classes, mode=s.mode, n_experiences=s.n_experiences,
                          classes_per_experience=s.classes_per_experience, experience_classes=s.experience_classes,
                          class_order_seed=s.class_order_seed, epochs=s.epochs, online_base=s.online_base,
                          online_experience_size=s.online_experience_size,
                          access_task_boundaries=s.access_task_boundaries, seed=cfg.train.seed)
    total_updates = stream.n_updates(cfg.train.batch_size)
    log.info("stream: %s, %d training experiences, %d parent experiences, %d updates of %d images x %d patches",
             s.mode, len(stream), len(stream.parent_sizes), total_updates, cfg.train.batch_size, cfg.augment.n_patches)

    model = build_model(cfg, splits.name).to(device)
    channels_last = cfg.train.channels_last
    if channels_last and device.type == "cpu" and round(64 * cfg.model.width) < 8:
        # torch 2.14 CPU: BatchNorm's channels_last backward hangs or crashes below 8 channels (seen here)
        log.warning("channels_last disabled: the stem has fewer than 8 channels (model.width %s) on CPU", cfg.model.width)
        channels_last = False
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if state is not None:
        ckpt.check_model_matches(state, model, str(run_dir))
        model.load_state_dict(state["model"])
    train_model: torch.nn.Module = model
    if ddp.is_dist():
        if cfg.model.sync_bn and device.type == "cuda":
            train_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif cfg.model.sync_bn:
            log.warning("SyncBatchNorm needs CUDA in PyTorch; on CPU (gloo) each rank normalises with its own "
                        "batch statistics (the objective still sees the global batch)")
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
    augment = build_augment(cfg, splits)
    o = cfg.optim
    optimizer = LARS(param_groups(model, o.weight_decay), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                     weight_decay=o.weight_decay, eta=o.eta, clip=o.clip)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])

    transfer = [probe_set(cfg, load_splits(cfg, name)) for name in cfg.eval.transfer]
    evaluator = StreamEvaluator(in_domain=probe_set(cfg, splits), transfer=transfer, parent_classes=stream.parent_classes,
                                augment=augment, device=device, amp_dtype=amp_dtype, channels_last=channels_last,
                                patches=cfg.eval.patches, batch_size=cfg.eval.batch_size, knn_k=cfg.eval.knn_k,
                                knn_temperature=cfg.eval.knn_temperature, seen_classes=cfg.eval.seen_classes,
                                probe_kwargs=probe_kwargs(cfg), seed=cfg.train.seed,
                                bn_recalibrate=cfg.eval.bn_recalibrate)
    create_run_dir(cfg, args, run_dir)
    setup_logging(run_dir)
    log.info("run %s on %s (precision %s, world %d, allocator %s)", run_dir, device, amp_dtype or "fp32",
             ddp.world_size(), allocator.in_effect(dict(os.environ)))
    if cfg.train.compile:
        log.info("train.compile: the training forward is compiled at the first update (and at a new batch size)")
        train_model.compile()
    every = s.eval_every
    n_steps = len(stream)

    def due(strategy) -> bool:
        done = strategy.stream_step
        if done == n_steps:
            return True
        if every == 0:
            return stream.is_parent_end(done - 1)
        return done % every == 0

    def n_seen(strategy) -> int:
        return stream.step_parent[strategy.stream_step - 1] + 1

    metric = ProbeMetric(evaluator, due, n_seen, model)
    metrics_path = run_dir / "metrics.jsonl"
    loggers = []
    text_file = None
    if ddp.is_main():
        loggers.append(JSONLLogger(metrics_path))
        text_file = open(run_dir / "log.txt", "a")
        loggers.append(TextLogger(text_file))
        if cfg.run.tensorboard:
            loggers.append(ScalarTensorboardLogger(TensorboardLogger(run_dir / "tb")))
    if state is not None:
        evaluator.load_state_dict(state["evaluator"])
        metric.time_offset = float(state["wall_seconds"])
        if ddp.is_main():  # drop rows written after the checkpoint (they will be computed again)
            rows = metrics_path.read_text().splitlines(keepends=True) if metrics_path.exists() else []
            metrics_path.write_text("".join(rows[: int(state["metrics_rows"])]))

    stop = {"signal": None}

    def on_signal(signum, frame):
        if stop["signal"] is not None:  # second Ctrl-C: leave now
            raise KeyboardInterrupt
        stop["signal"] = signum
        log.warning("signal %d: finishing the current update, saving a checkpoint, then stopping", signum)

    old_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    bar = tqdm(total=total_updates, desc=f"{s.mode} {splits.name}", unit="upd", disable=not ddp.is_main(),
               dynamic_ncols=True, mininterval=2.0)

    def save(strategy) -> None:
        bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise NonFiniteLossError(
                f"the weights became non-finite at update {strategy.global_step} (first: {bad[0]}); this state was not "
                "saved and the last checkpoint is intact. Lower optim.lr or check the input data.")
        payload = {"format": ckpt.FORMAT_VERSION, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "position": strategy.position(), "rng": ckpt.rng_state(),
                   "aug_generator": ddp.all_gather_object(strategy.aug_generator.get_state().cpu()),
                   "evaluator": evaluator.state_dict(),
                   "metrics_rows": len(read_rows(metrics_path)) if ddp.is_main() else 0,
                   "wall_seconds": metric.time_offset + time.time() - metric.start_time, "config": cfg.to_dict()}
        if ddp.is_main():
            try:
                ckpt.save_rotating(payload, run_dir, strategy.global_step, cfg.run.keep_last)
            except OSError as err:
                raise RunError(f"could not write a checkpoint into {str(run_dir)!r} ({err.strerror or err}); the "
                               "previous checkpoints are intact: free disk space (or move run.out_dir), then "
                               f"python run_stream.py --resume {run_dir}") from err
        ddp.barrier()

    def on_iteration(strategy) -> None:
        bar.update(1)
        if strategy.global_step % cfg.train.log_every == 0 and strategy.last_stats:
            loss = float(strategy.loss.detach().reshape(-1)[0])
            bar.set_postfix(loss=f"{loss:.2f}", tcr=f"{float(strategy.last_stats['tcr']):.2f}",
                            inv=f"{float(strategy.last_stats['inv']):.3f}", refresh=False)
        if cfg.run.checkpoint_every and strategy.global_step % cfg.run.checkpoint_every == 0:
            save(strategy)
        if stop["signal"] is not None:
            save(strategy)
            raise Interrupted

    def on_experience(strategy) -> None:
        evaluated = metric.last_row is not None and due(strategy)
        if evaluated:
            r = metric.last_row
            log.info("after experience %d: probe %.2f%% (seen %s), kNN %s, avg forgetting %s", r["experience"],
                     100 * r["probe/acc_all"], _pct(r.get("probe/acc_seen")), _pct(r.get("knn/acc_all")),
                     _pct(r.get("probe/avg_forgetting")))
        # online streams have thousands of mini-experiences: checkpoint those only with an evaluation,
        # at parent boundaries, or every run.checkpoint_every updates (on_iteration)
        if (s.mode != "online" or evaluated or stream.is_parent_end(strategy.stream_step - 1)
                or stop["signal"] is not None):
            save(strategy)
        if stop["signal"] is not None:
            raise Interrupted

    plugins = []
    if ddp.is_dist():
        from avalanche.core import SupervisedPlugin

        class SyncBuffers(SupervisedPlugin):
            """Runs before the evaluation plugin: every rank evaluates rank 0's model (the one checkpointed).

            Without SyncBatchNorm each rank's last forward updated its BatchNorm running statistics with its
            own share of the batch; extract_features shards the images, so the probes would otherwise read
            features computed with a different model on every rank.
            """

            def after_training_exp(self, strategy, **kwargs):
                ddp.broadcast_buffers(model)

        plugins.append(SyncBuffers())
    strategy = EMPSSLStrategy(model=train_model, optimizer=optimizer, augment=augment, images=train.images, targets=train.targets,
                              n_patches=cfg.augment.n_patches, eps2=cfg.objective.eps2, lam=cfg.objective.lam,
                              batch_size=cfg.train.batch_size, epochs=s.epochs, total_updates=total_updates,
                              base_lr=o.lr, warmup_steps=o.warmup_steps, final_lr=o.final_lr, device=device,
                              amp_dtype=amp_dtype, channels_last=channels_last, seed=cfg.train.seed,
                              plugins=plugins, evaluator=EvaluationPlugin(metric, loggers=loggers),
                              on_iteration=on_iteration, on_experience=on_experience)
    if state is not None:
        strategy.set_position(state["position"])
        ckpt.set_rng_state(state["rng"])
        aug_states = state["aug_generator"]
        if len(aug_states) != ddp.world_size():
            raise RunError(f"the run was saved by {len(aug_states)} process(es) but resumes with {ddp.world_size()}; "
                           "resume with the same number of processes (torchrun --nproc_per_node)")
        strategy.aug_generator.set_state(aug_states[ddp.rank()])
        bar.update(strategy.global_step)
        log.info("resumed at update %d (experience %d, batch %d)", strategy.global_step, strategy.stream_step,
                 strategy.batch_in_epoch)
    try:
        remaining = itertools.islice(iter(stream), strategy.stream_step, None)
        if strategy.stream_step < n_steps:
            strategy.train(remaining, eval_streams=[])
    except Interrupted:
        log.warning("stopped by signal at update %d; continue with: python run_stream.py --resume %s",
                    strategy.global_step, run_dir)
        raise
    finally:
        bar.close()
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        for lg in loggers:
            if hasattr(lg, "close"):
                lg.close()
        if text_file is not None:
            text_file.close()
    rows = read_rows(metrics_path) if ddp.is_main() else []
    if ddp.is_main() and cfg.run.plot and rows:
        plot_run(rows, run_dir / "accuracy.png", title=f"{s.mode} {splits.name} ({run_dir.name})")
    if ddp.is_main() and rows:
        (run_dir / "summary.json").write_text(json.dumps(rows[-1], indent=2))
        log.info("done: %s", json.dumps({k: v for k, v in rows[-1].items() if not isinstance(v, list)}))
    return rows[-1] if rows else {}


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML recipe in configs/; change it to pick the dataset, stream and model")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint "
                   "(uses the config saved there; after a crash, Ctrl-C or a time limit)")
    p.add_argument("--overwrite", action="store_true", help="delete a non-empty run directory and start afresh")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="override config values, e.g. train.batch_size=50 run.out_dir=runs/try2")
    return p.parse_args(argv)


def resolve_config(args):
    from streaming_ssl.config import ConfigError, load_config

    if args.resume:
        saved = Path(args.resume) / "config.yaml"
        if not saved.is_file():
            raise RunError(f"cannot resume {args.resume!r}: no config.yaml there (is it a run directory?)")
        if args.config:
            cfg = load_config(args.config, args.overrides + [f"run.out_dir={args.resume}"])
        else:
            cfg = load_config(saved, args.overrides)
        if Path(cfg.run.out_dir).resolve() != Path(args.resume).resolve():
            raise ConfigError(f"--resume {args.resume} but the config's run.out_dir is {cfg.run.out_dir}")
        return cfg
    if not args.config:
        raise RunError("pass --config configs/<recipe>.yaml (see configs/) or --resume RUN_DIR")
    return load_config(args.config, args.overrides)


def main(argv: list[str] | None = None) -> int:
    from scenarios.datasets import DataError
    from scenarios.streams import StreamError
    from streaming_ssl.checkpoint import CheckpointError
    from streaming_ssl.config import ConfigError
    from streaming_ssl.strategy import NonFiniteLossError

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        cfg = resolve_config(args)
        run(cfg, args)
    except (ConfigError, DataError, StreamError, CheckpointError, RunError, NonFiniteLossError) as err:
        log.error("%s: %s", type(err).__name__, err)
        return 2
    except Interrupted:
        return 130
    return 0


def choose_allocator(argv: list[str] | None = None) -> None:
    """On CPU runs, re-execute once with the faster allocator setting (streaming_ssl/allocator.py). A config
    that does not load is left for main() to report."""
    from streaming_ssl import allocator

    try:
        device = resolve_config(parse_args(argv)).train.device
    except Exception:  # noqa: BLE001 - main() reports bad input properly
        return
    try:
        allocator.reexec_if_needed(allocator.device_type_of(device))
    except allocator.AllocatorError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    choose_allocator()
    sys.exit(main())
