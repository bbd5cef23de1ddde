"""The EMP-SSL strategy: an Avalanche training template that ignores labels.

Each mini-batch of the stream gives exactly one update: the images (uint8, gathered from the stream's
in-memory tensor) are cut into n augmented patches on the training device, the encoder runs once over
all n*B patches, and the EMP-SSL objective (objective.py) is minimised with LARS (lars.py) on a cosine
schedule sized from the updates of the whole stream. Everything else (evaluation, logging, replay,
checkpoints) hooks in through Avalanche plugins and the callbacks below.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Sequence

import torch
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.templates import SupervisedTemplate
from torch.utils.data import default_collate

from scenarios.streams import row_indices
from streaming_ssl import distributed as ddp
from streaming_ssl.augment import MultiPatchAugment
from streaming_ssl.device import autocast
from streaming_ssl.lars import cosine_lr, set_lr
from streaming_ssl.objective import emp_ssl_loss

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; raised before the update is applied."""


def derive_seed(*parts) -> int:
    """A stable 63-bit seed from any parts (ints, strings); the same on every machine and run."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class RowBatchLoader:
    """Batches of one experience, gathered by row index: no per-sample Python on the fast path.

    The order of epoch e is a permutation seeded by (seed, key, e): identical on every rank and after a
    resume. Each global batch of `batch_size` rows is split across ranks (contiguous shares), so DDP
    ranks see disjoint parts of the same global batch. `fetch(rows) -> (x uint8, y)` reads the data.
    """

    def __init__(self, rows: torch.Tensor, fetch: Callable, batch_size: int, *, seed: int, key: Sequence,
                 shuffle: bool = True, start_batch: int = 0, rank: int = 0, world: int = 1) -> None:
        self.rows, self.fetch, self.batch_size = rows, fetch, batch_size
        self.seed, self.key, self.shuffle = seed, tuple(key), shuffle
        self.epoch, self.start_batch, self.rank, self.world = 0, start_batch, rank, world
        self.last_global_size = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(math.ceil(len(self.rows) / self.batch_size) - self.start_batch, 0)

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return self.rows
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.key, self.epoch))
        return self.rows[torch.randperm(len(self.rows), generator=gen)]

    def __iter__(self):
        order, start = self.order(), self.start_batch
        self.start_batch = 0
        for b in range(start, math.ceil(len(order) / self.batch_size)):
            batch = order[b * self.batch_size:(b + 1) * self.batch_size]
            self.last_global_size = len(batch)
            lo, hi = ddp.shard_bounds(len(batch), self.rank, self.world)
            x, y = self.fetch(batch[lo:hi])
            yield x, y, torch.zeros(len(y), dtype=torch.long)


class EMPSSLStrategy(SupervisedTemplate):
    """Label-free EMP-SSL on an Avalanche stream: one multi-patch update per mini-batch.

    Args:
        model: the module trained (an EMPSSLModel, or a DDP wrapper of one); forward gives (h, z).
        optimizer: usually LARS; its state persists across experiences.
        augment: the batched multi-patch augmentation.
        images, targets: the training tensor the stream's `row_index` attributes point into.
        total_updates: updates of the whole run, for the cosine schedule.
        amp_dtype: autocast dtype (None: float32). The objective is always float32.
        on_iteration / on_experience: callbacks (strategy) -> None after each update and after each
            experience (after the evaluation plugin ran), e.g. checkpointing.
    """

    def __init__(self, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, augment: MultiPatchAugment,
                 images, targets: torch.Tensor, n_patches: int, eps2: float = 0.2, lam: float = 200.0,
                 batch_size: int = 100, epochs: int = 1, total_updates: int, base_lr: float,
                 warmup_steps: int = 0, final_lr: float = 0.0, device: torch.device | str = "cpu",
                 amp_dtype: torch.dtype | None = None, channels_last: bool = True, seed: int = 0,
                 plugins: list | None = None, evaluator: EvaluationPlugin | None = None,
                 on_iteration: Callable | None = None, on_experience: Callable | None = None) -> None:
        super().__init__(model=model, optimizer=optimizer, criterion=torch.nn.Identity(), train_mb_size=batch_size,
                         train_epochs=epochs, eval_mb_size=batch_size, device=device, plugins=plugins,
                         evaluator=evaluator if evaluator is not None else EvaluationPlugin(loggers=[]), eval_every=-1)
        self.augment = augment.to(self.device)
        self.images, self.targets = images, targets
        self.n_patches, self.eps2, self.lam = n_patches, eps2, lam
        self.total_updates, self.base_lr, self.warmup_steps, self.final_lr = total_updates, base_lr, warmup_steps, final_lr
        self.amp_dtype, self.channels_last, self.seed = amp_dtype, channels_last, seed
        self.on_iteration, self.on_experience = on_iteration, on_experience
        self.aug_generator = torch.Generator(device=self.device)
        self.aug_generator.manual_seed(derive_seed(seed, "augment", ddp.rank()))
        # Position in the stream; saved in checkpoints.
        self.global_step = 0  # updates done
        self.stream_step = 0  # training experiences finished
        self.epoch_in_exp = 0
        self.batch_in_epoch = 0  # batches of the current epoch done
        self.samples_seen = 0  # training samples consumed (global, all ranks)
        self.last_stats: dict[str, torch.Tensor] = {}
        self._resume_epoch = 0
        self._resume_batch = 0

    # ------------------------------------------------------------------------------------ data
    def _fetch_rows(self, rows: torch.Tensor):
        return self.images[rows], self.targets[rows]

    def make_train_dataloader(self, shuffle: bool = True, **kwargs) -> None:
        """Batches gathered by row index from the training tensor (fallback: per-sample collate)."""
        dataset = self.adapted_dataset
        rows = row_indices(dataset)
        if rows is not None:
            fetch = self._fetch_rows
        else:  # a dataset without row_index (a foreign plugin's): positions in it, collated per sample
            rows = torch.arange(len(dataset))

            def fetch(pos: torch.Tensor):
                x, y, *_ = default_collate([dataset[int(i)] for i in pos])
                return x, y
        self.dataloader = RowBatchLoader(rows, fetch, self.train_mb_size, seed=self.seed, key=("exp", self.stream_step),
                                         shuffle=shuffle, start_batch=self._resume_batch, rank=ddp.rank(),
                                         world=ddp.world_size())

    def make_optimizer(self, **kwargs) -> None:
        """The optimizer (and its momentum) lives across the whole stream: nothing to rebuild."""

    def _unpack_minibatch(self) -> None:
        self.mbatch = [t.to(self.device, non_blocking=True) for t in self.mbatch]

    # ------------------------------------------------------------------------------------ step
    def forward(self) -> torch.Tensor:
        patches = self.augment(self.mb_x, self.aug_generator)
        if self.channels_last:
            patches = patches.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.amp_dtype):
            _, z = self.model(patches)
        return z

    def criterion(self) -> torch.Tensor:
        loss, self.last_stats = emp_ssl_loss(self.mb_output, self.n_patches, eps2=self.eps2, lam=self.lam,
                                             gather=ddp.gather_patch_blocks)
        return loss

    def backward(self) -> None:
        if not torch.isfinite(self.loss).all():
            raise NonFiniteLossError(
                f"non-finite loss ({float(self.loss.detach().reshape(-1)[0])}) at update {self.global_step} "
                f"(experience {self.stream_step}, batch {self.batch_in_epoch}); nothing of this update was applied "
                "and the last checkpoint is intact. Lower optim.lr, check the input data, or use precision fp32.")
        super().backward()

    def optimizer_step(self) -> None:
        set_lr(self.optimizer, cosine_lr(min(self.global_step, self.total_updates - 1), self.total_updates, self.base_lr,
                                         warmup_steps=self.warmup_steps, final_lr=self.final_lr))
        self.optimizer.step()

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
        super()._after_training_iteration(**kwargs)
        if self.on_iteration is not None:
            self.on_iteration(self)

    def _after_training_exp(self, **kwargs) -> None:
        self.stream_step += 1
        self.batch_in_epoch = 0
        self.epoch_in_exp = 0
        super()._after_training_exp(**kwargs)
        if self.on_experience is not None:
            self.on_experience(self)

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
