"""torchrun / DDP helpers: one code path whether or not the process is part of a group.

Outside torchrun every helper is the identity: rank 0 of a world of 1.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def env_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the torchrun environment, or (0, 0, 1)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))


def local_world_size() -> int:
    """Processes of this run on this node (torchrun's LOCAL_WORLD_SIZE), 1 outside torchrun."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


TRAIN_SCRIPT = "streaming-ssl-train"  # the installed console script (pyproject.toml), = python run_stream.py


def relaunch() -> str:
    """How to start this run again, for messages: the program this process runs (the console script
    streaming-ssl-train where it was started so, else python run_stream.py); under torchrun, the same torchrun
    command with it."""
    program = TRAIN_SCRIPT if sys.argv and os.path.basename(sys.argv[0]) == TRAIN_SCRIPT else "run_stream.py"
    if is_dist():
        return f"the same torchrun command with {program}"
    return program if program == TRAIN_SCRIPT else f"python {program}"


def init_from_env(device_type: str) -> bool:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU). Returns True under DDP."""
    _, local_rank, world = env_world()
    # under torchrun a group is made even for one process (NCCL, SyncBatchNorm and DDP then run as at scale)
    if (world <= 1 and "TORCHELASTIC_RUN_ID" not in os.environ) or dist.is_initialized():
        return dist.is_initialized()
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    backend = "nccl" if device_type == "cuda" else "gloo"
    # every rank says it, before it waits for the others (a start that hangs shows which rank never came)
    log.info("rank %d of %d: joining the process group (%s)", env_world()[0], world, backend)
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return True


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def syncs_batchnorm(requested: bool, device_type: str) -> bool:
    """Whether BatchNorm layers become SyncBatchNorm: asked for (model.sync_bn), inside a process group, and on
    CUDA (PyTorch's SyncBatchNorm is CUDA-only; on gloo each rank normalises with its own batch statistics)."""
    return bool(requested) and is_dist() and device_type == "cuda"


def barrier() -> None:
    if is_dist():
        dist.barrier()


def leave() -> None:
    """Leave the process group (NCCL warns at exit about one never destroyed)."""
    if is_dist():
        dist.destroy_process_group()


def gather_patch_blocks(blocks: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Differentiable all-gather of (n, B_r, d) blocks along the batch dim -> (n, sum_r B_r, d), rank order.

    Ranks may hold different B_r (the last batch of an experience): blocks are padded to the largest
    share, gathered, and trimmed. The backward pass sums the gradients of every rank into the local
    slice, so with DDP's gradient averaging N ranks of B/N images give the gradients of one rank of B.

    `sizes` (every rank's B_r, the same list on every rank) spares the exchange of the shares' sizes; without
    it they are gathered, which reads them back on the host: one synchronisation with the device per call.
    """
    if not is_dist():
        return blocks
    from torch.distributed.nn.functional import all_gather

    if sizes is None:
        sizes = all_gather_cat(torch.tensor([blocks.shape[1]], device=blocks.device)).tolist()
    elif len(sizes) != world_size() or sizes[rank()] != blocks.shape[1]:
        raise ValueError(f"rank {rank()} holds {blocks.shape[1]} images, but the sizes given for the world of "
                         f"{world_size()} are {sizes}")
    largest = max(sizes)
    if blocks.shape[1] < largest:
        pad = blocks.new_zeros(blocks.shape[0], largest - blocks.shape[1], blocks.shape[2])
        blocks = torch.cat([blocks, pad], dim=1)
    parts = all_gather(blocks.contiguous())
    return torch.cat([part[:, :size] for part, size in zip(parts, sizes)], dim=1)


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank rank `src`'s buffers (BatchNorm running statistics), in place.

    DDP broadcasts rank 0's buffers at the start of every forward, but the forward itself then updates
    each rank's running statistics with its own share of the batch (without SyncBatchNorm, e.g. on CPU),
    so after the last update the ranks hold different statistics. Call this before an evaluation that
    runs on every rank, so that all ranks use the model rank 0 checkpoints.
    """
    _broadcast_tensors(module.buffers(), src)


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank rank `src`'s parameters and buffers, in place: for a trained module outside the DDP wrapper
    (which broadcasts only the model it wraps), so that the ranks start it from the same values."""
    _broadcast_tensors([*module.parameters(), *module.buffers()], src)


def _broadcast_tensors(tensors, src: int) -> None:
    if not is_dist():
        return
    for t in tensors:
        if t.is_contiguous():
            dist.broadcast(t.data, src)
        else:
            tmp = t.data.contiguous()
            dist.broadcast(tmp, src)
            t.data.copy_(tmp)


def average_grads_(params) -> int:
    """Average the gradients of `params` over the ranks, in place, with one all-reduce per (device, dtype) group
    (a coalesced flat buffer instead of one collective per tensor). For parameters outside a DDP wrapper, whose
    gradients DDP does not average. Every rank must pass the same parameters with the same gradients present.
    Returns the number of collectives issued (0 outside DDP)."""
    if not is_dist():
        return 0
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    world = world_size()
    for grads in groups.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    return len(groups)


def all_gather_object(obj) -> list:
    """Every rank's object, in rank order (a one-element list outside DDP)."""
    if not is_dist():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Non-differentiable gather of equal-length first dims, concatenated in rank order, on t's device.

    NCCL only moves CUDA tensors, so under NCCL a tensor held elsewhere (probe features on the CPU) goes over
    through this rank's GPU and comes back."""
    if not is_dist():
        return t
    home = t.device
    if dist.get_backend() == "nccl" and home.type != "cuda":
        t = t.to(torch.device("cuda", torch.cuda.current_device()))
    out = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out).to(home)


def any_rank_flag(flag: bool, device: torch.device) -> torch.Tensor:
    """1 (int32, one element) on every rank if `flag` is set on any rank, else 0; not read back here, so on CUDA the
    host does not wait (the caller reads it when it chooses). Under NCCL it lives on `device` (this rank's GPU),
    under gloo on the CPU; outside DDP it is the flag itself."""
    if is_dist() and dist.get_backend() != "nccl":
        device = torch.device("cpu")
    out = torch.full((1,), int(flag), dtype=torch.int32, device=device)  # a fill: no copy from the host
    if is_dist():
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank `src`'s values into `t` on every rank, in place (every rank passes a tensor of the same shape and dtype,
    on its training device: its GPU under NCCL); nothing is read back, so on CUDA the host does not wait. Returns
    `t`."""
    if is_dist():
        dist.broadcast(t, src)
    return t


def share_sizes(parts: list[int], world: int | None = None) -> list[int]:
    """Every rank's number of rows of a batch made of `parts` (global sizes, in order), each part split across
    the ranks with shard_bounds: what each rank holds, known on every rank without communication."""
    w = world_size() if world is None else world
    return [sum(hi - lo for lo, hi in (shard_bounds(n, r, w) for n in parts)) for r in range(w)]


def shard_bounds(n: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous share of n items (sizes differ by at most one)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)
