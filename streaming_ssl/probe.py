"""Frozen features and the probes that read them: a linear classifier and a weighted kNN.

Features are h, the pre-feature layer, computed once per evaluation under inference_mode (and
autocast where enabled) with the model in eval mode: either of the whole image, or a bag of features
(the mean of h over P random patches, as in the EMP-SSL paper). Probes train on the cached features.
The linear probe reports the accuracy after its last epoch, never the best epoch on the test set.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from streaming_ssl import distributed as ddp
from streaming_ssl.augment import MultiPatchAugment
from streaming_ssl.device import autocast
from streaming_ssl.seeds import derive_seed


def _probe_input(augment: MultiPatchAugment, x: torch.Tensor, patches: int, patch_seed: int) -> torch.Tensor:
    """What a probe reads of a batch: the whole images (patches=0) or `patches` plain patches each, drawn from a
    CPU generator seeded with `patch_seed`: the same crops on every device (CPU and CUDA generators give
    different numbers for one seed), so a checkpoint's bag features do not depend on where it is probed.
    Grayscale images (B, 1, H, W) are read as three equal channels, as the strategy trains on them."""
    if x.dim() == 4 and x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if not patches:
        return augment.whole_image(x)
    return augment.eval_patches(x, patches, torch.Generator().manual_seed(patch_seed))


@torch.inference_mode()
def extract_features(model: torch.nn.Module, images, augment: MultiPatchAugment, *, device: torch.device,
                     batch_size: int = 256, patches: int = 0, amp_dtype: torch.dtype | None = None,
                     channels_last: bool = True, seed: int = 0, progress: str | None = None) -> torch.Tensor:
    """h for every image, float32 on the CPU: (N, feature_dim).

    Args:
        model: has .features(x) -> (N, D); put in eval mode here and restored after.
        images: uint8 (N, 3, H, W) tensor (or (N, 1, H, W): grayscale, read as three equal channels), or anything
            indexable by a LongTensor the same way.
        patches: 0 for the whole image, else the number P of random patches averaged per image.
        seed: seeds the patch positions, so features are reproducible.
    Under DDP each rank extracts a contiguous share and the shares are gathered on every rank.
    """
    was_training = model.training
    model.eval()
    n = len(images)
    # Whole batches are shared out across ranks and batch k's patches are drawn from a generator seeded
    # by (seed, k): the features do not depend on the number of processes.
    n_batches = math.ceil(n / batch_size)
    lo_b, hi_b = ddp.shard_bounds(n_batches)
    chunks = []
    batches = range(lo_b, hi_b)
    if progress and ddp.is_main():
        batches = tqdm(batches, desc=progress, leave=False, unit="batch")
    try:
        for k in batches:
            idx = torch.arange(k * batch_size, min((k + 1) * batch_size, n))
            x = images[idx].to(device, non_blocking=True)
            inp = _probe_input(augment, x, patches, derive_seed(seed, "probe patches", k))
            if channels_last:
                inp = inp.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp_dtype):
                h = model.features(inp).float()
            if patches:
                h = h.view(patches, len(idx), -1).mean(0)
            chunks.append(h.cpu())
    finally:
        model.train(was_training)
    dim = getattr(model, "feature_dim", None) or (chunks[0].shape[1] if chunks else 0)
    local = torch.cat(chunks) if chunks else torch.zeros(0, dim)
    return _gather_rows(local, n, n_batches, batch_size)


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, images, augment: MultiPatchAugment, *, n_images: int,
                          device: torch.device, batch_size: int = 256, patches: int = 0,
                          amp_dtype: torch.dtype | None = None, seed: int = 0, progress: str | None = None) -> int:
    """Re-estimate the running statistics of the BatchNorm layers on the path to h, from unlabelled images.

    The running statistics a model carries are those of its last training batches: augmented patches (colour
    jitter, grayscale) and, after a class-incremental stream, only the classes of the last experience. Probes
    read whole images or plain patches of every class. This replaces the statistics by the exact (cumulative)
    average over `n_images` images drawn at random (seeded) from `images`, in the form the probe reads
    (whole images for patches=0, else `patches` plain patches per image). Weights are not touched; layers
    that h does not pass through (the projector's) keep their statistics. Every rank computes the same
    statistics from the same images. Returns the number of images used.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    if n_images <= 0 or not norms:
        return 0
    gen = torch.Generator().manual_seed(derive_seed(seed, "batchnorm images"))
    order = torch.randperm(len(images), generator=gen)[:n_images].sort().values
    saved = {m: ({k: v.clone() for k, v in m.state_dict().items()}, m.momentum) for m in norms}
    modes = {m: m.training for m in model.modules()}
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every batch weighs the same, the order does not matter
        m.train()
    batches = range(math.ceil(len(order) / batch_size))
    if progress and ddp.is_main():
        batches = tqdm(batches, desc=progress, leave=False, unit="batch")
    try:
        for k in batches:
            x = images[order[k * batch_size:(k + 1) * batch_size]].to(device, non_blocking=True)
            inp = _probe_input(augment, x, patches, derive_seed(seed, "batchnorm patches", k))
            with autocast(device, amp_dtype):
                model.features(inp)
    finally:
        for m, (state, momentum) in saved.items():
            m.momentum = momentum
            if int(m.num_batches_tracked) == 0:  # not on the path to h: leave it as it was
                m.load_state_dict(state)
        for m, mode in modes.items():
            m.training = mode
    return len(order)


def _gather_rows(local: torch.Tensor, n: int, n_batches: int, batch_size: int) -> torch.Tensor:
    """Every rank's rows, in order, on every rank (rank r holds the rows of its batch share)."""
    if not ddp.is_dist():
        return local
    sizes = []
    for r in range(ddp.world_size()):
        lo_b, hi_b = ddp.shard_bounds(n_batches, r)
        sizes.append(max(min(hi_b * batch_size, n) - lo_b * batch_size, 0))
    width = max(sizes)
    padded = torch.zeros(width, local.shape[1], dtype=local.dtype)
    padded[: len(local)] = local
    gathered = ddp.all_gather_cat(padded)
    return torch.cat([gathered[r * width: r * width + size] for r, size in enumerate(sizes)])


def standardize(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Centre and scale every feature by the training set's mean and std.

    A feature (nearly) constant on the training set (a ReLU unit of h that never fires there) is only centred:
    divided by its ~0 std, its values on other images would dwarf every feature the probe learnt from."""
    mean = train.mean(0, keepdim=True)
    std = train.std(0, keepdim=True)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return [(t - mean) / std for t in (train, *others)]


def train_linear_probe(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, *, epochs: int = 30,
                       lr: float = 0.1, weight_decay: float = 5e-3, batch_size: int = 256,
                       seed: int = 0) -> torch.nn.Linear:
    """A linear classifier on (already standardised) features: SGD with momentum, cosine schedule."""
    gen = torch.Generator().manual_seed(seed)
    clf = torch.nn.Linear(feats.shape[1], num_classes)
    with torch.no_grad():
        clf.weight.normal_(0, 0.01, generator=gen)
        clf.bias.zero_()
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    n = len(labels)
    steps_per_epoch = math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    with torch.enable_grad():
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen)
            for b in range(steps_per_epoch):
                idx = perm[b * batch_size:(b + 1) * batch_size]
                loss = F.cross_entropy(clf(feats[idx]), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return clf


@torch.no_grad()
def predict(clf: torch.nn.Linear, feats: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Predicted classes (N,); none for no features (e.g. seen classes without test images: accuracy NaN)."""
    preds = [clf(feats[i:i + batch_size]).argmax(1) for i in range(0, len(feats), batch_size)]
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, num_classes: int,
                *, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Weighted kNN on cosine similarity: each of the k neighbours votes exp(sim / T) for its class.

    Similarities and votes in float32 whatever the features' dtype, on the features' device."""
    train_n = F.normalize(train_feats.float(), dim=1)
    k = min(k, len(train_n))
    preds = []
    for start in range(0, len(test_feats), chunk):
        sims = F.normalize(test_feats[start:start + chunk].float(), dim=1) @ train_n.T
        top, idx = sims.topk(k, dim=1)
        votes = torch.zeros(len(top), num_classes, device=top.device)
        votes.scatter_add_(1, train_labels[idx], (top / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def linear_probe_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                          test_labels: torch.Tensor, num_classes: int, **kwargs) -> tuple[float, torch.Tensor]:
    """(final test accuracy, test predictions) of a linear probe fitted on standardised features."""
    tr, te = standardize(train_feats, test_feats)
    clf = train_linear_probe(tr, train_labels, num_classes, **kwargs)
    pred = predict(clf, te)
    return float((pred == test_labels).float().mean()), pred


WEIGHT_DECAY_GRID = (0.0, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)


def stratified_holdout(labels: torch.Tensor, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit indices, held-out indices): a seeded `fraction` of every class held out (at least one, if the class has 2+)."""
    if not 0 < fraction < 1:
        raise ValueError(f"held-out fraction must be in (0, 1), got {fraction}")
    gen = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for c in labels.unique(sorted=True):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = min(max(1, round(fraction * len(idx))), len(idx) - 1) if len(idx) > 1 else 0
        held.append(idx[:k])
        fit.append(idx[k:])
    return torch.cat(fit).sort().values, torch.cat(held).sort().values


def select_weight_decay(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                        grid: tuple[float, ...] = WEIGHT_DECAY_GRID, val_fraction: float = 0.1, seed: int = 0,
                        **kwargs) -> tuple[float, dict[float, float]]:
    """The probe weight decay with the best accuracy on a held-out part of the TRAINING features (the test set is
    never looked at); ties go to the larger decay. Returns (best, {weight decay: held-out accuracy})."""
    fit, held = stratified_holdout(labels, val_fraction, seed)
    kwargs.pop("weight_decay", None)
    # split and standardise once (the copies are the size of the features); only the fit differs per decay
    tr, va = standardize(feats[fit], feats[held])
    tr_labels, va_labels = labels[fit], labels[held]
    scores = {}
    for wd in grid:
        clf = train_linear_probe(tr, tr_labels, num_classes, weight_decay=wd, seed=seed, **kwargs)
        scores[wd] = float((predict(clf, va) == va_labels).float().mean())
    best = max(scores, key=lambda wd: (scores[wd], wd))
    return best, scores
