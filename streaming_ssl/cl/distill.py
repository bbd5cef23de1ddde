"""Distillation (CaSSLe, Fini et al., "Self-supervised models are continual learners", CVPR 2022; PFR,
Gomez-Villa et al., "Continually learning self-supervised representations with projected functional
regularization", CVPR Workshops 2022).

A frozen copy of the model is taken at each experience boundary (or every N updates where a stream has
no boundaries); a trainable predictor g maps the current projections z of the update's patches to the
frozen model's projections z' of the same patches, and the loss gains

    L_distill = w * 1/M sum_m (1 - cos(g(z_m), z'_m))           over the M = n*B patches of the update

so that what the new model learns stays predictive of what the old one knew. g is CaSSLe's 2-layer
MLP Linear(d, hidden)-BN-ReLU-Linear(hidden, d). `space="h"` is PFR: the same term on the encoder's features h
(what the probes read) instead of the projections: g maps the current h to the frozen h, and the projector is left
free (no gradient of the term reaches it). The frozen model runs under inference_mode with the training
autocast; it never has a gradient. Its BatchNorm (`frozen_bn`): "running" (the default) normalises with the
running statistics the copy was taken with (eval mode), so that a patch's target does not depend on the other
patches of the update; "batch" normalises with each update's own statistics and leaves the running ones as
they were, as CaSSLe's code does (it deep-copies its encoder after Lightning has put the module in train mode
and never calls eval()). Before the first boundary there is no frozen model and no term.

The plugin (DistillPlugin):
  before_training: under DDP, gives every rank rank 0's predictor (it lives outside the DDP wrapper, which
      broadcasts only the model).
  after_training_exp (every = 0) / after_training_iteration (every = N): takes the frozen copy of
      `strategy.core_model` (rank 0's BatchNorm buffers on every rank under DDP).
  before_backward: adds the term to `strategy.loss` (and `distill` to `strategy.last_stats`), counts
      the frozen model's patches in `counters.frozen_forwards`.
  after_backward: under DDP, averages the predictor's gradients over ranks in one coalesced all-reduce (the
      predictor lives outside the DDP wrapper; the model's gradients through z are averaged by DDP).
The predictor is in `trainable_modules` (the optimizer gets it) and, with the frozen copy, in the
checkpoint (`state_key`); it is not part of the probed model.

DDP: each rank's term is scaled by (its patches / the global patches) x world, so that DDP's averaging
gives the gradient of the mean over the global batch, also for uneven shares. With `sync_bn` (what
build_cl_plugins sets on CUDA under DDP with model.sync_bn, as for the model) the predictor's BatchNorm is a
SyncBatchNorm: it normalises with the statistics of the global batch, so the averaged gradient is the one
process's. Without it (gloo: PyTorch's SyncBatchNorm is CUDA-only) each rank normalises its own patches.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from avalanche.benchmarks.scenarios.online import OnlineCLExperience
from avalanche.core import SupervisedPlugin

from streaming_ssl import distributed as ddp
from streaming_ssl.cl.common import global_update_images
from streaming_ssl.device import autocast
from streaming_ssl.plugins import EvalSchedule

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ pure maths
def distill_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean_m (1 - cos(pred_m, target_m)) in float32.

    Args:
        pred: (M, d) predictions g(z) of the current model's projections.
        target: (M, d) the frozen model's projections of the same M patches (no gradient flows to it).

    Returns:
        A float32 scalar in [0, 2].
    """
    with torch.autocast(device_type=pred.device.type, enabled=False):
        cos = F.cosine_similarity(pred.float(), target.detach().float(), dim=-1)
    return (1.0 - cos).mean()


def build_predictor(dim: int, hidden_dim: int) -> torch.nn.Sequential:
    """CaSSLe's predictor: Linear(dim, hidden)-BatchNorm1d-ReLU-Linear(hidden, dim)."""
    return torch.nn.Sequential(torch.nn.Linear(dim, hidden_dim), torch.nn.BatchNorm1d(hidden_dim),
                               torch.nn.ReLU(inplace=True), torch.nn.Linear(hidden_dim, dim))


