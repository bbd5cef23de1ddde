"""The EMP-SSL strategy: an Avalanche training template that ignores labels.

Each mini-batch of the stream gives exactly one update: the images are cut into n augmented patches on
the training device, the encoder runs once over all n*B patches, and the EMP-SSL objective
(objective.py) is minimised with LARS (lars.py) on a cosine schedule sized from the updates of the
whole stream. Everything else (evaluation, logging, checkpoints, continual-learning methods) hooks in
through Avalanche plugins (plugins.py, cl/).

Data: any Avalanche benchmark whose datasets yield image tensors (uint8 0..255, or float in [0, 1],
C = 1 or 3) works; samples are then collated one by one. When an experience carries our `row_index`
attribute over one in-memory tensor (scenarios/streams.py), whole batches are gathered by index
instead, and on CUDA that tensor lives on the GPU as uint8.

What plugins may use (the contract the cl/ plugins rely on):
    before_forward: `strategy.mb_x` holds this rank's stream images of the update (uint8 or float in
        [0, 1], on the device); a plugin may replace `strategy.mbatch[0]` (e.g. append buffer images) and
        must then add the global number of appended images to `strategy.mb_added`. A plugin that splits its
        appended images across DDP ranks with distributed.shard_bounds also appends that number to
        `strategy.mb_segments`: every rank then knows every rank's share of the update without asking
        (no host synchronisation in the objective's all-gather).
    after_forward / before_backward: `strategy.mb_patches` (the augmented patches, patch-major),
        `strategy.mb_output` (z) and `strategy.mb_features` (h, the features the probes read; set to None
        after backward, so that it holds no memory between updates); a plugin may add a term to
        `strategy.loss` and its values to `strategy.last_stats` (in before_backward: the objective sets it
        after forward).
    always: `strategy.counters` (accounting.ComputeCounters), `strategy.core_model` (without DDP),
        `strategy.amp_dtype`, `strategy.global_step`, `strategy.stream_step`.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence

import torch
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.templates import SupervisedTemplate
from torch.utils.data import default_collate

from scenarios.streams import row_indices, row_source
from streaming_ssl import checkpoint as ckpt
from streaming_ssl import distributed as ddp
from streaming_ssl.accounting import ComputeCounters
from streaming_ssl.augment import MultiPatchAugment
from streaming_ssl.device import (autocast, host_to_device, loader_workers_default, shm_free_bytes, usable_cores,
                                  workers_within_shm)
from streaming_ssl.lars import cosine_lr, set_lr
from streaming_ssl.objective import emp_ssl_loss
from streaming_ssl.seeds import derive_seed

log = logging.getLogger(__name__)


# float16's first loss scale. The objective's gradients overflow float16 above a scale of 2^11 to 2^12 at the start
# of training (bench/fp16_scale.py: 2^12 for the first CIFAR-10 batch of 16 images x 8 patches, at width 1/8 and at
# full width), so from torch's 2^16 the first 4 of 6 updates were skipped there (and all 6 of the smoke recipe in
# fp16): in a single pass, batches of the stream never learned from. From 2^10 none was. The scale still halves on
# an overflow and doubles after 2000 updates without one (torch's rule).
FLOAT16_INIT_SCALE = 2.0 ** 10


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; no state with it is ever saved."""


class StreamInputError(ValueError):
    """A benchmark's samples are not images the strategy can train on; the message says how to fix them."""


