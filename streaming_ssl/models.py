"""ResNet-18 backbones with a width multiplier, the EMP-SSL pre-feature layer and projector.

    x -> backbone (ResNet-18, global pooled, 512*width) -> pre-feature Linear-BN-ReLU -> h
    h -> projector Linear-BN-ReLU-Linear -> z, L2-normalised

Probes read h; the objective reads z. Stems: 'cifar' (3x3 stride-1 conv, no max-pool, for 32x32),
'tiny' (3x3 stride-1 conv and a 2x2 max-pool, so 64x64 inputs cost what CIFAR does after the stem),
'imagenet' (7x7 stride-2 conv and a 3x3 stride-2 max-pool).

Activation memory: `recompute_stages=k` keeps only the inputs of the stem and of every block of the
first k stages in training, and recomputes their activations during backward, one block at a time
(torch.utils.checkpoint, non-reentrant). The front of a ResNet holds most of the activation memory at
the least compute per byte: on 32x32 patches stage 1 stores about half of all activations for a
quarter of the forward FLOPs. Gradients and BatchNorm statistics are those of the plain model (the
recomputation does not update running statistics a second time).

`recompute_bn_relu=True` drops one more activation of the four a block stores: the output of its first
BatchNorm+ReLU, which the second convolution would keep for its weight gradient, is rebuilt in backward
from the first convolution's output (kept anyway for the BatchNorm's own backward). The price is one
BatchNorm forward per block in backward, no convolution. Within recomputed stages it lowers the peak of
their backward too. Layers that are not a plain BatchNorm2d (SyncBatchNorm under DDP) take the stored path.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

STEMS = ("cifar", "tiny", "imagenet")
ARCHS = ("resnet18",)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (projection shortcut when the shape changes)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, recompute_bn_relu: bool = False) -> None:
        super().__init__()
        self.recompute_bn_relu = recompute_bn_relu
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        if self.recompute_bn_relu and self.training and torch.is_grad_enabled() and _fusable(self.bn1):
            out = bn_relu_conv(out, self.bn1, self.conv2)
        else:
            out = self.conv2(F.relu(self.bn1(out), inplace=True))
        out = self.bn2(out)
        out += self.shortcut(x)  # in place: the BatchNorm does not keep its output, so no temporary is needed
        return F.relu(out, inplace=True)


class ResNet18(nn.Module):
    """ResNet-18 trunk; forward gives the global-average-pooled feature of size `out_dim`."""

    def __init__(self, stem: str = "cifar", width: float = 1.0, recompute_stages: int = 0,
                 recompute_bn_relu: bool = False) -> None:
        super().__init__()
        if not 0 <= recompute_stages <= 4:
            raise ValueError(f"recompute_stages must be 0..4 (stages of ResNet-18), got {recompute_stages}")
        self.recompute_stages = recompute_stages
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; valid: {', '.join(STEMS)}")
        if width <= 0:
            raise ValueError(f"width multiplier must be positive, got {width}")
        chans = [max(1, int(round(c * width))) for c in (64, 128, 256, 512)]
        if stem == "imagenet":
            self.stem = nn.Sequential(nn.Conv2d(3, chans[0], 7, 2, 3, bias=False), nn.BatchNorm2d(chans[0]),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        else:
            layers = [nn.Conv2d(3, chans[0], 3, 1, 1, bias=False), nn.BatchNorm2d(chans[0]), nn.ReLU(inplace=True)]
            if stem == "tiny":
                layers.append(nn.MaxPool2d(2, 2))
            self.stem = nn.Sequential(*layers)
        stages, in_ch = [], chans[0]
        for i, ch in enumerate(chans):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(in_ch, ch, stride, recompute_bn_relu),
                                        BasicBlock(ch, ch, 1, recompute_bn_relu)))
            in_ch = ch
        self.stages = nn.Sequential(*stages)
        self.out_dim = chans[-1]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.recompute_stages if self.training and torch.is_grad_enabled() else 0
        x = _recomputed(self.stem, x) if k else self.stem(x)
        for i, stage in enumerate(self.stages):
            for block in stage:
                x = _recomputed(block, x) if i < k else block(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def _recomputed(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) keeping only x for backward; the activations are recomputed there, one block at a time (so the
    peak of the backward pass holds a single block's activations), without a second running-statistics update."""
    calls = [0]

    def run(inp: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        with _running_stats_frozen(module) if calls[0] > 1 else contextlib.nullcontext():
            return module(inp)

    return checkpoint(run, x, use_reentrant=False)


@contextlib.contextmanager
def _running_stats_frozen(module: nn.Module):
    """BatchNorm layers normalise by batch statistics as in training but leave running statistics as they are.

    momentum 0 keeps the same kernels (and so the same saved tensors, which the checkpoint's recomputation
    check compares); the step counter is put back afterwards.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


def _fusable(bn: nn.Module) -> bool:
    if type(bn) is nn.BatchNorm2d:
        return True
    if not getattr(bn, "_warned_unfused", False):
        bn._warned_unfused = True
        warnings.warn(f"recompute_bn_relu: {type(bn).__name__} is not a plain BatchNorm2d; its block stores the "
                      "BatchNorm+ReLU output as usual", stacklevel=3)
    return False


def bn_relu_conv(x: torch.Tensor, bn: nn.BatchNorm2d, conv: nn.Conv2d) -> torch.Tensor:
    """conv(relu(bn(x))) in training, keeping x (not the ReLU output) for backward; running statistics and the step
    counter are updated as nn.BatchNorm2d.forward does."""
    if conv.bias is not None or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError("bn_relu_conv needs a bias-free convolution with numeric zero padding")
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    return _BNReLUConv.apply(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, factor, bn.eps, conv.weight,
                             conv.stride, conv.padding, conv.dilation, conv.groups)


class _BNReLUConv(torch.autograd.Function):
    """BatchNorm (batch statistics) -> ReLU -> convolution; saves the BatchNorm input and its batch statistics and
    rebuilds the ReLU output in backward with the same kernel, so the weight gradient sees the forward's values."""

    @staticmethod
    def forward(ctx, x, bn_weight, bn_bias, running_mean, running_var, factor, eps, weight, stride, padding,
                dilation, groups):
        y, mean, invstd = torch.ops.aten.native_batch_norm(x, bn_weight, bn_bias, running_mean, running_var, True,
                                                           factor, eps)
        out = F.conv2d(y.relu_(), weight, None, stride, padding, dilation, groups)  # autocast applies here
        ctx.save_for_backward(x, bn_weight, bn_bias, mean, invstd, weight)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.eps = eps
        ctx.conv_dtype = out.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # at most two activation-sized temporaries at a time: the rebuilt ReLU output (for the weight gradient),
        # then the input gradient (masked in place) next to the BatchNorm's input gradient
        x, bn_weight, bn_bias, mean, invstd, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        need = ctx.needs_input_grad
        grad_out = grad_out.to(ctx.conv_dtype)
        w = weight.to(ctx.conv_dtype)
        # the forward's kernel on the same input: the same batch statistics and a bit-identical output
        y, _, _ = torch.ops.aten.native_batch_norm(x, bn_weight, bn_bias, None, None, True, 0.0, ctx.eps)
        y = y.relu_()
        grad_weight = None
        if need[7]:
            grad_weight = torch.ops.aten.convolution_backward(
                grad_out, y.to(ctx.conv_dtype), w, None, stride, padding, dilation, False, [0, 0], groups,
                [False, True, False])[1].to(weight.dtype)
        if not (need[0] or need[1] or need[2]):
            return (None,) * 7 + (grad_weight,) + (None,) * 4
        dead = y <= 0
        del y
        # the input gradient reads only the input's shape and layout, which x shares with the ReLU output
        grad_y = torch.ops.aten.convolution_backward(
            grad_out, x.to(ctx.conv_dtype), w, None, stride, padding, dilation, False, [0, 0], groups,
            [True, False, False])[0]
        grad_y = grad_y.to(x.dtype).masked_fill_(dead, 0)
        del dead
        grad_x, grad_bn_weight, grad_bn_bias = torch.ops.aten.native_batch_norm_backward(
            grad_y, x, bn_weight, None, None, mean, invstd, True, ctx.eps,
            [need[0], need[1] and bn_weight is not None, need[2] and bn_bias is not None])
        return (grad_x, grad_bn_weight, grad_bn_bias, None, None, None, None, grad_weight, None, None, None, None)


def _mlp_block(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.BatchNorm1d(out_dim), nn.ReLU(inplace=True))


class EMPSSLModel(nn.Module):
    """Backbone + pre-feature layer (h) + projector (z, unit norm)."""

    def __init__(self, *, arch: str = "resnet18", stem: str = "cifar", width: float = 1.0,
                 feature_dim: int = 4096, proj_hidden_dim: int = 4096, proj_dim: int = 1024,
                 recompute_stages: int = 0, recompute_bn_relu: bool = False) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown architecture {arch!r}; valid: {', '.join(ARCHS)}")
        self.backbone = ResNet18(stem=stem, width=width, recompute_stages=recompute_stages,
                                 recompute_bn_relu=recompute_bn_relu)
        self.pre_feature = _mlp_block(self.backbone.out_dim, feature_dim)
        self.projector = nn.Sequential(_mlp_block(feature_dim, proj_hidden_dim), nn.Linear(proj_hidden_dim, proj_dim))
        self.feature_dim = feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """h: (N, feature_dim), what the probes read."""
        return self.pre_feature(self.backbone(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, z) with z = normalize(projector(h)), both (N, .)."""
        h = self.features(x)
        z = F.normalize(self.projector(h), dim=-1)
        return h, z
