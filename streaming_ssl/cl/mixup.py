"""Mixup with the replay buffer (LUMP, Madaan et al., "Representational continuity for unsupervised
continual learning", ICLR 2022).

Before augmentation, every stream image of the update is mixed with a buffer image:

    x_b = lam * x_stream_b + (1 - lam) * x_buffer_{k_b}        in float [0, 1], b = 1..B

with ONE lam ~ Beta(alpha, alpha) per update (as LUMP: one coefficient per batch) and distinct partners k_b
drawn uniformly from the buffer (as LUMP's buffer draws them: without replacement; where the buffer holds fewer
images than the update has, each buffer image partners at most ceil(B / len) stream images, where LUMP's code
would fail on the shapes). The mixed images replace the stream images; the objective
then sees only mixtures (LUMP has no separate replay; set cl.replay.batch > 0 to also append buffer
images). While the buffer is empty (first update) nothing is mixed.

The plugin (MixupPlugin) reads the buffer of a ReplayBufferPlugin. build_cl_plugins lists it first, so
that in before_forward it mixes the stream images, then the replay plugin appends its buffer images (not
mixed); listed after the replay plugin it still mixes only the stream rows. The buffer keeps the original
stream images (the replay plugin takes them in before_training_iteration). The mixing partners count as
`counters.buffer_images`.

DDP: lam and the partners of the whole global batch are drawn from a generator seeded identically on
every rank; each rank takes the partners of its share, as one process would.
"""

from __future__ import annotations

import numpy as np
import torch
from avalanche.core import SupervisedPlugin

from streaming_ssl import distributed as ddp
from streaming_ssl.cl.common import global_stream_size, to_float
from streaming_ssl.cl.replay import ReplayBufferPlugin
from streaming_ssl.device import host_to_device
from streaming_ssl.seeds import derive_seed


def mix_images(x_stream: torch.Tensor, x_buffer: torch.Tensor, lam: float) -> torch.Tensor:
    """lam * x_stream + (1 - lam) * x_buffer, float32 in [0, 1].

    Args:
        x_stream, x_buffer: (B, C, H, W) images, uint8 or float in [0, 1] (any mix of the two).
        lam: the mixing coefficient in [0, 1].
    """
    return torch.lerp(to_float(x_buffer), to_float(x_stream), float(lam))


def sample_mixup(rng: np.random.Generator, alpha: float, n: int, buffer_len: int) -> tuple[float, np.ndarray]:
    """One update's draws: lam ~ Beta(alpha, alpha), then n partner slots of 0..buffer_len-1.

    The slots are distinct when n <= buffer_len (a uniform draw without replacement, as LUMP's); otherwise they
    are whole random permutations of the buffer followed by a draw without replacement for the rest, so that no
    slot is used more than ceil(n / buffer_len) times.
    """
    if buffer_len < 1:
        raise ValueError(f"mixup needs a buffer image to mix with, got a buffer of {buffer_len}")
    lam = float(rng.beta(alpha, alpha))
    full, rest = divmod(int(n), int(buffer_len))
    parts = [rng.permutation(buffer_len) for _ in range(full)]
    parts.append(rng.choice(buffer_len, size=rest, replace=False))
    return lam, np.concatenate(parts).astype(np.int64)


class MixupPlugin(SupervisedPlugin, supports_distributed=True):
    """LUMP mixup of the stream images with images of `replay`'s buffer (see the module docstring)."""

    state_key = "cl.mixup"

    def __init__(self, replay: ReplayBufferPlugin, *, alpha: float = 0.4, seed: int = 0) -> None:
        super().__init__()
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0 (lambda ~ Beta(alpha, alpha)), got {alpha}")
        if not isinstance(replay, ReplayBufferPlugin):
            raise TypeError(f"MixupPlugin mixes with the buffer of a ReplayBufferPlugin, got {type(replay).__name__}: "
                            "pass the ReplayBufferPlugin (size > 0) that is in the strategy's plugins too")
        self.replay, self.alpha = replay, float(alpha)
        self.rng = np.random.default_rng(derive_seed(seed, "mixup"))
        self.last_lam: float | None = None

    def before_training(self, strategy, **kwargs) -> None:
        if not any(p is self.replay for p in strategy.plugins):  # its buffer would stay empty: no image mixed
            raise ValueError("MixupPlugin's ReplayBufferPlugin is not among the strategy's plugins, so its buffer "
                             "never fills and nothing would be mixed: pass it in plugins=[replay, mixup, ...] too")

    def before_forward(self, strategy, **kwargs) -> None:
        buffer = self.replay.buffer
        if len(buffer) == 0:
            return
        x = strategy.mbatch[0]
        stream = self.replay.stream_images
        n_local = len(x) if stream is None else len(stream)  # rows after these were appended by a plugin
        n_global = global_stream_size(strategy, n_local)
        lam, partners = sample_mixup(self.rng, self.alpha, n_global, len(buffer))
        lo, hi = ddp.shard_bounds(n_global)
        mine = buffer.contents()[host_to_device(torch.as_tensor(partners[lo:hi]), buffer.device)]
        mixed = mix_images(x[:n_local], mine.to(x.device), lam)
        strategy.mbatch[0] = torch.cat([mixed, to_float(x[n_local:])]) if len(x) > n_local else mixed
        strategy.counters.buffer_images += n_global
        self.last_lam = lam

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