FROZEN_BN = ("running", "batch")
SPACES = ("z", "h")  # what is distilled: the projections (CaSSLe) or the encoder's features (PFR)


def frozen_copy(model: torch.nn.Module, bn: str = "running") -> torch.nn.Module:
    """A deep copy of `model` with requires_grad False (not compiled: it runs rarely changed).

    Args:
        model: the model to copy.
        bn: "running": in eval mode, so its BatchNorm normalises with the running statistics it was copied with;
            "batch": in train mode with the running statistics untracked, so that every forward normalises with
            its own batch's statistics and leaves the running ones as they were (CaSSLe's frozen copy).
    """
    if bn not in FROZEN_BN:
        raise ValueError(f"bn must be one of {FROZEN_BN}, got {bn!r}")
    frozen = copy.deepcopy(model)
    if getattr(frozen, "_compiled_call_impl", None) is not None:  # Module.compile() wraps the original's call
        frozen._compiled_call_impl = None
    frozen.requires_grad_(False)
    if bn == "running":
        return frozen.eval()
    for m in frozen.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False  # in train mode: batch statistics, running ones neither read nor updated
    return frozen.train()


# ------------------------------------------------------------------------------------------ the plugin
def parent_end(strategy) -> bool | None:
    """Whether the experience training now ends a parent experience: EvalSchedule's `strategy.at_boundary` (set
    before the experience trains, so the plugins' order does not matter); else None on an online stream's
    mini-experience (Avalanche 0.6's split_online_stream marks is_last_subexp only on a short last one, so where a
    parent's size divides by the mini-experience size no mini-experience says it ends it); else True (every
    experience is one)."""
    flag = getattr(strategy, "at_boundary", None)
    if flag is not None:
        return bool(flag)
    return None if isinstance(strategy.experience, OnlineCLExperience) else True


