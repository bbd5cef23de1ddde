"""The authors' EMP-SSL training pipeline, rebuilt for the speed benchmark (bench/speed.py).

Written from the facts in shared/reference/README.md and the issue text, not from their code:

* data: every image is a PIL image; a DataLoader worker applies the torchvision (v1, PIL) transform
  chain once per patch, n times per image, and the default collate stacks the n patch lists; the
  training loop concatenates them patch-major (row i*B + b is patch i of image b);
* transform per patch: RandomResizedCrop(32, scale=(0.25, 0.25), ratio=(1, 1)), RandomHorizontalFlip,
  RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.2), p=0.8), RandomGrayscale(0.2),
  a Gaussian blur with p 0.1 (PIL's ``ImageFilter.GaussianBlur(sigma)``, sigma uniform in [0.1, 2], as the
  authors' code blurs: not truncated to a few taps), RandomSolarize(128, p=0.1), ToTensor, Normalize;
* objective in float32: the total coding rate as a d x d ``torch.logdet`` of I + d/(B eps2) Z_i^T Z_i
  for each of the n patch blocks in a Python loop, and the invariance as the mean cosine similarity of
  each block with the patch average, loss = -mean R - lambda * mean cos;
* optimiser: torch.optim.SGD (lr 0.3, momentum 0.9, Nesterov, weight decay 1e-4) wrapped by a LARS
  wrapper that, before each SGD step, rescales the gradient of every weight tensor by its trust ratio
  computed parameter by parameter on the host side (eta 0.005, clipped at the base lr), with weight decay
  moved into the gradient; 1-D parameters (biases, norms) get neither scaling nor weight decay;
* cosine learning rate stepped per iteration, no warm-up; NCHW (contiguous) model, no autocast.

The model is passed in: the benchmark reuses streaming_ssl.models.EMPSSLModel, which has the same
layer shapes as their ResNet-18-cifar + 512 -> 4096 -> 4096 -> 1024 projector, so the comparison
isolates the pipeline (data, augmentation, objective, optimiser) from the network definition.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torchvision import transforms

__all__ = [
    "LARSWrapper",
    "MultiPatchPILDataset",
    "PILGaussianBlur",
    "make_loader",
    "patch_transform",
    "reference_coding_rate",
    "reference_loss",
    "reference_step",
]


class PILGaussianBlur:
    """With probability p, PIL's Gaussian blur with sigma uniform in ``sigma`` (both drawn from torch's generator,
    which DataLoader seeds per worker)."""

    def __init__(self, p: float = 0.1, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.p, self.sigma = float(p), (float(sigma[0]), float(sigma[1]))

    def __call__(self, img: Image.Image) -> Image.Image:
        if float(torch.rand(())) >= self.p:
            return img
        lo, hi = self.sigma
        return img.filter(ImageFilter.GaussianBlur(lo + (hi - lo) * float(torch.rand(()))))


def patch_transform(out_size: int = 32, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)):
    """The per-patch PIL transform chain (one call = one augmented patch as a float tensor)."""
    return transforms.Compose([
        transforms.RandomResizedCrop(out_size, scale=(0.25, 0.25), ratio=(1.0, 1.0)),
        transforms.RandomHorizontalFlip(p=0.5),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.2)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        PILGaussianBlur(p=0.1, sigma=(0.1, 2.0)),
        transforms.RandomSolarize(threshold=128, p=0.1),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


class MultiPatchPILDataset(torch.utils.data.Dataset):
    """Sample i: ([n augmented patches of image i, each a (3, S, S) float tensor], label).

    Args:
        images: uint8 numpy array (N, H, W, 3), RGB (what torchvision's CIFAR10 dataset holds).
        labels: int array (N,).
        n_patches: patches per image.
        transform: the per-patch transform (default: :func:`patch_transform`).
    """

    def __init__(self, images: np.ndarray, labels, n_patches: int, transform=None) -> None:
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        self.images, self.labels = images, np.asarray(labels)
        self.n_patches = int(n_patches)
        self.transform = transform if transform is not None else patch_transform(images.shape[1])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i])
        return [self.transform(img) for _ in range(self.n_patches)], int(self.labels[i])


def make_loader(dataset: MultiPatchPILDataset, batch_size: int, *, workers: int, seed: int = 0):
    """Shuffled DataLoader with worker processes, dropping the last incomplete batch."""
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                       num_workers=workers, generator=gen, persistent_workers=False)


def reference_coding_rate(w: torch.Tensor, eps2: float = 0.2) -> torch.Tensor:
    """1/2 logdet(I_d + d/(B eps2) W^T W) of one (B, d) block, through the d x d matrix."""
    batch, dim = w.shape
    eye = torch.eye(dim, device=w.device, dtype=w.dtype)
    return torch.logdet(eye + (dim / (batch * eps2)) * (w.T @ w)) / 2.0


def reference_loss(z: torch.Tensor, n_patches: int, *, eps2: float = 0.2, lam: float = 200.0):
    """(loss, mean coding rate, mean cosine) of patch-major projections z (n*B, d), block by block."""
    blocks = z.chunk(n_patches, dim=0)
    z_avg = torch.stack(blocks, dim=0).mean(dim=0)
    cos = 0.0
    for block in blocks:
        cos = cos + F.cosine_similarity(block, z_avg, dim=1).mean()
    cos = cos / n_patches
    tcr = 0.0
    for block in blocks:
        tcr = tcr + reference_coding_rate(block, eps2)
    tcr = tcr / n_patches
    return -tcr - lam * cos, tcr, cos


class LARSWrapper:
    """Layer-wise adaptive rate scaling around an existing optimizer (SGD), in the reference's style.

    Before the wrapped ``step``, each parameter with more than one dimension gets
    ``g <- (g + wd p) * min(eta ||p|| / (||g|| + wd ||p|| + eps) / lr, 1)`` (when both norms are
    non-zero, tested on the host). The wrapped optimizer then runs with weight decay 0, so 1-D
    parameters get no weight decay at all.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, eta: float = 0.005, clip: bool = True,
                 eps: float = 1e-8, exclude_1d: bool = True) -> None:
        self.optim, self.eta, self.clip, self.eps, self.exclude_1d = optimizer, eta, clip, eps, exclude_1d

    @property
    def param_groups(self):
        return self.optim.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optim.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        decays = []
        for group in self.optim.param_groups:
            wd = group.get("weight_decay", 0.0)
            decays.append(wd)
            group["weight_decay"] = 0.0
            for p in group["params"]:
                if p.grad is None or (self.exclude_1d and p.ndim <= 1):
                    continue
                self._rescale(p, group["lr"], wd)
        self.optim.step()
        for group, wd in zip(self.optim.param_groups, decays):
            group["weight_decay"] = wd

    def _rescale(self, p: torch.Tensor, lr: float, wd: float) -> None:
        p_norm = torch.norm(p)
        g_norm = torch.norm(p.grad)
        if p_norm != 0 and g_norm != 0:  # host-side test, one sync per parameter
            rate = self.eta * p_norm / (g_norm + wd * p_norm + self.eps)
            if self.clip:
                rate = torch.clamp(rate / lr, max=1.0)
            p.grad.add_(p, alpha=wd).mul_(rate)


def make_optimizer(model: torch.nn.Module, *, lr: float = 0.3) -> LARSWrapper:
    """SGD(lr, momentum 0.9, Nesterov, wd 1e-4) wrapped by LARS(eta 0.005, clip)."""
    sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4, nesterov=True)
    return LARSWrapper(sgd, eta=0.005, clip=True)


def cosine_lr(step: int, total: int, base_lr: float) -> float:
    """Cosine decay to 0 over ``total`` iterations, no warm-up."""
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def reference_step(model: torch.nn.Module, optimizer: LARSWrapper, patch_list, n_patches: int, *,
                   device: torch.device, lr: float, eps2: float = 0.2, lam: float = 200.0) -> torch.Tensor:
    """One training iteration on a collated batch (list of n (B, 3, S, S) tensors); returns the loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    data = torch.cat(patch_list, dim=0).to(device)
    model.zero_grad(set_to_none=True)
    optimizer.zero_grad()
    out = model(data)
    z = out[1] if isinstance(out, tuple) else out
    loss, _, _ = reference_loss(z, n_patches, eps2=eps2, lam=lam)
    loss.backward()
    optimizer.step()
    return loss.detach()
