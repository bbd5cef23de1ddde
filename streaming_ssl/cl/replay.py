"""Replay: a buffer of past training images (uint8, never labels) whose images join each update.

Policies (what the buffer keeps of the stream):

* ``reservoir`` -- task-free reservoir sampling (Vitter's algorithm R). The t-th image of the stream
  (t = 1, 2, ...) fills slot t-1 while t <= size; afterwards it draws j ~ U{0, ..., t-1} and replaces
  slot j when j < size. After n images, every one of them is in the buffer with probability size/n.
* ``minred`` -- MinRed (Purushwalkam et al., "The challenges of continuous self-supervised learning",
  ECCV 2022): when the buffer and the new images exceed the size, the most redundant images are dropped
  one at a time until `size` remain: the pair (i, j) with the highest cosine similarity of their features
  is found and, of the two, the one more similar to the rest (its second-nearest neighbour) goes.
  Features are the model's z (or h) of the whole images, in eval mode under inference_mode; these forwards
  count as ``extra_forwards``. ``minred_refresh`` says when they are computed:
  ``all`` (default): every candidate's, by the current model, at every update once the buffer is full
  (buffer + batch forwards per update). The choice then follows a model that changes every update: in
  bench/minred_buffer.py one update changes 15% of the images MinRed drops, and its buffer on a
  class-incremental stream ends up holding mostly the newest classes.
  ``stored``: the bookkeeping of MinRed's and of the CMP authors' code: each buffer image keeps the
  feature it had when offered, refreshed when it is replayed (after that update, by the updated model:
  stored <- ema * stored + (1 - ema) * new, unit-normalised), so 2 x batch forwards per update. On the
  same stream its buffer is as recent (stale features of old images beside fresh ones of new images).

The plugin (ReplayBufferPlugin), per update:
  before_training_iteration: remembers this rank's stream images (before any plugin changes the batch).
  before_forward: appends ``batch`` buffer images, drawn without replacement by a seeded generator, to
      ``strategy.mbatch[0]``; adds their global number to ``strategy.mb_added`` (registered in
      ``strategy.mb_segments``) and ``counters.buffer_images``. Their patches go through the same
      augmentation and objective.
  after_training_iteration: inserts the update's stream images (never their labels) into the buffer, so
      an update never replays its own images; sets ``counters.buffer_bytes``.

DDP: the stream images of the global batch are gathered on every rank and every decision uses generators
seeded identically everywhere (MinRed's choice is computed on rank 0 and broadcast), so every rank holds
the same buffer; each rank appends its contiguous share (shard_bounds) of the global replay batch, which is
what one process holding the whole global batch would train on.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin

from streaming_ssl import distributed as ddp
from streaming_ssl.cl.common import gather_global_batch, global_stream_size, like, to_uint8
from streaming_ssl.device import autocast, host_to_device
from streaming_ssl.seeds import derive_seed

log = logging.getLogger(__name__)

POLICIES = ("reservoir", "minred")
MINRED_REFRESH = ("all", "stored")


# ------------------------------------------------------------------------------------------ pure maths
def reservoir_slots(seen: int, n_new: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Algorithm R for `n_new` images arriving after `seen`: the buffer slot each one goes to, or -1.

    Image i of the batch is the t-th of the stream, t = seen + i + 1: slot t - 1 while t <= size, else
    slot j with j = floor(u t), u ~ U[0, 1) (so j ~ U{0..t-1}), kept only when j < size. Apply the slots
    in batch order: a later image overwrites an earlier one that chose the same slot.

    Returns:
        (n_new,) int64 slots in [-1, size). One uniform per image is drawn from `generator`.
    """
    t = torch.arange(seen + 1, seen + n_new + 1, dtype=torch.float64)
    u = torch.rand(n_new, generator=generator, dtype=torch.float64)
    j = torch.minimum((u * t).floor(), t - 1).long()
    filling = t <= size
    return torch.where(filling, t.long() - 1, torch.where(j < size, j, torch.full_like(j, -1)))