class RowBatchLoader:
    """Batches of one experience, gathered by row index: no per-sample Python on the fast path.

    The order of epoch e is a permutation seeded by (seed, key, e): identical on every rank and after a
    resume. Each global batch of `batch_size` rows is split across ranks (contiguous shares), so DDP
    ranks see disjoint parts of the same global batch. `fetch(rows) -> (x uint8, y)` reads the data.

    `workers` > 0: an epoch of two or more batches is fetched in that many DataLoader workers (at most one per
    batch), overlapped with training; a single batch (an online stream's mini-experience) is fetched in this
    process, since starting workers for it costs more than the fetch (bench figures in the commit that made it).
    `pin_memory`: batches fetched on the host come in pinned memory, so that their copy to the GPU does not make
    the host wait.
    """

    def __init__(self, rows: torch.Tensor, fetch: Callable, batch_size: int, *, seed: int, key: Sequence,
                 shuffle: bool = True, start_batch: int = 0, rank: int = 0, world: int = 1,
                 index_device: torch.device | None = None, workers: int = 0, pin_memory: bool = False) -> None:
        self.rows, self.fetch, self.batch_size, self.index_device = rows, fetch, batch_size, index_device
        self.workers, self.pin_memory = workers, pin_memory
        self.seed, self.key, self.shuffle = seed, tuple(key), shuffle
        self.epoch, self.start_batch, self.rank, self.world = 0, start_batch, rank, world
        self.last_global_size = 0
        self.last_workers = 0  # workers that fetched the latest epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @staticmethod
    def epoch_workers(workers: int, n_batches: int) -> int:
        """Workers that fetch an epoch of `n_batches`: none for a single batch, never more than the batches."""
        return min(workers, n_batches) if n_batches > 1 else 0

    def __len__(self) -> int:
        return max(math.ceil(len(self.rows) / self.batch_size) - self.start_batch, 0)

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return self.rows
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.key, self.epoch))
        return self.rows[torch.randperm(len(self.rows), generator=gen)]

    def __iter__(self):
        order, start = self.order(), self.start_batch
        if self.index_device is not None:  # one copy per epoch; batches are then slices on the device
            # from pinned memory: an online stream starts an epoch at every update, and a copy from pageable
            # memory would make the host wait for the device there
            order = host_to_device(order, self.index_device)
        self.start_batch = 0
        batches = [order[b * self.batch_size:(b + 1) * self.batch_size]
                   for b in range(start, math.ceil(len(order) / self.batch_size))]
        shares = [batch[slice(*ddp.shard_bounds(len(batch), self.rank, self.world))] for batch in batches]
        self.last_workers = self.epoch_workers(self.workers, len(shares))
        if self.last_workers:  # lazily decoded images: batches decoded in workers, overlapped with training
            fetched = iter(torch.utils.data.DataLoader(_Fetch(shares, self.fetch), batch_size=None,
                                                       num_workers=self.last_workers, pin_memory=self.pin_memory))
        elif self.pin_memory:
            fetched = ((_pinned(x), _pinned(y)) for x, y in map(self.fetch, shares))
        else:
            fetched = map(self.fetch, shares)
        for batch, (x, y) in zip(batches, fetched):
            self.last_global_size = len(batch)
            yield x, y, torch.zeros(len(y), dtype=torch.long, device=y.device)


def _pinned(t: torch.Tensor) -> torch.Tensor:
    """A host tensor in pinned memory (a benchmark's dataset may already give device tensors: left as they are)."""
    return t.pin_memory() if t.device.type == "cpu" and not t.is_pinned() else t


class _Fetch(torch.utils.data.Dataset):
    """Item k is fetch(shares[k]): one whole batch, for a DataLoader's workers."""

    def __init__(self, shares: list[torch.Tensor], fetch: Callable) -> None:
        self.shares, self.fetch = shares, fetch

    def __len__(self) -> int:
        return len(self.shares)

    def __getitem__(self, k: int):
        return self.fetch(self.shares[k])


