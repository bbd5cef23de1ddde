"""What the continual-learning plugins share: the global batch of an update, images as uint8 or float.

Under DDP each rank holds a contiguous share (distributed.shard_bounds) of the update's global batch of
stream images; the plugins make every random decision on the global batch, with generators seeded
identically on all ranks, so that N processes do what one process does.
"""

from __future__ import annotations

import math

import torch

from streaming_ssl import distributed as ddp


def global_stream_size(strategy, local: int) -> int:
    """Stream images of this update over all ranks (the strategy's loader knows; else `local` x world)."""
    return int(getattr(strategy.dataloader, "last_global_size", 0) or local * ddp.world_size())


def global_update_images(strategy, local: int) -> int:
    """Images of this update over all ranks, stream and appended buffer images (`local`: this rank's)."""
    if not ddp.is_dist():
        return local
    stream = int(getattr(strategy.dataloader, "last_global_size", 0))
    return stream + int(strategy.mb_added) if stream else local * ddp.world_size()


def gather_global_batch(x: torch.Tensor, n_global: int) -> torch.Tensor:
    """The global batch (n_global, ...) in rank order from every rank's contiguous share `x`.

    Shares follow distributed.shard_bounds(n_global), so they may differ by one: each is padded to the
    largest, gathered, and trimmed. Not differentiable; the identity outside DDP.
    """
    if not ddp.is_dist():
        return x
    world = ddp.world_size()
    lo, hi = ddp.shard_bounds(n_global)
    if len(x) != hi - lo:
        raise ValueError(f"this rank holds {len(x)} images, but its share of a global batch of {n_global} is "
                         f"{hi - lo}: the batches must be split with distributed.shard_bounds")
    largest = math.ceil(n_global / world)
    padded = torch.cat([x, x.new_zeros(largest - len(x), *x.shape[1:])]) if len(x) < largest else x
    gathered = ddp.all_gather_cat(padded.contiguous())
    parts = []
    for r in range(world):
        r_lo, r_hi = ddp.shard_bounds(n_global, r, world)
        parts.append(gathered[r * largest:r * largest + r_hi - r_lo])
    return torch.cat(parts)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 images from uint8 or float images in [0, 1] (rounded to the nearest level), contiguous."""
    if x.dtype == torch.uint8:
        return x.contiguous()
    return (x.float() * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """float32 images in [0, 1] from uint8 (divided by 255) or float images."""
    return x.float().div(255.0) if x.dtype == torch.uint8 else x.float()


def like(images: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`images` (uint8 or float in [0, 1]) in the representation of `ref`, on its device."""
    images = images.to(ref.device)
    if ref.dtype == torch.uint8:
        return to_uint8(images)
    return to_float(images).to(ref.dtype)