class DistillPlugin(SupervisedPlugin, supports_distributed=True):
    """CaSSLe distillation (see the module docstring).

    Args:
        model: the trained model without its DDP wrapper (copied at boundaries; the architecture of a
            restored frozen copy).
        dim: size of the distilled features: z (model.proj_dim) with space "z", h (model.feature_dim) with "h".
        hidden_dim: hidden width of the predictor.
        weight: w of the term (200 = the invariance weight of EMP-SSL's objective, CaSSLe's choice of equal weights).
        every: 0 freezes a copy at the end of every experience (online: of every parent experience, read
            from `strategy.at_boundary`, which an EvalSchedule plugin sets; without one an online stream is
            refused); N > 0 every N updates.
        device: where the predictor lives (the training device).
        sync_bn: the predictor's BatchNorm as a SyncBatchNorm (under DDP on CUDA; the same state_dict keys).
        frozen_bn: the frozen copy's BatchNorm statistics, "running" or "batch" (see :func:`frozen_copy`).
        space: "z" (CaSSLe: the projections) or "h" (PFR: the encoder's features).
    """

    state_key = "cl.distill"

    def __init__(self, model: torch.nn.Module, *, dim: int, hidden_dim: int = 2048, weight: float = 200.0,
                 every: int = 0, device: torch.device | str = "cpu", sync_bn: bool = False,
                 frozen_bn: str = "running", space: str = "z") -> None:
        super().__init__()
        if every < 0:
            raise ValueError(f"every must be >= 0 (0: at experience boundaries), got {every}")
        if frozen_bn not in FROZEN_BN:
            raise ValueError(f"frozen_bn must be one of {FROZEN_BN}, got {frozen_bn!r}")
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES} (z: CaSSLe, h: PFR), got {space!r}")
        self.model, self.weight, self.every, self.frozen_bn = model, float(weight), int(every), frozen_bn
        self.space = space
        inner = getattr(model, "module", model)  # an EMPSSLModel's sizes (DDP unwrapped)
        if space == "z":
            projector = getattr(inner, "projector", None)
            out = projector[-1].out_features if isinstance(projector, torch.nn.Sequential) and isinstance(
                projector[-1], torch.nn.Linear) else None
            what = "projects to"
        else:
            out, what = getattr(inner, "feature_dim", None), "has features h of"
        if isinstance(out, int) and out != dim:
            raise ValueError(f"DistillPlugin(dim={dim}, space={space!r}), but the model {what} {out} dimensions: pass "
                             f"dim={out} (the model's {'proj_dim' if space == 'z' else 'feature_dim'}; the predictor "
                             f"maps {space} to {space})")
        predictor = build_predictor(dim, hidden_dim)
        if sync_bn:
            predictor = torch.nn.SyncBatchNorm.convert_sync_batchnorm(predictor)
        self.predictor = predictor.to(device)
        self.trainable_modules = [self.predictor]
        self.frozen: torch.nn.Module | None = None

    def snapshot(self, strategy) -> None:
        """Freeze a copy of the current model (rank 0's BatchNorm running statistics on every rank)."""
        self.frozen = frozen_copy(strategy.core_model, self.frozen_bn)
        ddp.broadcast_buffers(self.frozen)
        log.debug("distill: frozen copy taken at update %d", strategy.global_step)

    def before_training(self, strategy, **kwargs) -> None:
        # (EMPSSLStrategy has refused a predictor outside its optimizer: every plugin's trainable_modules are checked)
        ddp.broadcast_module(self.predictor)  # under DDP: every rank starts from rank 0's predictor

    def before_training_exp(self, strategy, **kwargs) -> None:
        # (EvalSchedule, wherever it stands in the list, sets the flag in its own before_training_exp)
        scheduled = any(isinstance(p, EvalSchedule) for p in strategy.plugins)
        if self.every == 0 and not scheduled and parent_end(strategy) is None:
            raise ValueError("DistillPlugin(every=0) freezes a copy at the end of each parent experience, but on "
                             "this online stream no EvalSchedule maps the mini-experiences to their parents (their "
                             "own is_last_subexp is not reliable in Avalanche 0.6): add the plugin "
                             "EvalSchedule(step_parent, every), or pass every=N to freeze a copy every N updates")

    def after_training_exp(self, strategy, **kwargs) -> None:
        if self.every == 0 and parent_end(strategy):
            self.snapshot(strategy)

    def after_training_iteration(self, strategy, **kwargs) -> None:
        if self.every and strategy.global_step % self.every == 0:
            self.snapshot(strategy)

    def before_backward(self, strategy, **kwargs) -> None:
        if self.frozen is None:
            return
        patches = strategy.mb_patches
        current = strategy.mb_output if self.space == "z" else strategy.mb_features
        with torch.inference_mode(), autocast(strategy.device, strategy.amp_dtype):
            h_frozen, z_frozen = self.frozen(patches)
        # a normal tensor (inference tensors cannot be saved for backward)
        target = (z_frozen if self.space == "z" else h_frozen).clone()
        with autocast(strategy.device, strategy.amp_dtype):
            pred = self.predictor(current)
        local_images = len(current) // strategy.n_patches
        # DDP, a global batch smaller than the world: no patch here, and the mean over none would be NaN; a zero that
        # still reaches the predictor, so that every rank has its gradients to average
        term = distill_loss(pred, target) if local_images else pred.sum() * 0.0
        global_images = global_update_images(strategy, local_images)
        scale = local_images * ddp.world_size() / global_images
        strategy.loss = strategy.loss + (self.weight * scale) * term
        strategy.last_stats["distill"] = term.detach()
        strategy.counters.frozen_forwards += strategy.n_patches * global_images

    def after_backward(self, strategy, **kwargs) -> None:
        if not ddp.is_dist() or self.frozen is None:
            return
        ddp.average_grads_(self.predictor.parameters())  # one all-reduce for the predictor's 6 tensors

    def state_dict(self) -> dict:
        return {"predictor": self.predictor.state_dict(),
                "frozen": None if self.frozen is None else self.frozen.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.predictor.load_state_dict(state["predictor"])
        self.frozen = None
        if state["frozen"] is not None:
            frozen = frozen_copy(self.model, self.frozen_bn)
            frozen.load_state_dict(state["frozen"])
            self.frozen = frozen