def last_writers(slots: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dst slots, src rows): for every slot chosen in `slots` (n,), the last row that chose it."""
    rows = torch.arange(len(slots))
    keep = slots >= 0
    winner = torch.full((size,), -1, dtype=torch.long)
    winner.scatter_reduce_(0, slots[keep], rows[keep], reduce="amax")
    dst = (winner >= 0).nonzero().flatten()
    return dst, winner[dst]


def minred_keep(features: torch.Tensor, size: int) -> torch.Tensor:
    """Indices (sorted, on the features' device) of the `size` rows MinRed keeps of (N, d) features, N >= size >= 1.

    S = cos(f_a, f_b) for a != b. Repeat until `size` rows remain: take the most similar remaining pair
    (i, j) = argmax S; drop whichever of the two has the higher similarity to its nearest remaining
    neighbour other than the pair partner (the lower index on a tie). Each drop removes the row whose
    nearest neighbour is closest of all, i.e. the one whose max cosine similarity to the others is highest.

    Runs where the features are and reads nothing back: each step is 10 tensor ops (the argmax of S, the pair's
    two rows, their two largest values, a where, three fills), so on a GPU the host queues all N - size steps and
    goes on while the device works through them. On the CPU the same ops make the same choices as a loop reading
    each argmax would.
    """
    n = len(features)
    if size >= n:
        return torch.arange(n, device=features.device)
    f = F.normalize(features.detach().float(), dim=1)
    sim = f @ f.T
    sim = (sim + sim.T) / 2  # exactly symmetric: both members of a pair see the same similarity
    sim.fill_diagonal_(float("-inf"))
    flat = sim.view(-1)
    alive = torch.ones(n, dtype=torch.bool, device=f.device)
    divisors = torch.full((2,), n, device=f.device)  # [n, 1], filled in place: nothing copied from the host
    divisors[1:].fill_(1)  # a fill, not `divisors[1] = 1`: on CUDA that assignment copies a host scalar and syncs
    for _ in range(n - size):
        # the first maximum in row order (argmax's documented choice on ties); S is symmetric, so it lies above
        # the diagonal: pair = (i, j) with i < j
        pair = flat.argmax() // divisors % n
        # S[i, j] is the largest value of both rows, so the second largest of each (S[j, i] counted once) is its
        # nearest remaining neighbour other than the partner, or -inf when it has none
        second = sim.index_select(0, pair).topk(2, dim=1).values[:, 1]
        drop = torch.where(second[0] >= second[1], pair[0], pair[1]).view(1)  # a tie drops i, the lower index
        alive.index_fill_(0, drop, False)
        sim.index_fill_(0, drop, float("-inf"))
        sim.index_fill_(1, drop, float("-inf"))
    # the survivors in index order, without asking how many there are (size): a stable sort puts them first
    return torch.argsort((~alive).to(torch.uint8), stable=True)[:size]


# ------------------------------------------------------------------------------------------ the buffer
class ImageBuffer:
    """A fixed-capacity buffer of uint8 images (C, H, W), allocated at the first insertion on `device`.

    `seen` counts every image ever offered. Holds no labels.
    """

    def __init__(self, capacity: int, device: torch.device | str = "cpu") -> None:
        if capacity < 1:
            raise ValueError(f"a replay buffer needs a capacity >= 1, got {capacity}")
        self.capacity, self.device = int(capacity), torch.device(device)
        self.images: torch.Tensor | None = None
        self.filled = 0
        self.seen = 0

    def __len__(self) -> int:
        return self.filled

    @property
    def nbytes(self) -> int:
        """Bytes of the images held now."""
        return 0 if self.images is None else self.filled * self.images[0].numel()

    def contents(self) -> torch.Tensor:
        """The images held, (filled, C, H, W) uint8 (a view)."""
        if self.images is None:
            return torch.zeros(0, 3, 1, 1, dtype=torch.uint8, device=self.device)
        return self.images[:self.filled]

    def _allocate(self, like_images: torch.Tensor) -> None:
        if self.images is None:
            self.images = torch.zeros(self.capacity, *like_images.shape[1:], dtype=torch.uint8, device=self.device)
        elif like_images.shape[1:] != self.images.shape[1:]:
            raise ValueError(f"the replay buffer holds images of shape {tuple(self.images.shape[1:])}, but the stream "
                             f"now gives {tuple(like_images.shape[1:])}: resize the benchmark's images to one size")

    def add_reservoir(self, x: torch.Tensor, generator: torch.Generator) -> None:
        """Offer images x (uint8 or float in [0, 1]) under reservoir sampling."""
        x = to_uint8(x).to(self.device)
        self._allocate(x)
        slots = reservoir_slots(self.seen, len(x), self.capacity, generator)
        dst, src = last_writers(slots, self.capacity)
        self.images[host_to_device(dst, self.device)] = x[host_to_device(src, self.device)]
        self.seen += len(x)
        self.filled = min(self.capacity, self.seen)

    def candidates(self, x: torch.Tensor) -> torch.Tensor:
        """The buffer's images followed by x, uint8 (what MinRed chooses from)."""
        x = to_uint8(x).to(self.device)
        self._allocate(x)
        return torch.cat([self.contents(), x])

    def set_contents(self, images: torch.Tensor, offered: int) -> None:
        """Hold exactly `images` (at most capacity) after `offered` more images were seen."""
        if len(images) > self.capacity:
            raise ValueError(f"{len(images)} images do not fit a buffer of {self.capacity}")
        self._allocate(images)
        self.images[:len(images)] = images
        self.filled = len(images)
        self.seen += offered

    def sample(self, k: int, generator: torch.Generator) -> torch.Tensor:
        """min(k, filled) distinct slots, uniformly at random (the same on every rank for the same generator)."""
        return torch.randperm(self.filled, generator=generator)[:k]

    def state_dict(self) -> dict:
        # a copy: on the CPU, contents() is a view of the whole allocation, which torch.save would write out in full
        return {"images": self.contents().to("cpu", copy=True), "seen": self.seen, "capacity": self.capacity}

    def load_state_dict(self, state: dict) -> None:
        if int(state["capacity"]) != self.capacity:
            raise ValueError(f"the saved replay buffer holds {state['capacity']} images, this one {self.capacity}: "
                             "resume with the run's saved config (cl.replay.size)")
        self.images, self.filled, self.seen = None, 0, 0
        images = state["images"]
        if len(images):
            self.set_contents(images.to(self.device), 0)
        self.seen = int(state["seen"])


# ------------------------------------------------------------------------------------------ the plugin
@torch.inference_mode()
def model_features(model: torch.nn.Module, images: torch.Tensor, augment, *, which: str = "z",
                   amp_dtype: torch.dtype | None = None, batch_size: int = 256) -> torch.Tensor:
    """float32 (N, d) z or h of whole images (augment.whole_image), model in eval mode (restored after)."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for lo in range(0, len(images), batch_size):
            x = augment.whole_image(images[lo:lo + batch_size])
            with autocast(x.device, amp_dtype):
                h, z = model(x)
            out.append((z if which == "z" else h).float())
    finally:
        model.train(was_training)
    return torch.cat(out)


class ReplayBufferPlugin(SupervisedPlugin, supports_distributed=True):
    """Replay of past stream images (see the module docstring): `policy` reservoir or minred.

    Args:
        size: images the buffer holds.
        batch: buffer images appended to each update (global, over all ranks); 0 keeps the buffer
            without replaying it (LUMP mixup only).
        policy: "reservoir" or "minred".
        minred_features: "z" or "h", the features MinRed compares.
        minred_refresh: "all" or "stored" (the module docstring): when MinRed's features are computed.
        minred_ema: with "stored", the weight of the stored feature when a replayed image's is refreshed.
        seed: seeds the buffer's generators (identical on every rank).
        device: where the buffer's images live (the training device).
    """

    state_key = "cl.replay"

    def __init__(self, *, size: int, batch: int, policy: str = "reservoir", minred_features: str = "z",
                 minred_refresh: str = "all", minred_ema: float = 0.5, seed: int = 0,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        if policy not in POLICIES:
            raise ValueError(f"unknown replay policy {policy!r}; valid: {', '.join(POLICIES)}")
        if minred_refresh not in MINRED_REFRESH:
            raise ValueError(f"unknown minred_refresh {minred_refresh!r}; valid: {', '.join(MINRED_REFRESH)}")
        if not 0 <= minred_ema < 1:
            raise ValueError(f"minred_ema must be in [0, 1), got {minred_ema}")
        if batch < 0:
            raise ValueError(f"the replay batch must be >= 0, got {batch}")
        self.buffer = ImageBuffer(size, device)
        self.batch, self.policy, self.minred_features = int(batch), policy, minred_features
        self.stored = policy == "minred" and minred_refresh == "stored"
        self.minred_refresh, self.minred_ema = minred_refresh, float(minred_ema)
        # "stored": (filled, d) unit float32 features on the buffer's device, one per buffer slot; kept by rank 0
        # only, which makes every MinRed decision (other ranks hold None)
        self.features: torch.Tensor | None = None
        self._replayed: torch.Tensor | None = None  # slots replayed in the update in progress ("stored")
        self.insert_gen = torch.Generator().manual_seed(derive_seed(seed, "replay", "insert"))
        self.sample_gen = torch.Generator().manual_seed(derive_seed(seed, "replay", "sample"))
        self._stream: torch.Tensor | None = None

    @property
    def stream_images(self) -> torch.Tensor | None:
        """This rank's stream images of the update in progress (None between updates)."""
        return self._stream

    def before_training_iteration(self, strategy, **kwargs) -> None:
        self._stream = strategy.mbatch[0]

    def before_forward(self, strategy, **kwargs) -> None:
        k = min(self.batch, len(self.buffer))
        if k == 0:
            return
        slots = self.buffer.sample(k, self.sample_gen)
        if self.stored:
            self._replayed = slots
        lo, hi = ddp.shard_bounds(k)
        mine = self.buffer.contents()[host_to_device(slots[lo:hi], self.buffer.device)]
        x = strategy.mbatch[0]
        if mine.shape[1:] != x.shape[1:]:  # (shapes known on the host: no sync)
            raise ValueError(f"the replay buffer holds images of shape {tuple(mine.shape[1:])}, but the stream now "
                             f"gives {tuple(x.shape[1:])}: resize the benchmark's images to one size")
        strategy.mbatch[0] = torch.cat([x, like(mine, x)])
        strategy.mb_added += k
        strategy.mb_segments.append(k)  # split with shard_bounds: every rank knows every rank's share
        strategy.counters.buffer_images += k

    def after_training_iteration(self, strategy, **kwargs) -> None:
        stream, self._stream = self._stream, None
        replayed, self._replayed = self._replayed, None
        if stream is None:
            return
        if replayed is not None:
            self.refresh(replayed, strategy)
        self.insert(gather_global_batch(stream, global_stream_size(strategy, len(stream))), strategy)
        strategy.counters.buffer_bytes = self.buffer.nbytes

    def insert(self, images: torch.Tensor, strategy=None) -> None:
        """Offer the global batch `images` to the buffer (MinRed needs `strategy` for the model's features)."""
        if self.policy == "reservoir":
            self.buffer.add_reservoir(images, self.insert_gen)
            return
        cand = self.buffer.candidates(images)
        if self.stored:
            self._insert_stored(cand, len(images), strategy)
            return
        if len(cand) <= self.buffer.capacity:
            self.buffer.set_contents(cand, len(images))
            return
        # one decision, broadcast: BatchNorm running statistics may differ across ranks
        keep = torch.empty(self.buffer.capacity, dtype=torch.long, device=cand.device)
        if ddp.is_main():
            feats = model_features(strategy.core_model, cand, strategy.augment, which=self.minred_features,
                                   amp_dtype=strategy.amp_dtype)
            keep = minred_keep(feats, self.buffer.capacity)
        ddp.broadcast_(keep)
        strategy.counters.extra_forwards += len(cand)
        self.buffer.set_contents(cand[keep], len(images))

    def _features(self, images: torch.Tensor, strategy) -> torch.Tensor:
        """Unit-normalised float32 features of whole images (on their device), by the strategy's current model."""
        feats = model_features(strategy.core_model, images, strategy.augment, which=self.minred_features,
                               amp_dtype=strategy.amp_dtype)
        return F.normalize(feats, dim=1)

    def _insert_stored(self, cand: torch.Tensor, n_new: int, strategy) -> None:
        """MinRed over the stored features and those of the `n_new` offered images (the last candidates),
        computed now, once."""
        keep = torch.empty(min(len(cand), self.buffer.capacity), dtype=torch.long, device=cand.device)
        if ddp.is_main():
            new = self._features(cand[len(cand) - n_new:], strategy)
            feats = new if self.features is None else torch.cat([self.features, new])
            keep = minred_keep(feats, self.buffer.capacity)
            self.features = feats[keep]
        ddp.broadcast_(keep)
        strategy.counters.extra_forwards += n_new
        self.buffer.set_contents(cand[keep], n_new)

    def refresh(self, slots: torch.Tensor, strategy) -> None:
        """"stored": the features of the buffer images in `slots` (replayed by this update), refreshed by the
        updated model: ema * stored + (1 - ema) * new, unit-normalised."""
        if ddp.is_main():
            slots = host_to_device(slots, self.buffer.device)
            new = self._features(self.buffer.contents()[slots], strategy)
            self.features[slots] = F.normalize(self.minred_ema * self.features[slots] + (1 - self.minred_ema) * new,
                                               dim=1)
        strategy.counters.extra_forwards += len(slots)

    def state_dict(self) -> dict:
        state = {"buffer": self.buffer.state_dict(), "insert_gen": self.insert_gen.get_state(),
                 "sample_gen": self.sample_gen.get_state(), "policy": self.policy}
        if self.stored:
            state["features"] = None if self.features is None else self.features.to("cpu", copy=True)
        return state

    def load_state_dict(self, state: dict) -> None:
        if state["policy"] != self.policy:
            raise ValueError(f"the checkpoint's replay buffer was filled by {state['policy']!r}, this run uses "
                             f"{self.policy!r}: resume with the run's saved config (cl.replay.policy)")
        if ("features" in state) != self.stored:
            was, now = ("stored", "all") if "features" in state else ("all", "stored")
            raise ValueError(f"the checkpoint's MinRed buffer was kept with minred_refresh={was!r}, this run uses "
                             f"{now!r}: resume with the run's saved config (cl.replay.minred_refresh)")
        if self.stored:
            feats, n = state["features"], len(state["buffer"]["images"])
            if (0 if feats is None else len(feats)) != n:
                raise ValueError(f"the checkpoint's MinRed buffer holds {n} images but "
                                 f"{0 if feats is None else len(feats)} stored features: the checkpoint is damaged; "
                                 "resume from an earlier ckpt_*.pt of the run")
            self.features = None if feats is None else feats.to(self.buffer.device, copy=True)
        self.buffer.load_state_dict(state["buffer"])
        self.insert_gen.set_state(state["insert_gen"])
        self.sample_gen.set_state(state["sample_gen"])