def collate_images(samples: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate (image, label, ...) samples of a foreign dataset into (images, labels), checking the images.

    Images must be tensors (C, H, W) with C 1 or 3: uint8 0..255, or float in [0, 1]. Grayscale is
    repeated to three channels. Anything else raises StreamInputError saying how to fix the benchmark.
    """
    first = samples[0][0] if samples and isinstance(samples[0], (tuple, list)) else None
    if not isinstance(first, torch.Tensor):
        raise StreamInputError(
            f"the benchmark's samples give {type(first).__name__} images; EMPSSLStrategy needs image tensors "
            "(uint8 0..255 or float in [0, 1]): add torchvision.transforms.PILToTensor() (or ToTensor()) to the "
            "dataset, without Normalize (the strategy's augmentation normalises)")
    x, y = default_collate([s[0] for s in samples]), default_collate([s[1] for s in samples])
    check_images(x)
    return x, torch.as_tensor(y)


def check_images(x: torch.Tensor) -> torch.Tensor:
    """StreamInputError unless x is a (B, 1|3, H, W) batch of uint8 images or float images in [0, 1]."""
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        last = (" They look channels-last (H, W, C): permute them to (C, H, W), e.g. x.permute(0, 3, 1, 2) for a "
                "tensor of (N, H, W, C) images" if x.dim() == 4 and x.shape[-1] in (1, 3) else "")
        raise StreamInputError(f"images must be (C, H, W) tensors with 1 or 3 channels; got a batch of shape "
                               f"{tuple(x.shape)}: give the benchmark image tensors, not features or flattened images."
                               f"{last}")
    if x.is_floating_point():
        lo, hi = float(x.min()), float(x.max())
        if lo >= 0.0 and 1.0 < hi <= 255.0 and bool((x == x.round()).all()):
            raise StreamInputError(
                f"float images must lie in [0, 1], but this batch holds whole numbers in [{lo:.3g}, {hi:.3g}]: pixel "
                "values 0..255 stored as floats. Give uint8 images (x.to(torch.uint8)) or divide by 255")
        if lo < 0.0 or hi > 1.0:
            raise StreamInputError(
                f"float images must lie in [0, 1], but this batch spans [{lo:.3g}, {hi:.3g}]: the benchmark seems to "
                "normalise already. Remove Normalize from its transforms (EMPSSLStrategy's augmentation normalises "
                "with the dataset's statistics), or give uint8 images")
    elif x.dtype != torch.uint8:
        raise StreamInputError(f"images must be uint8 or float in [0, 1], got {x.dtype}")
    return x


class EMPSSLStrategy(SupervisedTemplate):
    """Label-free EMP-SSL on any Avalanche stream: one multi-patch update per mini-batch.

    Args:
        model: the module trained (an EMPSSLModel, or a DDP wrapper of one); forward gives (h, z).
        optimizer: usually LARS; its state persists across experiences.
        augment: the batched multi-patch augmentation (its n_patches is the default of `n_patches`).
        total_updates: updates of the whole run, for the cosine schedule; None keeps the optimizer's lr.
        base_lr: peak of the schedule (default: the optimizer's lr).
        amp_dtype: autocast dtype (None: float32). The objective is always float32. float16 (for GPUs without
            native bf16: V100, T4) adds dynamic loss scaling (torch.amp.GradScaler, in `grad_scaler`): the loss is
            scaled before backward, the gradients unscaled before the optimizer step, and a step whose gradients
            overflowed is skipped and halves the scale (counted in `counters.skipped_updates`: in a single pass
            its images are seen but not learned from; the scale starts at `fp16_init_scale`, by default
            FLOAT16_INIT_SCALE, below where the objective's gradients overflow). With LARS the skip is decided on
            the device (lars.py), so float16 adds no host sync per update; on CUDA the count is read at each
            finiteness check and whenever the counters are reported or saved.
        loader_workers: DataLoader workers that decode lazily stored images (ImageNet-100, large folders) into
            pinned memory while the GPU trains; None: on CUDA this rank's share of the usable cores (its CPU
            affinity, divided among the node's ranks), 1 to 8; 0 on CPU (the cores train). Either way no more than
            this rank's share of /dev/shm holds (workers hand their batches over there; a container's is often
            64 MB): fewer, down to 0 (the main process decodes), with a warning, instead of a bus error. An
            experience of a single batch (online) is decoded in the main process (RowBatchLoader).
        finite_check_every: on CUDA, updates between checks that the loss stayed finite (a check is a host
            sync); on CPU every update is checked (free). Checkpoint plugins call `check_finite()` before saving.
        plugins: Avalanche plugins. Those with `runs_after_evaluator = True` (checkpoints, graceful stop) are
            moved after the evaluation plugin, so that they see the evaluation of the experience just trained.
    """

    def __init__(self, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, augment: MultiPatchAugment,
                 n_patches: int | None = None, eps2: float = 0.2, lam: float = 200.0, batch_size: int = 100,
                 epochs: int = 1, total_updates: int | None = None, base_lr: float | None = None,
                 warmup_steps: int = 0, final_lr: float = 0.0, device: torch.device | str = "cpu",
                 amp_dtype: torch.dtype | None = None, channels_last: bool = True, seed: int = 0,
                 finite_check_every: int = 50, loader_workers: int | None = None, plugins: list | None = None,
                 evaluator: EvaluationPlugin | None = None, fp16_init_scale: float = FLOAT16_INIT_SCALE) -> None:
        super().__init__(model=model, optimizer=optimizer, criterion=torch.nn.Identity(), train_mb_size=batch_size,
                         train_epochs=epochs, eval_mb_size=batch_size, device=device, plugins=plugins,
                         evaluator=evaluator if evaluator is not None else EvaluationPlugin(loggers=[]), eval_every=-1)
        late = [p for p in self.plugins if getattr(p, "runs_after_evaluator", False)]
        self.plugins = [p for p in self.plugins if p not in late] + late
        self.augment = augment.to(self.device)
        self.n_patches = augment.n_patches if n_patches is None else n_patches
        self.eps2, self.lam = eps2, lam
        self.base_lr = optimizer.param_groups[0]["lr"] if base_lr is None else base_lr
        self.total_updates, self.warmup_steps, self.final_lr = total_updates, warmup_steps, final_lr
        self.amp_dtype, self.channels_last, self.seed = amp_dtype, channels_last, seed
        self.finite_check_every = max(int(finite_check_every), 1)
        auto_workers = loader_workers_default(self.device.type, usable_cores(), ddp.local_world_size())
        self.loader_workers = auto_workers if loader_workers is None else int(loader_workers)
        self._shm_warned = self._schedule_warned = False
        self.aug_generator = torch.Generator(device=self.device)
        self.aug_generator.manual_seed(derive_seed(seed, "augment", ddp.rank()))
        self.counters = ComputeCounters()
        # Position in the stream; saved in checkpoints.
        self.global_step = 0  # updates done
        self.stream_step = 0  # training experiences finished
        self.epoch_in_exp = 0
        self.batch_in_epoch = 0  # batches of the current epoch done
        self.samples_seen = 0  # training samples consumed (global, all ranks)
        self.last_stats: dict[str, torch.Tensor] = {}
        self.mb_patches: torch.Tensor | None = None
        self.mb_features: torch.Tensor | None = None  # h of the update's patches, from forward to backward
        self.mb_added = 0  # global images plugins appended to this update's batch
        self.mb_segments: list[int] = []  # the parts of mb_added split across ranks with shard_bounds, in order
        self._nonfinite: torch.Tensor | None = None  # CUDA: non-finite losses since the last check
        self.grad_scaler = (torch.amp.GradScaler(self.device.type, init_scale=fp16_init_scale)
                            if amp_dtype == torch.float16 else None)
        # (host images, host targets, their device copies); the host tensors are held so that a new stream's tensor
        # can never pass for the old one (an id() could be reused once the old tensor is freed)
        self._resident: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._resume_epoch = 0
        self._resume_batch = 0

    @property
    def core_model(self) -> torch.nn.Module:
        """The trained model without its DDP wrapper."""
        return getattr(self.model, "module", self.model)

    # ------------------------------------------------------------------------------------ data
    def _on_device(self, images, targets: torch.Tensor):
        """On CUDA, an in-memory uint8 tensor is copied to the GPU once: a batch is then an index there."""
        if self.device.type != "cuda" or not isinstance(images, torch.Tensor):
            return images, targets, None
        if self._resident is None or self._resident[0] is not images or self._resident[1] is not targets:
            self._resident = None  # the old copies go before the new ones are made
            self._resident = (images, targets, images.to(self.device), targets.to(self.device))
        return self._resident[2], self._resident[3], self.device

    def make_train_dataloader(self, shuffle: bool = True, **kwargs) -> None:
        """Batches gathered by row index from the experience's tensor (fallback: per-sample collate)."""
        dataset = self.adapted_dataset
        rows, source = row_indices(dataset), row_source(dataset)
        index_device, workers = None, 0
        if rows is not None and source is not None:
            images, targets, index_device = self._on_device(*source)  # index_device: resident there
            if not isinstance(images, torch.Tensor):  # lazily decoded: workers, where an epoch has several batches
                batches = math.ceil(len(rows) / self.train_mb_size)
                workers = self._workers_within_shm(images, RowBatchLoader.epoch_workers(self.loader_workers, batches))

            def fetch(idx: torch.Tensor):
                return images[idx], targets[idx]
        else:  # a foreign dataset: positions in it, collated per sample and checked
            rows = torch.arange(len(dataset))

            def fetch(pos: torch.Tensor):
                return collate_images([dataset[int(i)] for i in pos])
        self.dataloader = RowBatchLoader(rows, fetch, self.train_mb_size, seed=self.seed, key=("exp", self.stream_step),
                                         shuffle=shuffle, start_batch=self._resume_batch, rank=ddp.rank(),
                                         world=ddp.world_size(), index_device=index_device, workers=workers,
                                         pin_memory=index_device is None and self.device.type == "cuda")

    def _workers_within_shm(self, images, wanted: int) -> int:
        """`wanted` workers, capped so that their batches in flight fit in this rank's share of /dev/shm (the node's
        ranks share it); a warning, once, when that takes any away."""
        share = math.ceil(self.train_mb_size / ddp.world_size())
        batch_bytes = share * math.prod(images.shape[1:]) * torch.empty((), dtype=images.dtype).element_size()
        free = shm_free_bytes()
        free = None if free is None else free // ddp.local_world_size()
        workers = workers_within_shm(wanted, batch_bytes, free)
        if workers < wanted and not self._shm_warned:
            self._shm_warned = True
            log.warning("/dev/shm has %.0f MB free for this rank's DataLoader workers, and each needs %.0f MB (batches "
                        "of %d images waiting there): %d of %d workers decode the images (0: the main process does), "
                        "so the GPU may wait for them; nothing else changes. A larger /dev/shm gives them all "
                        "(docker run --shm-size=8g; on Kubernetes an emptyDir of medium Memory mounted at /dev/shm)",
                        free / 2**20, 4 * batch_bytes / 2**20, share, workers, wanted)
        return workers

    def make_optimizer(self, **kwargs) -> None:
        """The optimizer (and its momentum) lives across the whole stream: nothing to rebuild."""

    def _unpack_minibatch(self) -> None:
        self.mbatch = [t.to(self.device, non_blocking=True) for t in self.mbatch]
        if self.mbatch[0].shape[1] == 1:  # grayscale benchmark: three equal channels
            self.mbatch[0] = self.mbatch[0].expand(-1, 3, -1, -1)

    # ------------------------------------------------------------------------------------ step
    def _before_forward(self, **kwargs) -> None:
        self.mb_added, self.mb_segments = 0, []
        super()._before_forward(**kwargs)

    def forward(self) -> torch.Tensor:
        if len(self.mb_x):
            patches = self.augment(self.mb_x, self.aug_generator, n_patches=self.n_patches)
        else:  # DDP, a global batch smaller than the world: no image here, but this rank still joins the collectives
            size = self.augment.out_size
            patches = torch.zeros(0, 3, size, size, device=self.mb_x.device)
        if self.channels_last:
            patches = patches.contiguous(memory_format=torch.channels_last)
        self.mb_patches = patches
        with autocast(self.device, self.amp_dtype):
            self.mb_features, z = self.model(patches)
        return z

    def _after_backward(self, **kwargs) -> None:
        super()._after_backward(**kwargs)
        self.mb_features = None

    def criterion(self) -> torch.Tensor:
        loss, self.last_stats = emp_ssl_loss(self.mb_output, self.n_patches, eps2=self.eps2, lam=self.lam,
                                             gather=functools.partial(ddp.gather_patch_blocks,
                                                                      sizes=self.rank_shares()))
        return loss

    def rank_shares(self) -> list[int] | None:
        """Every rank's images in this update (under DDP), from the global sizes of its parts: the loader's stream
        batch and each part a plugin appended and registered in `mb_segments`. None when a plugin appended images
        without registering them (the all-gather then exchanges the sizes)."""
        stream = getattr(self.dataloader, "last_global_size", 0)
        if not ddp.is_dist() or not stream or sum(self.mb_segments) != self.mb_added:
            return None
        return ddp.share_sizes([stream, *self.mb_segments])

    def backward(self) -> None:
        if self.device.type == "cuda":  # no host sync per update: accumulate, check every finite_check_every
            bad = ~torch.isfinite(self.loss.detach()).all()
            self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad
            if (self.global_step + 1) % self.finite_check_every == 0:
                self.check_finite()
        elif not torch.isfinite(self.loss).all():
            raise NonFiniteLossError(
                f"non-finite loss ({float(self.loss.detach().reshape(-1)[0])}) at update {self.global_step} "
                f"(experience {self.stream_step}, batch {self.batch_in_epoch}); nothing of this update was applied "
                "and the last checkpoint is intact. Lower optim.lr, check the input data, or use precision fp32.")
        if self.grad_scaler is None:
            super().backward()
        else:  # float16: gradients of the scaled loss (the check above saw the loss itself)
            self.grad_scaler.scale(self.loss).backward(retain_graph=self.retain_graph)

    def check_finite(self) -> None:
        """Raise NonFiniteLossError if a loss since the last check was not finite (CUDA: one host sync, which also
        brings float16's count of skipped updates up to date)."""
        self.counters.flush()
        bad, self._nonfinite = self._nonfinite, None
        if bad is not None and bool(bad):
            raise NonFiniteLossError(
                f"a non-finite loss occurred within the {self.finite_check_every} updates before update "
                f"{self.global_step + 1} (experience {self.stream_step}); no state with it is saved and the last "
                "checkpoint is intact. Lower optim.lr, check the input data, or use precision fp32.")

    def optimizer_step(self) -> None:
        if self.total_updates and self.global_step >= self.total_updates and not self._schedule_warned:
            self._schedule_warned = True
            log.warning("update %d is past the %d updates the cosine schedule was sized for (total_updates): the "
                        "learning rate stays at the schedule's last value from here on. Pass total_updates = the "
                        "updates of the whole run (with epochs=E, E times the batches of every experience)",
                        self.global_step + 1, self.total_updates)
        if self.total_updates:
            set_lr(self.optimizer, cosine_lr(min(self.global_step, self.total_updates - 1), self.total_updates,
                                             self.base_lr, warmup_steps=self.warmup_steps, final_lr=self.final_lr))
        if self.grad_scaler is None:
            self.optimizer.step()
        else:  # float16: unscale, skip the step if a gradient overflowed, adapt the scale
            self.grad_scaler.unscale_(self.optimizer)  # also finds the non-finite gradients, per device
            # the flags step() acts on: with LARS (_step_supports_amp_scaling) it skips on the device, and they are
            # counted without being read; another optimizer is stepped by GradScaler after a host read
            found = list(self.grad_scaler._found_inf_per_device(self.optimizer).values())
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
            self.counters.add_skipped(sum(f.to(self.device, non_blocking=True) for f in found))
            if self.device.type != "cuda":
                self.counters.flush()  # (free off CUDA: the counter is always current there)

    # ------------------------------------------------------------------------------------ loop
    def _train_exp(self, experience, eval_streams=None, **kwargs) -> None:
        start_epoch, start_batch = self._resume_epoch, self._resume_batch
        self._resume_epoch = self._resume_batch = 0
        for self.epoch_in_exp in range(start_epoch, self.train_epochs):  # noqa: B020 - Avalanche style
            self.batch_in_epoch = start_batch if self.epoch_in_exp == start_epoch else 0
            if hasattr(self.dataloader, "set_epoch"):
                self.dataloader.set_epoch(self.epoch_in_exp)
            self._before_training_epoch(**kwargs)
            if self._stop_training:
                self._stop_training = False
                break
            self.training_epoch(**kwargs)
            self._after_training_epoch(**kwargs)

    def _after_training_iteration(self, **kwargs) -> None:
        self.global_step += 1
        self.batch_in_epoch += 1
        size = getattr(self.dataloader, "last_global_size", 0) or len(self.mb_x) * ddp.world_size()
        self.samples_seen += size
        self.counters.stream_images += size
        self.counters.add_update(images=size + self.mb_added, n_patches=self.n_patches)
        super()._after_training_iteration(**kwargs)

    def _before_training(self, **kwargs) -> None:
        optimized = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        for plugin in self.plugins:
            for module in getattr(plugin, "trainable_modules", []):
                if not all(id(p) in optimized for p in module.parameters() if p.requires_grad):
                    # its term would still be added, against modules that never learn (and pile up gradients)
                    raise ValueError(
                        f"{type(plugin).__name__}.trainable_modules holds a {type(module).__name__} whose parameters "
                        "are not in the strategy's optimizer, so it would never train: give the optimizer its "
                        "parameters too, e.g. LARS(param_groups(model, wd) + [g for p in plugins for m in "
                        "getattr(p, 'trainable_modules', []) for g in param_groups(m, wd)], ...)")
        super()._before_training(**kwargs)

    def eval(self, exp_list, **kwargs):
        """Avalanche's eval loop (the model in eval mode over a stream; what it reports is what the evaluator's
        metrics compute), without a trace on training: the augmentation's generator and the global ones (Python,
        NumPy, torch: Avalanche's eval loader and its ReplayPlugin's buffer draw from torch's) are put back
        afterwards, so a run that calls eval between experiences trains as one that does not. (A continual run's
        probes are StreamEvaluator's, through ProbeMetric.)"""
        augment_state, global_state = self.aug_generator.get_state(), ckpt.rng_state()
        try:
            return super().eval(exp_list, **kwargs)
        finally:
            self.aug_generator.set_state(augment_state)
            ckpt.set_rng_state(global_state)

    @property
    def mb_task_id(self) -> torch.Tensor:
        """The experience's task label for every image of the batch. The objective never reads it (EMP-SSL is
        label-free); a task-aware plugin may. (Avalanche takes it from the batch, which holds images and targets.)
        Images a replay plugin added carry the current experience's label too, not the one they came with."""
        labels = sorted(set(getattr(self.experience, "task_labels", None) or [0]))
        if len(labels) != 1:
            raise ValueError(f"experience {self.stream_step} holds the task labels {labels}: EMPSSLStrategy keeps one "
                             "task label per experience, not one per image; split the benchmark by task")
        return torch.full((len(self.mbatch[0]),), labels[0], dtype=torch.long, device=self.device)

    def _after_training(self, **kwargs) -> None:
        self.counters.flush()  # float16 on CUDA: the count of skipped updates is current when train() returns
        super()._after_training(**kwargs)

    def _after_training_exp(self, **kwargs) -> None:
        self.stream_step += 1
        self.batch_in_epoch = 0
        self.epoch_in_exp = 0
        super()._after_training_exp(**kwargs)

    # ------------------------------------------------------------------------------------ state
    def position(self) -> dict[str, int]:
        """Where the stream stands: enough to continue exactly from here."""
        return {"global_step": self.global_step, "stream_step": self.stream_step, "epoch_in_exp": self.epoch_in_exp,
                "batch_in_epoch": self.batch_in_epoch, "samples_seen": self.samples_seen}

    def set_position(self, pos: dict[str, int]) -> None:
        """Continue from a saved position: the next experience trained is pos['stream_step'], from its batch."""
        self.global_step, self.stream_step = int(pos["global_step"]), int(pos["stream_step"])
        self.samples_seen = int(pos["samples_seen"])
        self._resume_epoch, self._resume_batch = int(pos["epoch_in_exp"]), int(pos["batch_in_epoch"])
        self.epoch_in_exp, self.batch_in_epoch = self._resume_epoch, self._resume_batch
