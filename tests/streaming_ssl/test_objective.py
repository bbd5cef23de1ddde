"""Tests of streaming_ssl.objective: the EMP-SSL loss (total coding rate + patch invariance)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from streaming_ssl.objective import coding_rate, emp_ssl_loss, invariance


def unit_rows(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).to(dtype)


def rate_reference(z: torch.Tensor, eps2: float) -> torch.Tensor:
    """0.5 * logdet(I_d + d / (B eps2) Z^T Z) in float64 through slogdet on the d x d matrix."""
    z = z.double()
    batch, dim = z.shape
    m = torch.eye(dim, dtype=torch.float64) + dim / (batch * eps2) * z.T @ z
    sign, logabsdet = torch.linalg.slogdet(m)
    assert sign.item() == 1.0
    return 0.5 * logabsdet


# ------------------------------------------------------------------------------------------- coding_rate

@pytest.mark.parametrize("batch,dim", [(4, 9), (12, 5), (7, 7)], ids=["B<d", "B>d", "B=d"])
@pytest.mark.parametrize("eps2", [0.2, 0.5])
def test_coding_rate_2d_matches_direct_logdet(batch, dim, eps2):
    z = unit_rows(batch, dim, seed=batch * 100 + dim)
    got = coding_rate(z, eps2)
    assert got.shape == ()
    want = rate_reference(z, eps2)
    assert got.double().item() == pytest.approx(want.item(), rel=1e-4)


@pytest.mark.parametrize("batch,dim", [(4, 9), (12, 5)], ids=["B<d", "B>d"])
def test_coding_rate_batched_matches_per_block(batch, dim):
    n = 3
    # blocks of deliberately different spread so that a mix-up between blocks would show
    z = unit_rows(n, batch, dim, seed=1)
    z[1] = F.normalize(z[1] + 3.0 * z[1, :1], dim=-1)  # block 1 nearly collapsed
    got = coding_rate(z, 0.2)
    assert got.shape == (n,)
    want = torch.stack([rate_reference(z[i], 0.2) for i in range(n)])
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=0)
    assert got[1] < got[0] and got[1] < got[2]


def test_coding_rate_not_normalised_and_scale_uses_real_batch():
    # rows need not be unit-norm; the scale d / (B eps2) uses the real B (no padding assumption)
    g = torch.Generator().manual_seed(3)
    z = 2.5 * torch.randn(6, 4, generator=g)
    assert coding_rate(z, 0.3).double().item() == pytest.approx(rate_reference(z, 0.3).item(), rel=1e-4)
    assert coding_rate(z[:3], 0.3).double().item() == pytest.approx(rate_reference(z[:3], 0.3).item(), rel=1e-4)


def test_coding_rate_of_zero_embeddings_is_zero():
    assert coding_rate(torch.zeros(5, 3)).item() == 0.0


def test_coding_rate_bf16_input_returns_float32():
    z = unit_rows(2, 6, 10, seed=4).to(torch.bfloat16)
    got = coding_rate(z, 0.2)
    assert got.dtype == torch.float32
    want = torch.stack([rate_reference(z[i].float(), 0.2) for i in range(2)])
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=0)


@pytest.mark.parametrize("batch,dim", [(6, 16), (16, 6)], ids=["B<d", "B>d"])
def test_coding_rate_under_bf16_autocast_is_float32_and_exact(batch, dim):
    z = unit_rows(2, batch, dim, seed=5)
    plain = coding_rate(z, 0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = coding_rate(z, 0.2)
    assert got.dtype == torch.float32
    # a bf16 Gram matrix (autocast not disabled) would be off by ~1e-3 relative; float32 agrees to ~1e-7
    torch.testing.assert_close(got, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.double(), torch.stack([rate_reference(z[i], 0.2) for i in range(2)]),
                               rtol=1e-4, atol=0)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4, 5)])
def test_coding_rate_rejects_bad_rank(shape):
    with pytest.raises(ValueError, match=r"\(B, d\) or \(n, B, d\)"):
        coding_rate(torch.randn(*shape))


# -------------------------------------------------------------------------------------------- invariance

def test_invariance_equals_hand_loop():
    g = torch.Generator().manual_seed(6)
    z = torch.randn(3, 4, 5, generator=g)  # not normalised on purpose
    n, batch, _ = z.shape
    want = []
    for i in range(n):
        total = 0.0
        for b in range(batch):
            mean_b = sum(z[j, b].double() for j in range(n)) / n
            zi = z[i, b].double()
            total += float(zi @ mean_b / (zi.norm() * mean_b.norm()))
        want.append(total / batch)
    got = invariance(z)
    assert got.shape == (n,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_invariance_is_one_for_identical_patches_and_float32_from_bf16():
    z = unit_rows(1, 4, 6, seed=7).expand(3, 4, 6).to(torch.bfloat16)
    got = invariance(z)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.ones(3), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ emp_ssl_loss

def loss_reference(z: torch.Tensor, n: int, eps2: float, lam: float) -> tuple[float, float, float]:
    """Line-by-line transcription of DESIGN.md on a patch-major (n*B, d) matrix, float64."""
    z = z.double()
    batch = z.shape[0] // n
    dim = z.shape[1]
    blocks = [z[i * batch:(i + 1) * batch] for i in range(n)]  # Z_i: rows i*B .. i*B+B-1
    rates = []
    for zi in blocks:
        m = torch.eye(dim, dtype=torch.float64) + dim / (batch * eps2) * zi.T @ zi
        rates.append(0.5 * torch.linalg.slogdet(m).logabsdet.item())
    zbar = sum(blocks) / n
    cos = []
    for zi in blocks:
        cos.append(sum(F.cosine_similarity(zi[b], zbar[b], dim=0).item() for b in range(batch)) / batch)
    tcr = sum(rates) / n
    inv = sum(cos) / n
    return -tcr - lam * inv, tcr, inv


def patch_major(blocks: torch.Tensor) -> torch.Tensor:
    n, batch, dim = blocks.shape
    return blocks.reshape(n * batch, dim)


def test_emp_ssl_loss_matches_formula_transcription():
    n, batch, dim = 3, 4, 5
    z = patch_major(unit_rows(n, batch, dim, seed=8))
    loss, stats = emp_ssl_loss(z, n, eps2=0.2, lam=200.0)
    want, tcr, inv = loss_reference(z, n, 0.2, 200.0)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert stats["tcr"].item() == pytest.approx(tcr, rel=1e-5)
    assert stats["inv"].item() == pytest.approx(inv, rel=1e-5)
    assert not stats["tcr"].requires_grad and not stats["inv"].requires_grad


def test_emp_ssl_loss_uses_eps2_and_lam():
    n, batch, dim = 3, 4, 5
    z = patch_major(unit_rows(n, batch, dim, seed=9))
    loss, _ = emp_ssl_loss(z, n, eps2=0.5, lam=7.0)
    assert loss.item() == pytest.approx(loss_reference(z, n, 0.5, 7.0)[0], rel=1e-5)


def test_emp_ssl_loss_layout_matters():
    n, batch, dim = 3, 4, 5
    blocks = unit_rows(n, batch, dim, seed=10)
    # make patches of one image similar, so that the invariance term depends on the grouping
    blocks = F.normalize(blocks + 2.0 * blocks[:1], dim=-1)
    right = patch_major(blocks)
    wrong = blocks.transpose(0, 1).reshape(n * batch, dim)  # image-major: row b*n + i
    loss_right, _ = emp_ssl_loss(right, n)
    loss_wrong, _ = emp_ssl_loss(wrong, n)
    assert loss_wrong.item() == pytest.approx(loss_reference(wrong, n, 0.2, 200.0)[0], rel=1e-5)
    assert abs(loss_right.item() - loss_wrong.item()) > 1.0


def test_emp_ssl_loss_bf16_input_gives_float32_loss():
    n = 2
    z = patch_major(unit_rows(n, 4, 6, seed=11)).to(torch.bfloat16)
    loss, _ = emp_ssl_loss(z, n)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(loss_reference(z.float(), n, 0.2, 200.0)[0], rel=1e-5)


def test_emp_ssl_loss_gradients_are_finite_and_nonzero():
    n, batch, dim = 3, 4, 5
    g = torch.Generator().manual_seed(12)
    raw = torch.randn(n * batch, dim, generator=g, requires_grad=True)
    loss, _ = emp_ssl_loss(F.normalize(raw, dim=-1), n)
    loss.backward()
    assert torch.isfinite(raw.grad).all()
    assert raw.grad.abs().sum() > 0
    # each term alone also sends a gradient
    for lam in (0.0, 200.0):
        leaf = torch.randn(n * batch, dim, generator=g, requires_grad=True)
        emp_ssl_loss(leaf, n, lam=lam)[0].backward()
        assert torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0


@pytest.mark.parametrize("shape,n", [((3, 4, 5), 3), ((12,), 3), ((10, 5), 3)],
                         ids=["3d", "1d", "rows-not-divisible"])
def test_emp_ssl_loss_rejects_bad_shapes(shape, n):
    with pytest.raises(ValueError, match=f"n={n}"):
        emp_ssl_loss(torch.randn(*shape), n)


def test_emp_ssl_loss_applies_gather_to_blocks():
    n, batch, dim = 3, 4, 5
    blocks = unit_rows(n, batch, dim, seed=13)
    seen = []

    def gather(t: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(t.shape))
        return torch.cat([t, t], 1)

    loss, stats = emp_ssl_loss(patch_major(blocks), n, gather=gather)
    assert seen == [(n, batch, dim)]  # called once, on the (n, B, d) blocks
    doubled = patch_major(torch.cat([blocks, blocks], 1))  # (n, 2B, d) -> patch-major
    want, want_stats = emp_ssl_loss(doubled, n)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert stats["tcr"].item() == pytest.approx(want_stats["tcr"].item(), rel=1e-6)
    assert loss.item() == pytest.approx(loss_reference(doubled, n, 0.2, 200.0)[0], rel=1e-5)


def test_emp_ssl_loss_gather_with_remote_rows_changes_the_loss():
    # Duplicating the batch leaves R unchanged (Z^T Z and B both double), so also gather distinct
    # "remote" rows: the loss must be that of the global batch, not of the local one.
    n, batch, dim = 3, 4, 5
    local = unit_rows(n, batch, dim, seed=16)
    remote = unit_rows(n, 2, dim, seed=17)
    loss, _ = emp_ssl_loss(patch_major(local), n, gather=lambda t: torch.cat([t, remote], 1))
    global_z = patch_major(torch.cat([local, remote], 1))
    assert loss.item() == pytest.approx(emp_ssl_loss(global_z, n)[0].item(), rel=1e-6)
    assert loss.item() == pytest.approx(loss_reference(global_z, n, 0.2, 200.0)[0], rel=1e-5)
    assert abs(loss.item() - emp_ssl_loss(patch_major(local), n)[0].item()) > 1e-2


def test_emp_ssl_loss_gradient_flows_through_gather():
    n, batch, dim = 2, 3, 4
    raw = unit_rows(n * batch, dim, seed=14).requires_grad_(True)
    other = unit_rows(n, 2, dim, seed=15)  # "remote" rows, constant
    loss, _ = emp_ssl_loss(raw, n, gather=lambda t: torch.cat([t, other], 1))
    loss.backward()
    assert raw.grad is not None and torch.isfinite(raw.grad).all() and raw.grad.abs().sum() > 0
