"""LARS on top of SGD with Nesterov momentum, and the learning-rate schedule.

One LARS step, for each parameter p with gradient g in a group that is not excluded:
    q     = eta * ||p|| / (||g|| + wd * ||p|| + 1e-8)        (q = 1 when ||p|| or ||g|| is 0)
    q     = min(q / lr, 1)                                   when clip is on
    g     = (g + wd * p) * q
Parameters in an excluded group (biases, norm weights: every 1-D tensor) get neither the scaling nor
weight decay. Then plain SGD: buf = momentum * buf + g; g = g + momentum * buf (Nesterov); p -= lr * g.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters into a LARS group (weights) and an excluded group (1-D: biases, norms)."""
    scaled, excluded = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (excluded if param.ndim <= 1 else scaled).append(param)
    return [
        {"params": scaled, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": excluded, "weight_decay": 0.0, "lars_exclude": True},
    ]


class LARS(torch.optim.Optimizer):
    """SGD (momentum, Nesterov) with layer-wise adaptive rate scaling; see the module docstring."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.3,
        *,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 1e-4,
        eta: float = 0.005,
        clip: bool = True,
        eps: float = 1e-8,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError("LARS needs lr >= 0, momentum >= 0, weight_decay >= 0 and eta > 0")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        eta=eta, clip=clip, eps=eps, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - see class docstring
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if not group["lars_exclude"]:
                    p_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(g)
                    q = group["eta"] * p_norm / (g_norm + wd * p_norm + group["eps"])
                    if group["clip"]:
                        q = torch.clamp(q / lr, max=1.0) if lr > 0 else torch.ones_like(q)
                    q = torch.where((p_norm > 0) & (g_norm > 0), q, torch.ones_like(q))
                    g = g.add(p, alpha=wd).mul_(q)
                elif wd:
                    g = g.add(p, alpha=wd)
                if mom:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = g.clone()
                    else:
                        buf.mul_(mom).add_(g)
                    g = g.add(buf, alpha=mom) if group["nesterov"] else buf
                p.add_(g, alpha=-lr)
        return loss


def cosine_lr(step: int, total_steps: int, base_lr: float, *, warmup_steps: int = 0, final_lr: float = 0.0) -> float:
    """Learning rate at update `step` (0-based) of `total_steps`: linear warm-up, then cosine to final_lr."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return final_lr + (base_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
