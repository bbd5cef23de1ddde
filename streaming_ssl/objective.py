"""The EMP-SSL objective as pure functions on tensors.

For a batch of B images, each cut into n patches, the projector gives Z with shape (n, B, d): block
Z_i holds patch i of every image, rows L2-normalised.

    R(Z_i)  = 1/2 logdet(I_d + d / (B eps2) Z_i^T Z_i)              total coding rate of one block
    zbar    = 1/n sum_i Z_i                                          mean embedding of each image
    D(Z_i)  = 1/B sum_b cos(Z_i[b], zbar[b])                         invariance of block i
    loss    = -1/n sum_i R(Z_i) - lambda * 1/n sum_i D(Z_i)

R is always computed in float32 (also under bf16 autocast). By Sylvester's identity
logdet(I_d + a Z^T Z) = logdet(I_B + a Z Z^T), so it is computed through the smaller of the two Gram
matrices, with a batched Cholesky factorisation: logdet(M) = 2 sum log diag(chol(M)).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from streaming_ssl.device import no_autocast

Gather = Callable[[torch.Tensor], torch.Tensor]


def coding_rate(z: torch.Tensor, eps2: float = 0.2) -> torch.Tensor:
    """Total coding rate of each block.

    Args:
        z: (B, d) or (n, B, d) embeddings; B is the real number of rows (no padding).
        eps2: the squared distortion epsilon^2 (> 0).

    Returns:
        A scalar for (B, d) input, else shape (n,): 1/2 logdet(I + d/(B eps2) Z^T Z) per block, float32.
    """
    squeeze = z.dim() == 2
    if squeeze:
        z = z.unsqueeze(0)
    if z.dim() != 3:
        raise ValueError(f"coding_rate expects (B, d) or (n, B, d) embeddings, got shape {tuple(z.shape)}")
    _, batch, dim = z.shape
    with no_autocast(z.device.type):
        z = z.float()
        scale = dim / (batch * eps2)
        if batch < dim:
            gram = torch.bmm(z, z.transpose(1, 2))  # (n, B, B)
        else:
            gram = torch.bmm(z.transpose(1, 2), z)  # (n, d, d)
        size = gram.shape[-1]
        eye = torch.eye(size, device=z.device, dtype=z.dtype)
        # I + a Z Z^T is positive definite for any finite Z; a failed factorisation means non-finite
        # input, reported as NaN (no exception, no host sync) so the caller's finiteness check names it.
        chol, info = torch.linalg.cholesky_ex(eye + scale * gram)
        rate = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)  # = 1/2 logdet
        rate = torch.where(info == 0, rate, torch.full_like(rate, float("nan")))
    return rate.squeeze(0) if squeeze else rate


def invariance(z: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity between each patch embedding and its image's mean embedding.

    Args:
        z: (n, B, d) embeddings (need not be normalised).

    Returns:
        (n,) float32: for each block i, 1/B sum_b cos(z[i, b], zbar[b]).
    """
    with no_autocast(z.device.type):
        z = z.float()
        zbar = z.mean(dim=0, keepdim=True)
        return F.cosine_similarity(z, zbar.expand_as(z), dim=-1).mean(dim=1)


def emp_ssl_loss(
    z: torch.Tensor,
    n_patches: int,
    *,
    eps2: float = 0.2,
    lam: float = 200.0,
    gather: Gather | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The EMP-SSL loss of a patch-major batch of projections.

    Args:
        z: (n*B, d) projections in patch-major order: row i*B + b is patch i of image b.
        n_patches: n.
        eps2: epsilon^2 of the coding rate.
        lam: weight lambda of the invariance term.
        gather: optional differentiable all-gather along dim 1 of an (n, B_local, d) tensor, giving
            (n, B_global, d); under DDP this makes the loss that of the global batch.

    Returns:
        (loss, stats): loss is a float32 scalar; stats holds detached 'tcr' (mean R) and 'inv'
        (mean cosine), kept as tensors so that logging needs no host sync.
    """
    if z.dim() != 2 or z.shape[0] % n_patches:
        raise ValueError(f"expected (n*B, d) projections with n={n_patches}, got shape {tuple(z.shape)}")
    blocks = z.view(n_patches, z.shape[0] // n_patches, z.shape[1])
    if gather is not None:
        blocks = gather(blocks)
    tcr = coding_rate(blocks, eps2).mean()
    inv = invariance(blocks).mean()
    loss = -tcr - lam * inv
    return loss, {"tcr": tcr.detach(), "inv": inv.detach()}
