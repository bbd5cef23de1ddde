"""LARS on top of SGD with Nesterov momentum, and the learning-rate schedule.

One LARS step, for each parameter p with gradient g in a group that is not excluded:
    q     = eta * ||p|| / (||g|| + wd * ||p|| + 1e-8)        (q = 1 when ||p|| or ||g|| is 0)
    q     = min(q / lr, 1)                                   when clip is on
    g     = (g + wd * p) * q
Parameters in an excluded group (biases, norm weights: every 1-D tensor) get neither the scaling nor
weight decay. Then plain SGD: buf = momentum * buf + g; g = g + momentum * buf (Nesterov); p -= lr * g.

With ``foreach`` a step is a fixed number of multi-tensor ops per (device, dtype) bucket of a group
(``torch._foreach_*``; the trust ratios of all its parameters in one vector) instead of about ten ops per
parameter: on a GPU each op is a kernel launch, and ResNet-18 with its projector has 70 parameters, so the
loop dispatches 650 ops per update from Python, the buckets 29. On CUDA each of those is one fused kernel,
except the scaling of each parameter by its own ratio (a list of 0-dim tensors), which torch runs per
parameter inside its one call, without Python in between. On a CPU the loop is the faster one (116 vs
158 ms per step at width 1, one Zen 4 core, medians of 9 alternating steps), so ``foreach=None`` (the
default) takes the buckets on CUDA and the loop elsewhere, as torch's own optimisers do. On the CPU both
give bit-identical parameters, and the tests hold them to that.

Loss scaling (float16) without a host sync: LARS sets ``_step_supports_amp_scaling``, torch's contract for
optimisers that handle a ``torch.amp.GradScaler`` themselves. ``scaler.step(opt)`` then calls ``step()`` with
two device tensors set on the optimiser, ``found_inf`` (non-zero when a gradient is not finite) and
``grad_scale`` (the scale the gradients still carry, or None after ``scaler.unscale_(opt)``), instead of
reading ``found_inf`` on the host to decide whether to call ``step()`` at all. With the buckets (CUDA) the skip
happens on the device: each gradient is cleared where the flag is set (one fill per parameter: there is no
multi-tensor ``where``), and the flag masks the momentum update and the parameter update, so a skipped step
leaves parameters and momentum exactly as they were and the host never waits. (A parameter's first step, if
skipped, leaves a zero momentum buffer where it left none; the next step gives the same result either way.)
For ResNet-18 with its projector (70 parameters) GradScaler's unscale, step and update dispatch 124 ops this way,
against 38 and one host read when GradScaler decides (counted on a CPU): small launches the host queues while
the device still runs the update, instead of a wait for it. The loop reads the flag once per step on the host
and returns early: on the CPU that wait costs nothing.
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

    # GradScaler.step() hands us found_inf and grad_scale instead of deciding the skip on the host
    _step_supports_amp_scaling = True

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
        foreach: bool | None = None,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError("LARS needs lr >= 0, momentum >= 0, weight_decay >= 0 and eta > 0")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        eta=eta, clip=clip, eps=eps, lars_exclude=False)
        super().__init__(params, defaults)
        # an attribute, not a group default: the state dict (and so every checkpoint) stays as it was
        self.foreach = foreach

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - see class docstring
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # set by torch.amp.GradScaler.step() for the duration of this call (module docstring)
        found_inf: torch.Tensor | None = getattr(self, "found_inf", None)
        grad_scale: torch.Tensor | None = getattr(self, "grad_scale", None)
        skip_read: bool | None = None  # the loop's host read of found_inf, at most once per step
        for group in self.param_groups:
            buckets: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    buckets.setdefault((p.device, p.dtype, p.grad.dtype), []).append(p)
            for (device, _, _), bucket in buckets.items():
                if self.multi_tensor(device):
                    self._step_bucket(group, bucket, found_inf, grad_scale)
                    continue
                if found_inf is not None and skip_read is None:
                    skip_read = bool(found_inf)
                if skip_read:
                    continue
                for p in bucket:
                    self._step_one(group, p, grad_scale)
        return loss

    def multi_tensor(self, device: torch.device) -> bool:
        """Whether parameters on `device` step in multi-tensor buckets (`foreach`; None: on CUDA) or in the loop."""
        return bool(self.foreach) or (self.foreach is None and device.type == "cuda")

    def _step_one(self, group: dict, p: torch.Tensor, grad_scale: torch.Tensor | None = None) -> None:
        """The step of one parameter (the loop); `grad_scale`: the scale its gradient still carries."""
        lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
        g = p.grad if grad_scale is None else p.grad / grad_scale.to(p.grad.device)
        if not group["lars_exclude"]:
            p_norm = torch.linalg.vector_norm(p)
            g_norm = torch.linalg.vector_norm(g)
            g = g.add(p, alpha=wd).mul_(self._trust_ratio(group, p_norm, g_norm))
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

    def _step_bucket(self, group: dict, params: list[torch.Tensor], found_inf: torch.Tensor | None = None,
                     grad_scale: torch.Tensor | None = None) -> None:
        """The same step for parameters of one device and dtype, in multi-tensor ops; with `found_inf` (a device
        flag) the step is skipped on the device when the flag is set, and `grad_scale` divides the gradients."""
        lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
        grads = [p.grad for p in params]
        keep = None  # 1.0, or 0.0 when the step is skipped (found_inf set): a device tensor, never read here
        if grad_scale is not None:
            grads = torch._foreach_div(grads, grad_scale.to(grads[0].device))
        if found_inf is not None:
            skip = found_inf.to(grads[0].device) != 0
            # a skipped step's gradients may hold inf and nan, which no multiplication by 0 clears (in place: no copy
            # of the gradients; a step that is not skipped leaves them as they are)
            for g in grads:
                g.masked_fill_(skip, 0)
            keep = (~skip).to(grads[0].dtype)
        if not group["lars_exclude"]:
            p_norm = torch.stack(torch._foreach_norm(params))
            g_norm = torch.stack(torch._foreach_norm(grads))
            q = self._trust_ratio(group, p_norm, g_norm)
            grads = torch._foreach_add(grads, params, alpha=wd)
            torch._foreach_mul_(grads, list(q.unbind(0)))
        elif wd:
            grads = torch._foreach_add(grads, params, alpha=wd)
        # from here on `grads` may still be the .grad tensors themselves: nothing below writes into it
        if keep is not None:  # a skipped step adds nothing to the momentum (its gradients are 0, weight decay is not)
            grads = torch._foreach_mul(grads, keep)
        if mom:
            states = [self.state[p] for p in params]
            held = [i for i, st in enumerate(states) if "momentum_buffer" in st]
            if held:
                bufs = [states[i]["momentum_buffer"] for i in held]
                # a skipped step keeps the momentum: factor 1 instead of mom
                torch._foreach_mul_(bufs, mom if keep is None else keep * mom + (1 - keep))
                torch._foreach_add_(bufs, [grads[i] for i in held])
            for i, st in enumerate(states):
                if "momentum_buffer" not in st:  # the first step of this parameter
                    st["momentum_buffer"] = grads[i].clone()
            bufs = [st["momentum_buffer"] for st in states]
            grads = torch._foreach_add(grads, bufs, alpha=mom) if group["nesterov"] else bufs
            if keep is not None:  # a skipped step does not move the parameters (Nesterov's mom * buf, or buf)
                grads = torch._foreach_mul(grads, keep)
        torch._foreach_add_(params, grads, alpha=-lr)

    @staticmethod
    def _trust_ratio(group: dict, p_norm: torch.Tensor, g_norm: torch.Tensor) -> torch.Tensor:
        """q of the module docstring, elementwise over norms of any shape (one parameter or a bucket)."""
        lr, wd = group["lr"], group["weight_decay"]
        q = group["eta"] * p_norm / (g_norm + wd * p_norm + group["eps"])
        if group["clip"]:
            q = torch.clamp(q / lr, max=1.0) if lr > 0 else torch.ones_like(q)
        return torch.where((p_norm > 0) & (g_norm > 0), q, torch.ones_like(q))


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
