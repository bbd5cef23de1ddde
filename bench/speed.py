#!/usr/bin/env python
"""Speed benchmark: writes bench/results/speed.json and prints a table. Not a test.

    STREAMING_SSL_DATA=../shared/data .venv/bin/python bench/speed.py                   # full (hours on 2 cores)
    STREAMING_SSL_DATA=../shared/data .venv/bin/python bench/speed.py --widths 0.25 \
        --only reference,ours,model_only,objective,augment --repeats 1                  # minutes
    STREAMING_SSL_DATA=../shared/data .venv/bin/python bench/speed.py --tiny --out /tmp/speed.json  # seconds

Cases (each at every width in --widths, on the CPU with torch threads = cores, and on CUDA when present):

  reference   the authors' pipeline rebuilt in bench/reference_pipeline.py: per-patch PIL torchvision
              transforms in DataLoader workers, fp32, d x d logdet per patch block, SGD wrapped by LARS;
              the network is our EMPSSLModel (same shapes as theirs), NCHW
  ours        our end-to-end training step: EMPSSLStrategy.train on an in-memory stream (RowBatchLoader,
              batched MultiPatchAugment, channels_last, Gram/Cholesky objective, LARS, cosine schedule)
  model_only  forward + objective + backward + LARS step on pre-made channels_last patches: the ceiling
              of `ours` (everything but the input pipeline); afterwards the LARS step alone, as multi-tensor
              buckets and as the per-parameter loop (`lars_step_ms`; see streaming_ssl/lars.py)
  ours_lean   `ours` with model.recompute_bn_relu (each block's first BatchNorm+ReLU output rebuilt in
              backward from the convolution output instead of stored): a quarter less activation memory
  ours_lowmem `ours` with model.recompute_stages=2 and model.recompute_bn_relu (stem, stages 1-2
              recomputed in backward): the low-memory setting, for the peak-memory comparison with the reference
  ours_compiled  `ours` with train.compile (torch.compile of the training forward); opt-in through --only,
              since compiling takes minutes: its warm-up steps include the compilation
  ours_compiled_augment  `ours` with augment.compile (torch.compile of the augmentation after its random draw: a few
              fused kernels instead of a few hundred small ops per update); opt-in through --only
  ours_indexed  `ours` with augment.sync_free=false: the augmentation's random subsets of patches indexed (one
              host sync per update) instead of masked; opt-in through --only; on a CPU the same as `ours`
  ours_fp32   `ours` with train.precision=fp32: what bf16 autocast buys where `auto` picks it (CUDA, CPUs with
              native bf16); opt-in through --only; on a CPU without native bf16 the same as `ours`
  ours_fp16   `ours` with train.precision=fp16 (float16 with a loss scaler, for GPUs without bf16): on a GPU with
              both, `ours` over it is what float16 and its scaler cost (the skip decided on the device); opt-in through
              --only; on a CPU float16 is emulated (many times slower)
  ours_fp16_hostread  `ours_fp16` with LARS's amp contract off, so GradScaler reads the overflow flag on the host at
              every update to decide the skip (torch's default for an optimizer): ours_fp16 / ours_fp16_hostread is
              what deciding it on the device gains; opt-in through --only; on a CPU LARS's loop reads the flag in
              both (the row's `fp16_skip_on` says where it was decided)
  ours_replay, ours_minred  `ours` with replay of `batch` buffer images per update from a buffer of 2 x batch, kept
              by reservoir sampling or by MinRed (the features of buffer + batch and its greedy choice at every
              update); opt-in through --only; ours_minred / ours_replay is what MinRed's choice costs
  ours_trainlog  `ours` with the training curves logged at every update (plugins.TrainLog, TensorBoard on; runs log
              every train.log_every=20); opt-in through --only; ours_trainlog / ours is what logging costs
  objective   emp_ssl_loss forward + backward on random unit-norm projections (and the reference loss)
  augment     MultiPatchAugment on one uint8 batch (and the reference PIL chain, serially, one process)
  online      EMPSSLStrategy.train on an online stream (mini-experiences of k samples) vs the same data
              as one class-incremental experience, batch size k, samples/s of each
  probe       whole-image feature extraction + linear probe (train/test CIFAR images) vs one training
              pass over as many images (step time measured in the same process), extrapolated to CIFAR-10
  memory      VmHWM / VmRSS after each experience of a 5-experience class-incremental stream with
              the evaluator after each experience; growth from experience 1 to 5

Every case builds its parts through the library builders of streaming_ssl/build.py from a Config
(bench_config: model, augmentation, LARS optimizer, stream, evaluator, strategy), as a run does; only the
reference keeps the authors' pipeline of reference_pipeline.py. On CUDA (--device cuda) each row also has
peak_cuda_MB (torch.cuda.max_memory_allocated of the case; full mode: a fresh process per case) and
peak_cuda_steady_MB (the same over the measured steps only, after the warm-up: without cudnn.benchmark's trial
workspaces), and the reference gets min(cores, 16) DataLoader workers, as the authors' main.py (anywhere fewer
if /dev/shm cannot hold their batches: the row then has dataloader_workers_wanted, shm_free_MB and workers_note).

Training cases also record the peak resident memory of their process (VmHWM; the reference's DataLoader
workers separately). Full mode runs every (case, width) in a fresh subprocess (`--case X --width W`
prints one JSON line) under each allocator of --allocators: glibc as is ("default"), glibc with the
malloc tunables of scripts/run.sh ("tuned"), jemalloc or tcmalloc through LD_PRELOAD (Debian packages
libjemalloc2, libtcmalloc-minimal4; the reference's forked workers inherit it); cases and allocators
interleaved, --repeats times; ratios pair the two sides of the same repeat and allocator
and are reported as median and [min, max]. --tiny runs everything in this process, once, with tiny
sizes. Times use time.perf_counter; warm-up steps are excluded. On CUDA the training cases (ours*, model_only)
synchronise the device only at the two ends of their measured steps, so that the steps pipeline as in training;
their mean step time is exact, their per-step spread is the host's view.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT / "bench"), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before SciPy (through Avalanche) starts its pool
os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars of the evaluator in the benchmark's output
warnings.filterwarnings("ignore", message="No loggers specified")
warnings.filterwarnings("ignore", message="no QP solver found")

TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=68719476736"
CASES = ("reference", "ours", "model_only", "ours_lean", "ours_lowmem", "objective", "augment", "online", "probe",
         "memory")
OPT_IN_CASES = ("ours_compiled", "ours_compiled_augment", "ours_indexed", "ours_fp32", "ours_fp16",
                "ours_fp16_hostread", "ours_replay", "ours_minred", "ours_trainlog")  # run only when named in --only
ALLOCATORS = ("default", "tuned", "jemalloc", "tcmalloc")
PRELOAD = {"jemalloc": "libjemalloc.so.2", "tcmalloc": "libtcmalloc_minimal.so.4"}
RESULT_PREFIX = "SPEED_JSON "
CIFAR10_TRAIN, CIFAR10_TEST = 50_000, 10_000

log = logging.getLogger("bench.speed")


@dataclass
class Sizes:
    """Everything that differs between the full and the tiny benchmark."""

    batch: int = 100
    patches: int = 20
    feature_dim: int = 4096
    proj_hidden_dim: int = 4096
    proj_dim: int = 1024
    steps: int = 8  # measured steps per training case
    warmup: int = 2  # steps run before measuring (>= 1)
    calls: int = 10  # measured calls of the objective / augmentation
    ref_aug_calls: int = 2  # measured batches of the serial reference augmentation
    ref_workers: int = 0  # DataLoader workers of the reference; 0 here means the usable cores (reference_workers)
    online_per_class: int = 30  # online case: 300 CIFAR-10 images
    online_batch: int = 10  # mini-experience size = batch size of both sides
    probe_train_per_class: int = 500  # 5000 train images
    probe_test_per_class: int = 100  # 1000 test images
    probe_epochs: int = 30
    extract_batch: int = 256
    memory_per_class: int = 100  # 1000 images: 5 experiences of 200
    memory_eval_train_per_class: int = 50
    memory_eval_test_per_class: int = 20
    memory_probe_epochs: int = 5
    lowmem_stages: int = 2  # model.recompute_stages of the ours_lowmem case
    lowmem_bn_relu: bool = True  # model.recompute_bn_relu of the ours_lowmem case


TINY = Sizes(batch=8, patches=4, feature_dim=128, proj_hidden_dim=128, proj_dim=64, steps=2, warmup=1, calls=2,
             ref_aug_calls=1, ref_workers=1, online_per_class=2, online_batch=5, probe_train_per_class=20,
             probe_test_per_class=10, probe_epochs=2, extract_batch=64, memory_per_class=4,
             memory_eval_train_per_class=4, memory_eval_test_per_class=2, memory_probe_epochs=1)


# ------------------------------------------------------------------------------------------ helpers
def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


_CUDA_WARMUP_PEAK = {"bytes": 0}  # the case's peak up to the end of its warm-up (see end_of_warmup)


def end_of_warmup(device) -> None:
    """On CUDA, keep the peak allocated so far (model, first steps, cudnn.benchmark's trial workspaces) and restart
    the count, so that run_case reports the whole case's peak and the steady state's peak apart."""
    import torch

    if device.type == "cuda":
        _CUDA_WARMUP_PEAK["bytes"] = max(_CUDA_WARMUP_PEAK["bytes"], torch.cuda.max_memory_allocated(device))
        torch.cuda.reset_peak_memory_stats(device)


def stats(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    med = statistics.median(values)
    return {"median": med, "mean": statistics.fmean(values), "min": min(values), "max": max(values), "n": len(values),
            "spread_pct": 100.0 * (max(values) - min(values)) / med if med else None}


_DATA: dict = {}


def load_cifar(root: str | None):
    """CIFAR-10 splits (cached per process); root None means $STREAMING_SSL_DATA."""
    if "cifar10" not in _DATA:
        from scenarios.datasets import load_dataset

        _DATA["cifar10"] = load_dataset("cifar10", root)
    return _DATA["cifar10"]


def first_n(data, n: int):
    import torch

    if n > len(data):
        raise ValueError(f"the benchmark needs {n} images, the split holds {len(data)}")
    return data.subset(torch.arange(n))


def bench_config(width: float, sizes: Sizes, device, *, batch: int | None = None, **settings):
    """The run Config of a benchmark case (built through load_config, so validated): the library builders
    of streaming_ssl/build.py turn it into model, augmentation, optimizer, stream, evaluator and strategy.
    `settings`: further dotted keys with '__' for '.', e.g. model__recompute_stages=2."""
    from streaming_ssl.config import load_config

    values = {"model.width": width, "model.feature_dim": sizes.feature_dim,
              "model.proj_hidden_dim": sizes.proj_hidden_dim, "model.proj_dim": sizes.proj_dim,
              "augment.n_patches": sizes.patches, "train.batch_size": batch or sizes.batch,
              "train.device": torch_device(device).type, "train.precision": "auto", "train.seed": 0,
              "stream.mode": "offline", "stream.epochs": 1}
    values.update({key.replace("__", "."): value for key, value in settings.items()})
    return load_config(None, [f"{key}={json.dumps(value)}" for key, value in values.items()])


def torch_device(device):
    import torch

    return device if isinstance(device, torch.device) else torch.device(device)


def build_parts(cfg, splits, *, channels_last: bool | None = None):
    """setup_runtime (seeds, cudnn.benchmark, precision) + build_model / build_augment of streaming_ssl.build.

    Returns (model on the device, augment, device, amp_dtype, channels_last); channels_last None: as a run
    (build.uses_channels_last); False: NCHW (the reference)."""
    import torch

    from streaming_ssl import build

    device, amp = build.setup_runtime(cfg)
    cl = build.uses_channels_last(cfg, device) if channels_last is None else channels_last
    model = build.build_model(cfg, build.model_stem(cfg, splits)).to(device)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        model.compile()  # as build_run with train.compile
    return model, build.build_augment(cfg, splits), device, amp, cl


def reference_workers(device) -> int:
    """DataLoader workers of the reference: the machine's usable cores; on CUDA at most 16, as the authors' main.py."""
    from streaming_ssl.device import usable_cores

    cores = usable_cores()
    return min(cores, 16) if torch_device(device).type == "cuda" else cores


def with_train(splits, train):
    """The splits with another training subset (for build.stream_from_config)."""
    return dataclasses.replace(splits, train=train)


def iter_clock(device, warmup: int, total: int):
    """An Avalanche plugin recording (perf_counter, samples seen) after every update of `total`. The device is
    synchronised only at the two ends of the measured window (after update `warmup` and after the last), so that
    on CUDA the updates pipeline as in training (the host queues one while the device runs the last): the window's
    mean step time is exact; its per-step spread is the host's view there. On a CPU every mark is exact. Also
    keeps the loss of the first update (`first_loss`, read before the window: the cases that train the same model
    on the same patches, recomputed or compiled, must give the same one)."""
    from avalanche.core import SupervisedPlugin

    ends = {max(warmup, 1) - 1, total - 1}

    class IterClock(SupervisedPlugin):
        def __init__(self) -> None:
            super().__init__()
            self.marks: list[tuple[float, int]] = []
            self.first_loss: float | None = None

        def after_training_iteration(self, strategy, **kwargs) -> None:
            if not self.marks:  # the first update, before the measured window (a host read there costs nothing)
                self.first_loss = float(strategy.loss.detach().float().reshape(-1)[0])
            if len(self.marks) in ends:
                sync(device)
            self.marks.append((time.perf_counter(), strategy.samples_seen))
            if len(self.marks) == max(warmup, 1):
                end_of_warmup(device)

        def intervals(self, warmup: int) -> list[float]:
            t = [m[0] for m in self.marks]
            return [t[i] - t[i - 1] for i in range(max(warmup, 1), len(t))]

        def samples_per_s(self, warmup: int) -> float:
            (t0, s0), (t1, s1) = self.marks[max(warmup, 1) - 1], self.marks[-1]
            return (s1 - s0) / (t1 - t0)

    return IterClock()


def bench_strategy(cfg, *, model, augment, device, amp, channels_last: bool, total_updates: int, plugins=(),
                   metric=None):
    """build.build_strategy with build.build_optimizer (over the plugins' trainable modules too), no loggers."""
    from avalanche.training.plugins import EvaluationPlugin

    from streaming_ssl import build

    evaluator = EvaluationPlugin(metric, loggers=[]) if metric is not None else EvaluationPlugin(loggers=[])
    extra = [m for p in plugins for m in getattr(p, "trainable_modules", [])]
    return build.build_strategy(cfg, model=model, optimizer=build.build_optimizer(cfg, model, extra), augment=augment,
                                total_updates=total_updates, device=device, amp_dtype=amp,
                                channels_last=channels_last, plugins=list(plugins), evaluator=evaluator)


def strategy_step_times(width: float, sizes: Sizes, device, splits, steps: int, fp16_host_skip: bool = False,
                        train_log: Path | None = None, **settings) -> tuple[list[float], dict]:
    """Our end-to-end step: EMPSSLStrategy.train over one in-memory experience of (warmup+steps) batches.
    `settings`: Config keys of bench_config (model__recompute_stages=2, train__compile=True, cl__replay__policy=...;
    the continual-learning methods of the cl section are built as a run builds them). `fp16_host_skip`: turn
    LARS's amp contract off, so that float16's GradScaler decides a skip on the host (torch's default). `train_log`:
    a folder where plugins.TrainLog logs every update (train.jsonl and TensorBoard), as a run does every
    train.log_every updates."""
    from streaming_ssl import build
    from streaming_ssl.cl import build_cl_plugins
    from streaming_ssl.plugins import TrainLog

    cfg = bench_config(width, sizes, device, **settings)
    train = first_n(splits.train, (sizes.warmup + steps) * sizes.batch)
    stream = build.stream_from_config(cfg, with_train(splits, train))
    model, augment, device, amp, cl = build_parts(cfg, splits)
    methods = build_cl_plugins(cfg, model=model, train_size=len(train), device=device)
    clock = iter_clock(device, sizes.warmup, stream.n_updates(sizes.batch))
    logs = [] if train_log is None else [TrainLog(train_log, every=1, tensorboard=True)]
    strategy = bench_strategy(cfg, model=model, augment=augment, device=device, amp=amp, channels_last=cl,
                              total_updates=stream.n_updates(sizes.batch), plugins=[*methods, *logs, clock])
    if fp16_host_skip:
        strategy.optimizer._step_supports_amp_scaling = False  # (an instance attribute over LARS's class attribute)
    try:
        strategy.train(iter(stream), eval_streams=[])
    finally:
        for plugin in logs:
            plugin.close()
    info = {"channels_last": cl, "amp_dtype": str(amp), "recompute_stages": cfg.model.recompute_stages,
            "recompute_bn_relu": cfg.model.recompute_bn_relu, "compiled": cfg.train.compile,
            "augment_compiled": cfg.augment.compile, "augment_sync_free": strategy.augment.sync_free,
            "loss_finite": bool(math.isfinite(float(strategy.loss.detach().reshape(-1)[0]))),
            "first_loss": clock.first_loss}
    if strategy.grad_scaler is not None:  # float16: updates the loss scaling skipped (warm-up included), and where
        info["skipped_updates"] = strategy.counters.skipped_updates  # the skip was decided
        opt = strategy.optimizer
        buckets = opt.multi_tensor(device) if hasattr(opt, "multi_tensor") else False
        info["lars_amp_contract"] = bool(getattr(opt, "_step_supports_amp_scaling", False))
        info["fp16_skip_on"] = "device" if info["lars_amp_contract"] and buckets else "host"
    if methods:  # what the methods did over the whole run (warm-up included): images replayed, extra forwards
        info["counters"] = {"buffer_images": strategy.counters.buffer_images,
                            "extra_forwards": strategy.counters.extra_forwards, "updates": strategy.global_step}
    return clock.intervals(sizes.warmup), info


def step_result(times: list[float], sizes: Sizes, **extra) -> dict:
    """Throughput of the measured steps and this process's peak resident memory so far (MB)."""
    mean = statistics.fmean(times)
    per = sizes.batch * sizes.patches
    peak = read_proc_memory().get("VmHWM_kB")
    return {"seconds_per_step": mean, "step_seconds": stats(times), "patches_per_s": per / mean,
            "images_per_s": sizes.batch / mean, "steps": len(times), "warmup_steps": sizes.warmup,
            "peak_rss_MB": None if peak is None else peak / 1024, **extra}


def workers_peak_rss_MB(loader_iter) -> float | None:
    """Sum of the VmHWM of a DataLoader iterator's worker processes (they share the parent's pages copy-on-write,
    so this over-counts what they add)."""
    total, pids = 0, [w.pid for w in getattr(loader_iter, "_workers", [])]
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            return None
    return total / 1024 if pids else None


def read_proc_memory() -> dict:
    """VmHWM and VmRSS of this process in kB (from /proc/self/status), plus psutil's rss when installed."""
    out: dict = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key + "_kB"] = int(rest.split()[0])
    except OSError:
        pass
    try:
        import psutil

        out["psutil_rss_kB"] = psutil.Process().memory_info().rss // 1024
    except ImportError:
        pass
    import resource

    out["ru_maxrss_kB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return out


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs); False when not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------ cases
def case_reference(width: float, sizes: Sizes, device, splits, ctx: dict) -> dict:
    import torch

    import reference_pipeline as ref

    total = sizes.warmup + sizes.steps
    train = first_n(splits.train, total * sizes.batch)
    images = train.images.permute(0, 2, 3, 1).contiguous().numpy()  # PIL wants HWC
    dataset = ref.MultiPatchPILDataset(images, train.targets.numpy(), sizes.patches,
                                       transform=ref.patch_transform(splits.image_size, splits.mean, splits.std))
    import streaming_ssl.device as sdev

    wanted = sizes.ref_workers or reference_workers(device)
    free = sdev.shm_free_bytes()
    workers = sdev.workers_within_shm(wanted, sizes.batch * sizes.patches * 3 * splits.image_size ** 2 * 4, free)
    shm_note = {}
    if workers < wanted:
        shm_note = {"dataloader_workers_wanted": wanted, "shm_free_MB": round(free / 2**20),
                    "workers_note": f"/dev/shm has {free / 2**20:.0f} MB free: {workers} DataLoader workers instead of "
                            f"{wanted}, so the reference is slower here than with room for all"}
        log.warning("reference: %s", shm_note["workers_note"])
    loader = ref.make_loader(dataset, sizes.batch, workers=workers, seed=0)
    model, _, device, _, _ = build_parts(bench_config(width, sizes, device), splits, channels_last=False)
    opt = ref.make_optimizer(model, lr=0.3)
    times, loss = [], None
    batches = iter(loader)
    sync(device)
    last = time.perf_counter()
    for step in range(total):
        patch_list, _ = next(batches)
        loss = ref.reference_step(model, opt, patch_list, sizes.patches, device=device,
                                  lr=ref.cosine_lr(step, total, 0.3))
        sync(device)
        now = time.perf_counter()
        if step >= sizes.warmup:
            times.append(now - last)
        elif step == sizes.warmup - 1:
            end_of_warmup(device)
        last = now
    workers_peak = workers_peak_rss_MB(batches)
    del batches
    return step_result(times, sizes, dataloader_workers=workers, workers_peak_rss_MB=workers_peak,
                       channels_last=False, amp_dtype="None (fp32)",
                       loss_finite=bool(torch.isfinite(loss).item()), **shm_note)


def case_ours(width: float, sizes: Sizes, device, splits, ctx: dict) -> dict:
    times, info = strategy_step_times(width, sizes, device, splits, sizes.steps)
    return step_result(times, sizes, **info)


def case_ours_lean(width: float, sizes: Sizes, device, splits, ctx: dict) -> dict:
    times, info = strategy_step_times(width, sizes, device, splits, sizes.steps, model__recompute_bn_relu=True)
    return step_result(times, sizes, **info)


def case_ours_lowmem(width: float, sizes: Sizes, device, splits, ctx: dict) -> dict:
    times, info = strategy_step_times(width, sizes, device, splits, sizes.steps,
                                      model__recompute_stages=sizes.lowmem_stages,
                                      model__recompute_bn_relu=sizes.lowmem_bn_relu)
    return step_result(times, sizes, **info)


def case_ours_compiled(width: float, sizes: Sizes, device, splits, ctx: dict) -> dict:
    times, info = strategy_step_times(width, sizes, device, splits, sizes.steps, train__compile=True)
    return step_result(times, sizes, **info)


def case_ours_compiled_augment(width: float, sizes: Sizes, device, splits, ctx: dict) -> dict:
    times, info = strategy_step_times(width, sizes, device, splits, sizes.steps, augment__compile=True)
    return step_result(times, sizes, **info)


def case_ours_indexed(width: float, sizes: Sizes, device, splits, ctx: dict) -> dict:
    times, info = strategy_step_times(width, sizes, device, splits, sizes.steps, augment__sync_free=False)
    return step_result(times, sizes, **info)


def case_ours_fp32(width: float, sizes: Sizes, device, splits, ctx: dict) -> dict:
    times, info = strategy_step_times(width, sizes, device, splits, sizes.steps, train__precision="fp32")
    return step_result(times, sizes, **info)


def case_ours_fp16(width: float, sizes: Sizes, device, splits, ctx: dict) -> dict:
    times, info = strategy_step_times(width, sizes, device, splits, sizes.steps, train__precision="fp16")
    return step_result(times, sizes, **info)


def case_ours_fp16_hostread(width: float, sizes: Sizes, device, splits, ctx: dict) -> dict:
    times, info = strategy_step_times(width, sizes, device, splits, sizes.steps, fp16_host_skip=True,
                                      train__precision="fp16")
    return step_result(times, sizes, **info)


def replay_step_times(width: float, sizes: Sizes, device, splits, policy: str) -> dict:
    """`ours` with replay: each update appends `batch` buffer images (so trains on twice the stream's patches) from
    a buffer of 2 x batch images kept by `policy`. The buffer is full after update 2; from update 3 on, every update
    also offers its batch to the buffer (MinRed: the features of 3 x batch whole images, in eval mode, and its
    greedy choice of `batch` drops). One more warm-up update than `ours` (the first choice and the shapes of its
    forward), so that every measured update replays and chooses. patches_per_s counts the stream's patches, as in
    `ours`, so `ours_replay` over `ours_minred` is what MinRed's choice costs beside a reservoir."""
    sizes = dataclasses.replace(sizes, warmup=sizes.warmup + 1)
    times, info = strategy_step_times(width, sizes, device, splits, sizes.steps, cl__replay__policy=policy,
                                      cl__replay__size=2 * sizes.batch, cl__replay__batch=sizes.batch)
    return step_result(times, sizes, replay_policy=policy, replay_size=2 * sizes.batch, replay_batch=sizes.batch,
                       **info)


def case_ours_replay(width: float, sizes: Sizes, device, splits, ctx: dict) -> dict:
    return replay_step_times(width, sizes, device, splits, "reservoir")


def case_ours_minred(width: float, sizes: Sizes, device, splits, ctx: dict) -> dict:
    return replay_step_times(width, sizes, device, splits, "minred")


def case_ours_trainlog(width: float, sizes: Sizes, device, splits, ctx: dict) -> dict:
    """`ours` with the training curves logged at every update (TrainLog, train.log_every=1, TensorBoard on): the
    worst case of what logging adds to an update (runs log every 20 by default). The values stay on the device
    until a flush every 50 rows, which falls inside the measured steps when there are more than 50."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="speed_trainlog_") as folder:
        times, info = strategy_step_times(width, sizes, device, splits, sizes.steps, train_log=Path(folder))
        rows = len((Path(folder) / "train.jsonl").read_text().splitlines())
    return step_result(times, sizes, train_log_rows=rows, **info)


def case_model_only(width: float, sizes: Sizes, device, splits, ctx: dict) -> dict:
    import torch

    from streaming_ssl import build
    from streaming_ssl.device import autocast
    from streaming_ssl.lars import cosine_lr, set_lr
    from streaming_ssl.objective import emp_ssl_loss

    cfg = bench_config(width, sizes, device)
    model, augment, device, amp, cl = build_parts(cfg, splits)
    opt = build.build_optimizer(cfg, model)
    gen = torch.Generator(device=device).manual_seed(0)
    patches = augment.to(device)(splits.train.images[: sizes.batch].to(device), gen)
    if cl:
        patches = patches.contiguous(memory_format=torch.channels_last)
    total = sizes.warmup + sizes.steps
    times, loss = [], None
    sync(device)
    last = time.perf_counter()
    for step in range(total):
        opt.zero_grad(set_to_none=True)
        with autocast(device, amp):
            _, z = model(patches)
        loss, _ = emp_ssl_loss(z, sizes.patches)
        loss.backward()
        set_lr(opt, cosine_lr(step, total, cfg.optim.lr))
        opt.step()
        if step in (sizes.warmup - 1, total - 1):  # the window's ends only, as iter_clock: steps pipeline on CUDA
            sync(device)
        now = time.perf_counter()
        if step >= sizes.warmup:
            times.append(now - last)
        elif step == sizes.warmup - 1:
            end_of_warmup(device)
        last = now
    finite = bool(torch.isfinite(loss).item())
    return step_result(times, sizes, channels_last=cl, amp_dtype=str(amp), loss_finite=finite,
                       loss="emp_ssl_loss (the real objective); only the input pipeline is missing",
                       **lars_step_times(opt, device))


def lars_step_times(opt, device, calls: int = 9) -> dict:
    """The LARS step alone, on the gradients the last update left, as multi-tensor buckets and as the per-parameter
    loop (each call synchronised; alternating, so that both see the same machine); `opt` is left as it was."""
    chosen = opt.foreach
    times: dict = {True: [], False: []}
    for i in range(calls + 1):
        for foreach in (True, False):
            opt.foreach = foreach
            sync(device)
            t0 = time.perf_counter()
            opt.step()
            sync(device)
            if i:  # the first round warms both up
                times[foreach].append(time.perf_counter() - t0)
    opt.foreach = chosen
    fast, loop = statistics.median(times[True]), statistics.median(times[False])
    return {"lars_step_ms": {"foreach": 1e3 * fast, "loop": 1e3 * loop}, "lars_loop_over_foreach": loop / fast}


def _time_calls(fn, calls: int, warmup: int, device) -> list[float]:
    out = []
    for i in range(warmup + calls):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            out.append(time.perf_counter() - t0)
    return out


def case_objective(width: float, sizes: Sizes, device, splits, ctx: dict) -> dict:
    import torch
    import torch.nn.functional as F

    import reference_pipeline as ref
    from streaming_ssl.objective import emp_ssl_loss

    gen = torch.Generator().manual_seed(0)
    z0 = F.normalize(torch.randn(sizes.patches * sizes.batch, sizes.proj_dim, generator=gen), dim=1).to(device)
    z = z0.clone().requires_grad_(True)

    def ours():
        z.grad = None
        loss, _ = emp_ssl_loss(z, sizes.patches)
        loss.backward()

    def reference():
        z.grad = None
        loss, _, _ = ref.reference_loss(z, sizes.patches)
        loss.backward()

    warm = max(1, sizes.warmup)
    t_ours = _time_calls(ours, sizes.calls, warm, device)
    t_ref = _time_calls(reference, max(2, sizes.calls // 3), warm, device)
    return {"seconds_per_call": statistics.median(t_ours), "call_seconds": stats(t_ours),
            "reference_seconds_per_call": statistics.median(t_ref), "reference_call_seconds": stats(t_ref),
            "reference_over_ours": statistics.median(t_ref) / statistics.median(t_ours),
            "shape": [sizes.patches, sizes.batch, sizes.proj_dim], "what": "loss forward + backward, float32"}


def case_augment(width: float, sizes: Sizes, device, splits, ctx: dict) -> dict:
    import torch

    import reference_pipeline as ref

    _, augment, device, _, _ = build_parts(bench_config(width, sizes, device), splits)
    augment = augment.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    x = splits.train.images[: sizes.batch].to(device)
    t_ours = _time_calls(lambda: augment(x, gen), sizes.calls, max(1, sizes.warmup), device)
    # the reference chain on one batch, serially in this process (what one DataLoader worker does)
    images = splits.train.images[: sizes.batch].permute(0, 2, 3, 1).contiguous().numpy()
    dataset = ref.MultiPatchPILDataset(images, splits.train.targets[: sizes.batch].numpy(), sizes.patches,
                                       transform=ref.patch_transform(splits.image_size, splits.mean, splits.std))

    def reference():
        samples = [dataset[i] for i in range(len(dataset))]
        torch.utils.data.default_collate(samples)

    t_ref = _time_calls(reference, sizes.ref_aug_calls, 0, device)
    per = sizes.batch * sizes.patches
    med, med_ref = statistics.median(t_ours), statistics.median(t_ref)
    return {"seconds_per_batch": med, "batch_seconds": stats(t_ours), "patches_per_s": per / med,
            "reference_serial_seconds_per_batch": med_ref, "reference_serial_batch_seconds": stats(t_ref),
            "reference_serial_patches_per_s": per / med_ref, "kornia": _kornia_side(x, sizes, splits, device, med),
            "what": f"{sizes.batch} uint8 images -> {per} patches; reference = PIL chain + collate in one process"}


def kornia_augment(image_size: int, mean, std, device):
    """The reference chain written with kornia.augmentation (batched, per-sample parameters), for comparison."""
    import torch
    import kornia.augmentation as K

    return torch.nn.Sequential(
        K.RandomResizedCrop((image_size, image_size), scale=(0.25, 0.25), ratio=(1.0, 1.0)),
        K.RandomHorizontalFlip(p=0.5),
        K.ColorJitter(0.4, 0.4, 0.4, 0.2, p=0.8),  # kornia's torchvision-aligned jitter
        K.RandomGrayscale(p=0.2),
        K.RandomGaussianBlur((3, 3), (0.1, 2.0), p=0.1),
        K.RandomSolarize(thresholds=0.0, additions=0.0, p=0.1),  # threshold exactly 0.5 = 128/255
        K.Normalize(torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)),
    ).to(device)


def _kornia_side(x, sizes: Sizes, splits, device, ours_seconds: float):
    """kornia.augmentation on the same batch (uint8 -> float, one copy per patch, the chain), or why not measured."""
    try:
        import kornia
    except ImportError:
        return "not measured (optional, not installed)"
    aug = kornia_augment(splits.image_size, tuple(splits.mean), tuple(splits.std), device)

    def call():
        aug(x.float().div(255).repeat_interleave(sizes.patches, 0))

    t = _time_calls(call, sizes.calls, max(1, sizes.warmup), device)
    med = statistics.median(t)
    return {"version": kornia.__version__, "seconds_per_batch": med, "batch_seconds": stats(t),
            "patches_per_s": sizes.batch * sizes.patches / med, "kornia_over_ours_seconds": med / ours_seconds}


def _online_side(kind: str, width: float, sizes: Sizes, device, splits, data) -> dict:
    from streaming_ssl import build

    k = sizes.online_batch
    cfg = bench_config(width, sizes, device, batch=k, stream__mode="online" if kind == "online" else "class_incremental",
                       stream__n_experiences=1, stream__online_base="class_incremental",
                       stream__online_experience_size=k)
    stream = build.stream_from_config(cfg, with_train(splits, data))
    model, augment, device, amp, cl = build_parts(cfg, splits)
    clock = iter_clock(device, sizes.warmup, stream.n_updates(k))
    strategy = bench_strategy(cfg, model=model, augment=augment, device=device, amp=amp, channels_last=cl,
                              total_updates=stream.n_updates(k), plugins=[clock])
    t0 = time.perf_counter()
    strategy.train(iter(stream), eval_streams=[])
    wall = time.perf_counter() - t0
    return {"samples_per_s": clock.samples_per_s(sizes.warmup), "training_experiences": len(stream),
            "updates": len(clock.marks), "wall_seconds_incl_warmup": wall}


def case_online(width: float, sizes: Sizes, device, splits, ctx: dict) -> dict:
    from streaming_ssl.build import per_class_subset

    data = per_class_subset(splits.train, sizes.online_per_class)
    order = ("online", "one_experience") if ctx.get("repeat_index", 0) % 2 == 0 else ("one_experience", "online")
    sides = {kind: _online_side(kind, width, sizes, device, splits, data) for kind in order}
    return {"online": sides["online"], "one_experience": sides["one_experience"], "order": list(order),
            "samples": len(data), "batch_size": sizes.online_batch, "mini_experience_size": sizes.online_batch,
            "online_over_one_experience": sides["online"]["samples_per_s"] / sides["one_experience"]["samples_per_s"],
            "warmup_updates_excluded": max(sizes.warmup, 1)}


def case_probe(width: float, sizes: Sizes, device, splits, ctx: dict) -> dict:
    from streaming_ssl import build
    from streaming_ssl.probe import extract_features, linear_probe_accuracy

    cfg = bench_config(width, sizes, device, eval__probe_epochs=sizes.probe_epochs, eval__probe_weight_decay=5e-4,
                       eval__batch_size=sizes.extract_batch, eval__patches=0)
    ptr = build.per_class_subset(splits.train, sizes.probe_train_per_class)
    pte = build.per_class_subset(splits.test, sizes.probe_test_per_class)

    def evaluate() -> dict:
        model, augment, dev, amp, cl = build_parts(cfg, splits)

        def feats(images):
            return extract_features(model, images, augment, device=dev, batch_size=cfg.eval.batch_size,
                                    patches=cfg.eval.patches, amp_dtype=amp, channels_last=cl, seed=0)

        feats(ptr.images[: min(len(ptr), sizes.extract_batch)])  # warm-up batch
        t0 = time.perf_counter()
        ftr = feats(ptr.images)
        t1 = time.perf_counter()
        fte = feats(pte.images)
        t2 = time.perf_counter()
        acc, _ = linear_probe_accuracy(ftr, ptr.targets, fte, pte.targets, splits.num_classes,
                                       **build.probe_kwargs(cfg))
        t3 = time.perf_counter()
        return {"extract_train_seconds": t1 - t0, "extract_test_seconds": t2 - t1, "probe_fit_seconds": t3 - t2,
                "eval_seconds": t3 - t0, "probe_accuracy_random_init": acc}

    train_first = ctx.get("repeat_index", 0) % 2 == 1
    if train_first:
        times, _ = strategy_step_times(width, sizes, device, splits, sizes.steps)
        ev = evaluate()
    else:
        ev = evaluate()
        times, _ = strategy_step_times(width, sizes, device, splits, sizes.steps)
    step = statistics.fmean(times)
    n_tr, n_te = len(ptr), len(pte)
    train_pass = math.ceil(n_tr / sizes.batch) * step
    full_eval = (ev["extract_train_seconds"] / n_tr * CIFAR10_TRAIN + ev["extract_test_seconds"] / n_te * CIFAR10_TEST
                 + ev["probe_fit_seconds"] * CIFAR10_TRAIN / n_tr)
    full_pass = math.ceil(CIFAR10_TRAIN / sizes.batch) * step
    return {**ev, "train_images": n_tr, "test_images": n_te, "probe_epochs": sizes.probe_epochs,
            "train_step_seconds": step, "train_step_stats": stats(times),
            "train_pass_seconds": train_pass, "eval_over_pass": ev["eval_seconds"] / train_pass,
            "cifar10_extrapolated": {"eval_seconds": full_eval, "train_pass_seconds": full_pass,
                                     "eval_over_pass": full_eval / full_pass,
                                     "how": "extraction linear in images (50k train + 10k test), probe fit linear in "
                                            "train images, one pass = 500 steps of the measured step time"},
            "train_pass_how": "ceil(train_images / batch) x mean measured step (EMPSSLStrategy), same process",
            "order": "train then eval" if train_first else "eval then train"}


def memory_probe(device, readings: list[dict]):
    """An Avalanche plugin reading this process's memory after each experience, once it is evaluated."""
    from avalanche.core import SupervisedPlugin

    class MemoryProbe(SupervisedPlugin):
        runs_after_evaluator = True  # EMPSSLStrategy runs it after the evaluation plugin

        def after_training_exp(self, strategy, **kwargs) -> None:
            sync(device)
            readings.append({"experience": strategy.stream_step, "updates": strategy.global_step,
                             **read_proc_memory()})

    return MemoryProbe()


def case_memory(width: float, sizes: Sizes, device, splits, ctx: dict) -> dict:
    from streaming_ssl import build
    from streaming_ssl.evaluation import ProbeMetric

    cfg = bench_config(width, sizes, device, stream__mode="class_incremental", stream__n_experiences=5,
                       eval__train_per_class=sizes.memory_eval_train_per_class,
                       eval__test_per_class=sizes.memory_eval_test_per_class, eval__patches=0,
                       eval__batch_size=sizes.extract_batch, eval__probe_epochs=sizes.memory_probe_epochs,
                       eval__knn_k=min(20, sizes.memory_eval_train_per_class * splits.num_classes))
    data = build.per_class_subset(splits.train, sizes.memory_per_class)
    stream = build.stream_from_config(cfg, with_train(splits, data))
    model, augment, device, amp, cl = build_parts(cfg, splits)
    evaluator = build.build_evaluator(cfg, splits, stream, augment, device=device, amp_dtype=amp, channels_last=cl)
    readings: list[dict] = []
    strategy = bench_strategy(cfg, model=model, augment=augment, device=device, amp=amp, channels_last=cl,
                              total_updates=stream.n_updates(sizes.batch), plugins=[memory_probe(device, readings)],
                              metric=ProbeMetric(evaluator, model))
    before = read_proc_memory()
    reset = reset_peak_rss()
    strategy.train(iter(stream), eval_streams=[])

    def growth(key: str):
        if len(readings) < 2 or key not in readings[0]:
            return None
        return 100.0 * (readings[-1][key] - readings[0][key]) / readings[0][key]

    return {"per_experience": readings, "before_training": before, "peak_reset_ok": reset,
            "experiences": len(readings), "images_per_experience": stream.step_sizes,
            "peak_growth_pct": growth("VmHWM_kB"), "rss_growth_pct": growth("VmRSS_kB"),
            "evaluator": "whole-image linear probe + kNN after every experience",
            "source": "/proc/self/status (VmHWM, VmRSS)" + (", psutil" if "psutil_rss_kB" in before else "")}


CASE_FUNCS = {"reference": case_reference, "ours": case_ours, "model_only": case_model_only,
              "ours_lean": case_ours_lean, "ours_lowmem": case_ours_lowmem, "ours_compiled": case_ours_compiled,
              "ours_compiled_augment": case_ours_compiled_augment, "ours_indexed": case_ours_indexed,
              "ours_fp32": case_ours_fp32, "ours_fp16": case_ours_fp16,
              "ours_fp16_hostread": case_ours_fp16_hostread, "ours_replay": case_ours_replay,
              "ours_minred": case_ours_minred, "ours_trainlog": case_ours_trainlog,
              "objective": case_objective, "augment": case_augment, "online": case_online, "probe": case_probe,
              "memory": case_memory}


def run_case(case: str, width: float, device_name: str, sizes: Sizes, args, repeat_index: int, allocator: str) -> dict:
    """Run one case in this process and return its result row."""
    import torch

    from streaming_ssl.device import usable_cores

    torch.set_num_threads(args.threads or usable_cores())
    device = torch.device(device_name)
    splits = None if case == "objective" else load_cifar(args.data)  # the objective needs no images
    row = {"case": case, "width": width, "device": device_name, "allocator": allocator, "repeat": repeat_index,
           "threads": torch.get_num_threads(), "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
           "ld_preload": os.environ.get("LD_PRELOAD"),
           "loadavg_start": os.getloadavg()[0]}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    _CUDA_WARMUP_PEAK["bytes"] = 0
    t0 = time.perf_counter()
    try:
        row.update(CASE_FUNCS[case](width, sizes, device, splits, {"repeat_index": repeat_index}))
    except Exception as err:  # a failed case is reported, the others still run
        row["error"] = f"{type(err).__name__}: {err}"
        row["traceback"] = traceback.format_exc(limit=8)
    row["case_wall_seconds"] = time.perf_counter() - t0
    if device.type == "cuda":  # tensors of this case only (a fresh process per case in full mode)
        since = torch.cuda.max_memory_allocated(device)  # since the warm-up's end, where the case marks one
        row["peak_cuda_MB"] = max(since, _CUDA_WARMUP_PEAK["bytes"]) / 2**20
        if _CUDA_WARMUP_PEAK["bytes"]:  # the measured steps alone: what training needs once kernels are chosen
            row["peak_cuda_steady_MB"] = since / 2**20
        row["peak_cuda_reserved_MB"] = torch.cuda.max_memory_reserved(device) / 2**20
    row["loadavg_end"] = os.getloadavg()[0]
    return row


# ------------------------------------------------------------------------------------------ summary
PRIMARY = {"reference": "patches_per_s", "ours": "patches_per_s", "model_only": "patches_per_s",
           "ours_lean": "patches_per_s", "ours_lowmem": "patches_per_s", "ours_compiled": "patches_per_s",
           "ours_compiled_augment": "patches_per_s", "ours_indexed": "patches_per_s", "ours_fp32": "patches_per_s",
           "ours_fp16": "patches_per_s", "ours_fp16_hostread": "patches_per_s", "ours_replay": "patches_per_s",
           "ours_minred": "patches_per_s", "ours_trainlog": "patches_per_s",
           "objective": "seconds_per_call", "augment": "seconds_per_batch", "online": "online_over_one_experience",
           "probe": "eval_over_pass", "memory": "peak_growth_pct"}


def _target_speedup(width: float, device: str = "cpu") -> float:
    """ours / reference: on CPUs the network bounds it (bf16 vs fp32); on CUDA the reference's PIL input pipeline."""
    if device == "cuda":
        return 4.0
    return 2.5 if width >= 1.0 else 4.0


def _target_over_model_only(device: str) -> float:
    return 0.95 if device == "cuda" else 0.92


def _ratio(rows_by_case: dict, num: tuple[str, str], den: tuple[str, str] | None, target, op: str, **extra) -> dict:
    """Ratio num/den per repeat (both sides from the same repeat), summarised; den None: num is already a ratio."""
    vals = []
    for rep, row in rows_by_case.get(num[0], {}).items():
        a = row.get(num[1])
        if den is None:
            if a is not None:
                vals.append(a)
            continue
        other = rows_by_case.get(den[0], {}).get(rep)
        b = other.get(den[1]) if other else None
        if a is not None and b:
            vals.append(a / b)
    out = {**stats(vals), "values": vals, "target": target, "op": op, **extra}
    if vals and target is not None:
        med = out["median"]
        out["met"] = med >= target if op == ">=" else med <= target
    return out


def _kornia_rows(by_case: dict) -> dict:
    """The augment rows' kornia side as rows of their own (for _ratio), when kornia was measured."""
    reps = {rep: row["kornia"] for rep, row in by_case.get("augment", {}).items() if isinstance(row.get("kornia"), dict)}
    return {"augment": reps}


def summarize(rows: list[dict]) -> dict:
    groups: dict = {}
    for row in rows:
        if "error" in row:
            continue
        key = f"{row['device']}|width={row['width']}|{row['allocator']}"
        groups.setdefault(key, {}).setdefault(row["case"], {})[row["repeat"]] = row
    summary: dict = {}
    for key, by_case in groups.items():
        dev, width = key.split("|")[0], float(key.split("|")[1].split("=")[1])
        cases = {case: {PRIMARY[case]: stats([r[PRIMARY[case]] for r in reps.values() if r.get(PRIMARY[case]) is not None])}
                 for case, reps in by_case.items()}
        ratios = {
            "ours_over_reference_patches_per_s": _ratio(by_case, ("ours", "patches_per_s"),
                                                        ("reference", "patches_per_s"), _target_speedup(width, dev), ">="),
            "ours_over_model_only": _ratio(by_case, ("ours", "patches_per_s"), ("model_only", "patches_per_s"),
                                           _target_over_model_only(dev), ">="),
            "ours_lean_over_ours_patches_per_s": _ratio(by_case, ("ours_lean", "patches_per_s"),
                                                        ("ours", "patches_per_s"), None, "info"),
            "ours_lowmem_over_reference_patches_per_s": _ratio(by_case, ("ours_lowmem", "patches_per_s"),
                                                               ("reference", "patches_per_s"), None, "info"),
            "ours_compiled_over_reference_patches_per_s": _ratio(by_case, ("ours_compiled", "patches_per_s"),
                                                                 ("reference", "patches_per_s"), _target_speedup(width, dev),
                                                                 ">="),
            "ours_compiled_over_ours": _ratio(by_case, ("ours_compiled", "patches_per_s"), ("ours", "patches_per_s"),
                                              None, "info"),
            "ours_compiled_augment_over_ours": _ratio(by_case, ("ours_compiled_augment", "patches_per_s"),
                                                      ("ours", "patches_per_s"), None, "info"),
            "ours_over_ours_indexed": _ratio(by_case, ("ours", "patches_per_s"), ("ours_indexed", "patches_per_s"),
                                             None, "info"),
            "ours_over_ours_fp32": _ratio(by_case, ("ours", "patches_per_s"), ("ours_fp32", "patches_per_s"),
                                          None, "info"),
            "ours_over_ours_fp16": _ratio(by_case, ("ours", "patches_per_s"), ("ours_fp16", "patches_per_s"),
                                          None, "info"),
            "ours_fp16_over_ours_fp16_hostread": _ratio(by_case, ("ours_fp16", "patches_per_s"),
                                                        ("ours_fp16_hostread", "patches_per_s"), None, "info"),
            "ours_minred_over_ours_replay": _ratio(by_case, ("ours_minred", "patches_per_s"),
                                                   ("ours_replay", "patches_per_s"), None, "info"),
            "ours_trainlog_over_ours": _ratio(by_case, ("ours_trainlog", "patches_per_s"), ("ours", "patches_per_s"),
                                              None, "info"),
            "lars_loop_over_foreach_step_time": _ratio(by_case, ("model_only", "lars_loop_over_foreach"), None, None,
                                                       "info"),
            "peak_rss_ours_over_reference": _ratio(by_case, ("ours", "peak_rss_MB"), ("reference", "peak_rss_MB"),
                                                   0.5 if width >= 1.0 else None, "<="),
            "peak_rss_ours_lean_over_reference": _ratio(by_case, ("ours_lean", "peak_rss_MB"),
                                                        ("reference", "peak_rss_MB"), 0.5 if width >= 1.0 else None,
                                                        "<="),
            "peak_rss_ours_lowmem_over_reference": _ratio(by_case, ("ours_lowmem", "peak_rss_MB"),
                                                          ("reference", "peak_rss_MB"), 0.5 if width >= 1.0 else None,
                                                          "<="),
            "peak_cuda_ours_over_reference": _ratio(by_case, ("ours", "peak_cuda_MB"), ("reference", "peak_cuda_MB"),
                                                    None, "info"),
            "peak_cuda_ours_lowmem_over_reference": _ratio(by_case, ("ours_lowmem", "peak_cuda_MB"),
                                                           ("reference", "peak_cuda_MB"),
                                                           0.5 if width >= 1.0 else None, "<="),
            "peak_cuda_steady_ours_lowmem_over_reference": _ratio(by_case, ("ours_lowmem", "peak_cuda_steady_MB"),
                                                                  ("reference", "peak_cuda_steady_MB"), None, "info"),
            "objective_share_of_step": _ratio(by_case, ("objective", "seconds_per_call"), ("ours", "seconds_per_step"),
                                              0.02, "<="),
            "augment_share_of_step": _ratio(by_case, ("augment", "seconds_per_batch"), ("ours", "seconds_per_step"),
                                            None, "info"),
            "kornia_over_ours_augment_seconds": _ratio(_kornia_rows(by_case), ("augment", "kornia_over_ours_seconds"),
                                                       None, None, "info"),
            "online_over_one_experience": _ratio(by_case, ("online", "online_over_one_experience"), None, 0.8, ">="),
            "probe_eval_over_one_pass": _ratio(by_case, ("probe", "eval_over_pass"), None, 0.1, "<=",
                                               cifar10_extrapolated=stats([
                                                   r["cifar10_extrapolated"]["eval_over_pass"]
                                                   for r in by_case.get("probe", {}).values()])),
            "memory_growth_pct_exp1_to_exp5": _ratio(by_case, ("memory", "peak_growth_pct"), None, 5.0, "<=",
                                                     rss_growth_pct=stats([r["rss_growth_pct"] for r in by_case.get(
                                                         "memory", {}).values() if r.get("rss_growth_pct") is not None])),
        }
        for r in ratios.values():
            if r.get("target") is None:
                r.pop("target", None)
        summary[key] = {"cases": cases, "ratios": {k: v for k, v in ratios.items() if v["n"]}}
    # allocator effect: each allocator / default of each throughput (and peak memory), paired by repeat
    effect: dict = {}
    for key, by_case in groups.items():
        dev, wid, alloc = key.split("|")
        if alloc in ("default", "inherited") or f"{dev}|{wid}|default" not in groups:
            continue
        base = groups[f"{dev}|{wid}|default"]
        out = {}
        for case, metric, invert in (("reference", "patches_per_s", False), ("ours", "patches_per_s", False),
                                     ("model_only", "patches_per_s", False), ("ours_lean", "patches_per_s", False),
                                     ("ours_lowmem", "patches_per_s", False),
                                     ("objective", "seconds_per_call", True), ("augment", "seconds_per_batch", True),
                                     ("reference", "peak_rss_MB", False), ("ours", "peak_rss_MB", False)):
            vals = []
            for rep, row in by_case.get(case, {}).items():
                other = base.get(case, {}).get(rep)
                if other and other.get(metric) and row.get(metric):
                    vals.append(other[metric] / row[metric] if invert else row[metric] / other[metric])
            if vals:
                name = "peak_rss" if metric == "peak_rss_MB" else "speedup"
                out[f"{case}_{name}_{alloc}_over_default"] = {**stats(vals), "values": vals}
        if out:
            effect.setdefault(f"{dev}|{wid}", {}).update(out)
    return {"by_group": summary, "allocator_effect": effect}


def _span(s: dict) -> str:
    return f"[{s['min']:.4g}, {s['max']:.4g}]"


def print_table(result: dict, file=sys.stdout) -> None:
    by_group = result["summary"]["by_group"]
    print(f"\n{'group':<34} {'measure':<36} {'median':>10} {'[min, max]':>22} {'target':>9} {'met':>5}", file=file)
    for key in sorted(by_group):
        g = by_group[key]
        for case, metrics in g["cases"].items():
            for name, s in metrics.items():
                if s.get("n"):
                    print(f"{key:<34} {case + ': ' + name:<36} {s['median']:>10.4g} "
                          f"{_span(s):>22} {'':>9} {'':>5}", file=file)
        for name, s in g["ratios"].items():
            tgt = f"{s['op']}{s['target']}" if "target" in s else ""
            met = {True: "yes", False: "NO"}.get(s.get("met"), "")
            print(f"{key:<34} {name:<36} {s['median']:>10.4g} {_span(s):>22} "
                  f"{tgt:>9} {met:>5}", file=file)
    for key, eff in result["summary"]["allocator_effect"].items():
        for name, s in eff.items():
            print(f"{key + '|allocators':<34} {name:<36} {s['median']:>10.4g} "
                  f"{_span(s):>22}", file=file)
    errors = [r for r in result["rows"] if "error" in r]
    for r in errors:
        print(f"FAILED {r['case']} width {r['width']} {r['device']} {r['allocator']}: {r['error']}", file=file)


# ------------------------------------------------------------------------------------------ driver
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="seconds: width 0.125, batch 8, 4 patches, 2 steps, in-process")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "speed.json"), help="JSON output path")
    p.add_argument("--only", help=f"comma-separated cases to run (default all: {','.join(CASES)}; opt-in: "
                                   f"{','.join(OPT_IN_CASES)})")
    p.add_argument("--widths", help="comma-separated width multipliers (default 0.25,1.0; tiny 0.125)")
    p.add_argument("--repeats", type=int, default=None, help="repeats of every case (default 3; tiny 1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the usable cores)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: the CPU, and CUDA too when present")
    p.add_argument("--allocators", default="default,tuned",
                   help="full mode, comma-separated: default (glibc as is), tuned (the GLIBC_TUNABLES of "
                        "scripts/run.sh), jemalloc, tcmalloc (LD_PRELOAD of the Debian packages' libraries)")
    p.add_argument("--steps", type=int, help="measured steps per training case")
    p.add_argument("--warmup", type=int, help="warm-up steps (excluded, >= 1)")
    p.add_argument("--batch", type=int, help="images per batch")
    p.add_argument("--patches", type=int, help="patches per image")
    p.add_argument("--ref-workers", type=int, help="DataLoader workers of the reference (default: cores)")
    p.add_argument("--data", help="data root (default: $STREAMING_SSL_DATA)")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed per case subprocess")
    p.add_argument("--order", choices=("width", "case"), default="width",
                   help="width: every case at one width, then the next width; case: every width of a case, then the "
                        "next case (the cases listed last are the ones a time limit cuts; bench/gpu_check.py)")
    # worker mode (one case, one JSON line on stdout)
    p.add_argument("--case", choices=CASES + OPT_IN_CASES, help=argparse.SUPPRESS)
    p.add_argument("--width", type=float, help=argparse.SUPPRESS)
    p.add_argument("--repeat-index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--allocator-label", default="inherited", help=argparse.SUPPRESS)
    p.add_argument("--run-device", default="cpu", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warmup is not None and args.warmup < 1:
        p.error("--warmup must be >= 1")
    return args


def sizes_from(args) -> Sizes:
    sizes = dataclasses.replace(TINY if args.tiny else Sizes())
    for name in ("steps", "warmup", "batch", "patches", "ref_workers"):
        if getattr(args, name) is not None:
            setattr(sizes, name, getattr(args, name))
    return sizes


def devices_from(args) -> list[str]:
    import torch

    if args.device == "cpu":
        return ["cpu"]
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but no CUDA device is visible")
        return ["cuda"]
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def meta(args, sizes: Sizes, mode: str) -> dict:
    import torch

    from streaming_ssl.device import cpu_kind, cpu_supports_bf16, usable_cores

    try:
        import psutil  # noqa: F401

        has_psutil = True
    except ImportError:
        has_psutil = False
    return {"mode": mode, "argv": sys.argv[1:], "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "python": platform.python_version(), "torch": torch.__version__, "cpu": cpu_kind(), "cores": usable_cores(),
            "threads": args.threads or usable_cores(), "tunables": TUNABLES, "psutil": has_psutil,
            "loadavg_start": os.getloadavg(), "sizes": dataclasses.asdict(sizes),
            "notes": {
                "reference_model": "the reference case reuses streaming_ssl.models.EMPSSLModel (same layer shapes as "
                                   "the authors' ResNet-18-cifar + 512->4096->4096->1024 projector), in NCHW and fp32, "
                                   "so the comparison isolates the pipeline (PIL augmentation in DataLoader workers, "
                                   "d x d logdet objective, SGD wrapped by LARS)",
                "model_only": "forward + emp_ssl_loss + backward + LARS step on pre-made channels_last patches",
                "precision": "reference: fp32, as the authors' code; ours, model_only: bf16 autocast on CUDA and on CPUs "
                             "with native bf16 (this CPU: " + ("bf16" if cpu_supports_bf16() else "fp32") + "), "
                             "else fp32; each row's amp_dtype says which",
                "kornia": "augment case: kornia.augmentation doing the reference chain, when kornia is installed",
                "ratios": "each ratio pairs both sides from the same repeat and allocator; median and [min, max]",
            }}


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    tmp.replace(out)


def worker_main(args) -> int:
    logging.basicConfig(level=logging.WARNING)
    row = run_case(args.case, args.width, args.run_device, sizes_from(args), args, args.repeat_index,
                   args.allocator_label)
    print(RESULT_PREFIX + json.dumps(row, default=str), flush=True)
    return 0


def preload_path(allocator: str) -> str:
    """Absolute path of the allocator library to LD_PRELOAD; SystemExit naming the package when it is missing."""
    name = PRELOAD[allocator]
    for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib"):
        if Path(d, name).exists():
            return str(Path(d, name))
    package = {"jemalloc": "libjemalloc2", "tcmalloc": "libtcmalloc-minimal4"}[allocator]
    raise SystemExit(f"--allocators {allocator}: {name} not found; install it (Debian: apt-get install {package})")


def _result_row(stdout: str) -> dict | None:
    """The row a worker printed (its last RESULT_PREFIX line), or None."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    return None


def subprocess_row(case: str, width: float, device: str, allocator: str, rep: int, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", case, "--width", str(width), "--run-device", device,
           "--repeat-index", str(rep), "--allocator-label", allocator]
    for name in ("steps", "warmup", "batch", "patches", "ref_workers", "threads", "data"):
        value = getattr(args, name)
        if value is not None:
            cmd += [f"--{name.replace('_', '-')}", str(value)]
    env = dict(os.environ)
    env.pop("GLIBC_TUNABLES", None)
    env.pop("LD_PRELOAD", None)
    if allocator == "tuned":
        env["GLIBC_TUNABLES"] = TUNABLES
    elif allocator in PRELOAD:
        env["LD_PRELOAD"] = preload_path(allocator)
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout, cwd=str(ROOT))
    except subprocess.TimeoutExpired as exc:  # a worker may hang on its way out after printing its row
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        row = _result_row(out)
        if row is not None:
            return {**row, "note": f"the worker printed this row, then hung until killed at {args.timeout} s"}
        return {"case": case, "width": width, "device": device, "allocator": allocator, "repeat": rep,
                "error": f"timed out after {args.timeout} s"}
    row = _result_row(proc.stdout)
    if row is not None:
        return row
    return {"case": case, "width": width, "device": device, "allocator": allocator, "repeat": rep,
            "error": f"no result (exit {proc.returncode})", "stderr_tail": proc.stderr[-3000:]}


def make_plan(cases: list[str], widths: list[float], devices: list[str], allocators: list[str], repeats: int,
              order: str = "width") -> list[tuple[int, str, float, str, str]]:
    """(repeat, device, width, case, allocator) in the order they run: repeats outermost, then devices; inside,
    width-major (every case at one width, then the next width) or case-major (every width of one case, then the
    next case, so that the cases listed last are the ones a time limit cuts). Allocators alternate their order
    from one repeat to the next."""
    if order not in ("width", "case"):
        raise ValueError(f"order must be 'width' or 'case', got {order!r}")
    plan = []
    for rep in range(repeats):
        allocs = allocators if rep % 2 == 0 else allocators[::-1]
        for dev in devices:
            pairs = ([(w, c) for w in widths for c in cases] if order == "width" else
                     [(w, c) for c in cases for w in widths])
            plan += [(rep, dev, w, c, a) for w, c in pairs for a in allocs]
    return plan


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.case:
        if args.width is None:
            raise SystemExit("--case needs --width")
        return worker_main(args)
    logging.basicConfig(level=logging.WARNING)
    sizes = sizes_from(args)
    cases = [c.strip() for c in args.only.split(",")] if args.only else list(CASES)
    bad = [c for c in cases if c not in CASES + OPT_IN_CASES]
    if bad:
        raise SystemExit(f"unknown case(s) {bad}; valid: {', '.join(CASES + OPT_IN_CASES)}")
    widths = [float(w) for w in (args.widths or ("0.125" if args.tiny else "0.25,1.0")).split(",")]
    repeats = args.repeats or (1 if args.tiny else 3)
    devices = devices_from(args)
    out = Path(args.out)
    mode = "tiny" if args.tiny else "full"
    result = {"meta": meta(args, sizes, mode), "rows": [], "summary": {}}
    if args.tiny:
        allocators = ["inherited"]
    else:
        allocators = [a.strip() for a in args.allocators.split(",")]
        bad = [a for a in allocators if a not in ALLOCATORS]
        if bad:
            raise SystemExit(f"unknown allocator(s) {bad}; valid: {', '.join(ALLOCATORS)}")
        for a in allocators:
            if a in PRELOAD:
                preload_path(a)  # fail now, not after an hour
    plan = make_plan(cases, widths, devices, allocators, repeats, args.order)
    t_start = time.perf_counter()
    for i, (rep, dev, width, case, alloc) in enumerate(plan, 1):
        t0 = time.perf_counter()
        if args.tiny:
            row = run_case(case, width, dev, sizes, args, rep, alloc)
        else:
            row = subprocess_row(case, width, dev, alloc, rep, args)
        result["rows"].append(row)
        result["summary"] = summarize(result["rows"])
        result["meta"]["wall_seconds"] = time.perf_counter() - t_start
        result["meta"]["loadavg_end"] = os.getloadavg()
        write(result, out)
        value = row.get(PRIMARY[case])
        shown = row.get("error") or (f"{PRIMARY[case]}={value:.4g}" if isinstance(value, (int, float)) else "-")
        print(f"[{i}/{len(plan)}] {case} width={width} {dev} {alloc} repeat={rep}: {shown} "
              f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    print_table(result)
    print(f"\nwrote {out}")
    return 1 if any("error" in r for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
