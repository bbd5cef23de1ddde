"""Tests of streaming_ssl.lars: the LARS optimiser, its parameter groups and the cosine schedule."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from streaming_ssl.lars import LARS, cosine_lr, param_groups, set_lr

EPS = 1e-8


def rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=torch.float64)


def hand_q(p: torch.Tensor, g: torch.Tensor, *, lr: float, wd: float, eta: float, clip: bool) -> float:
    p_norm, g_norm = p.norm().item(), g.norm().item()
    if p_norm == 0 or g_norm == 0:
        return 1.0
    q = eta * p_norm / (g_norm + wd * p_norm + EPS)
    return min(q / lr, 1.0) if clip else q


def hand_run(p0, grads, *, lr, weight_decay, eta, momentum, nesterov, clip):
    """Parameters after each LARS step, computed by hand (float64); also the q of each step."""
    wd = weight_decay
    p, buf, out, qs = p0.clone(), None, [], []
    for g in grads:
        q = hand_q(p, g, lr=lr, wd=wd, eta=eta, clip=clip)
        qs.append(q)
        gs = (g + wd * p) * q
        buf = gs.clone() if buf is None else momentum * buf + gs
        update = gs + momentum * buf if nesterov else buf
        p = p - lr * update
        out.append(p.clone())
    return out, qs


def lars_run(p0, grads, **kw):
    param = nn.Parameter(p0.clone())
    opt = LARS([{"params": [param], "lars_exclude": False}], **kw)
    out = []
    for g in grads:
        param.grad = g.clone()
        opt.step()
        out.append(param.detach().clone())
    return out


@pytest.mark.parametrize("regime", ["clip-active", "clip-inactive"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_two_lars_steps_match_hand_computation(regime, nesterov):
    kw = dict(lr=0.3, weight_decay=1e-2, eta=0.02, momentum=0.9, nesterov=nesterov, clip=True)
    p0 = rand(3, 4, seed=0)
    # small gradients give a large trust ratio, clipped at 1; gradients of the size of p do not
    gscale = 1e-3 if regime == "clip-active" else 1.0
    grads = [rand(3, 4, seed=1, scale=gscale), rand(3, 4, seed=2, scale=gscale)]
    want, qs = hand_run(p0, grads, **kw)
    if regime == "clip-active":
        assert qs == [1.0, 1.0]
    else:
        assert all(0 < q < 0.5 for q in qs)
    got = lars_run(p0, grads, **kw)
    for step in range(2):
        torch.testing.assert_close(got[step], want[step], rtol=1e-12, atol=1e-14)
    # the second step really used the momentum buffer: it differs from a fresh first step at p1
    fresh, _ = hand_run(want[0], grads[1:], **kw)
    assert not torch.allclose(fresh[0], want[1], rtol=1e-9, atol=0)


def test_lars_step_without_clip_matches_hand_computation():
    kw = dict(lr=0.3, weight_decay=1e-4, eta=0.005, momentum=0.9, nesterov=True, clip=False)
    p0 = rand(4, 2, seed=3)
    grads = [rand(4, 2, seed=4), rand(4, 2, seed=5)]
    want, _ = hand_run(p0, grads, **kw)
    got = lars_run(p0, grads, **kw)
    for step in range(2):
        torch.testing.assert_close(got[step], want[step], rtol=1e-12, atol=1e-14)


def test_lars_step_float32_conv_weight():
    # 4-D weights are scaled with the norm over the whole tensor
    kw = dict(lr=0.1, weight_decay=1e-3, eta=0.005, momentum=0.9, nesterov=True, clip=True)
    p0 = rand(2, 3, 3, 3, seed=6)
    grads = [rand(2, 3, 3, 3, seed=7)]
    want, qs = hand_run(p0, grads, **kw)
    assert qs[0] < 1
    got = lars_run(p0.float(), [g.float() for g in grads], **kw)
    torch.testing.assert_close(got[0], want[0].float(), rtol=1e-5, atol=1e-6)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)  # 4-D weight, 1-D bias
        self.bn = nn.BatchNorm2d(3)  # 1-D weight and bias
        self.fc = nn.Linear(3, 2)  # 2-D weight, 1-D bias
        self.bn1 = nn.BatchNorm1d(2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_param_groups_split_by_dimension():
    model = Tiny()
    groups = param_groups(model, 1e-4)
    scaled = [g for g in groups if not g["lars_exclude"]]
    excluded = [g for g in groups if g["lars_exclude"]]
    assert len(scaled) == 1 and len(excluded) == 1
    assert scaled[0]["weight_decay"] == 1e-4 and excluded[0]["weight_decay"] == 0.0
    scaled_ids = {id(p) for p in scaled[0]["params"]}
    excluded_ids = {id(p) for p in excluded[0]["params"]}
    assert scaled_ids == {id(model.conv.weight), id(model.fc.weight)}
    assert excluded_ids == {id(model.conv.bias), id(model.bn.weight), id(model.bn.bias), id(model.fc.bias),
                            id(model.bn1.weight), id(model.bn1.bias)}
    # frozen parameters are left out
    assert id(model.frozen.weight) not in scaled_ids | excluded_ids


def test_excluded_parameters_get_plain_sgd():
    torch.manual_seed(0)
    model = Tiny().double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.grad = 1e-3 * torch.randn_like(p)  # tiny gradients: LARS (if applied) would change the scale
            grads[name] = p.grad.clone()
    lr, mom, wd = 0.3, 0.9, 0.5
    opt = LARS(param_groups(model, wd), lr=lr, momentum=mom, nesterov=True, weight_decay=wd, eta=0.005)
    opt.step()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, before[name])
        elif p.ndim == 1:
            # buf = g on the first step; Nesterov update g + mom * buf; no decay, no scaling
            torch.testing.assert_close(p.detach(), before[name] - lr * (1 + mom) * grads[name], rtol=1e-12, atol=1e-15)
        else:
            want, _ = hand_run(before[name], [grads[name]], lr=lr, weight_decay=wd, eta=0.005, momentum=mom,
                               nesterov=True, clip=True)
            torch.testing.assert_close(p.detach(), want[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("clip", [True, False])
def test_zero_parameter_gets_unit_rate(clip):
    # ||p|| = 0 would give q = 0 (no update ever); the rule is q = 1
    lr, mom, wd = 0.1, 0.9, 1e-2
    param = nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))
    g = rand(3, 2, seed=8)
    param.grad = g.clone()
    LARS([param], lr=lr, momentum=mom, weight_decay=wd, eta=0.005, clip=clip).step()
    torch.testing.assert_close(param.detach(), -lr * (1 + mom) * g, rtol=1e-12, atol=1e-15)


def test_zero_gradient_gets_unit_rate():
    # ||g|| = 0: q = 1, the step is pure weight decay (without the rule q would be eta / wd = 50)
    lr, mom, wd = 0.1, 0.0, 1e-2
    p0 = rand(3, 2, seed=9)
    param = nn.Parameter(p0.clone())
    param.grad = torch.zeros_like(p0)
    LARS([param], lr=lr, momentum=mom, weight_decay=wd, eta=0.5, clip=False).step()
    torch.testing.assert_close(param.detach(), p0 - lr * wd * p0, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("clip", [True, False])
def test_zero_lr_changes_nothing(clip):
    torch.manual_seed(1)
    model = Tiny()
    before = copy.deepcopy(model.state_dict())
    opt = LARS(param_groups(model, 1e-4), lr=0.0, clip=clip)
    for _ in range(2):
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.randn_like(p)
        opt.step()
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
        assert torch.isfinite(value).all()


def test_parameters_without_grad_are_skipped():
    a = nn.Parameter(rand(2, 2, seed=10))
    b = nn.Parameter(rand(2, 2, seed=11))
    a0, b0 = a.detach().clone(), b.detach().clone()
    a.grad = rand(2, 2, seed=12)
    LARS([a, b], lr=0.1).step()
    assert not torch.equal(a.detach(), a0)
    assert torch.equal(b.detach(), b0)


def test_invalid_hyperparameters_raise():
    p = [nn.Parameter(torch.ones(2, 2))]
    for kw in (dict(lr=-0.1), dict(momentum=-0.5), dict(weight_decay=-1e-4), dict(eta=0.0)):
        with pytest.raises(ValueError, match="LARS needs"):
            LARS(p, **kw)


def test_state_dict_round_trip_gives_identical_next_step():
    torch.manual_seed(2)
    model = Tiny().double()
    kw = dict(lr=0.2, momentum=0.9, weight_decay=1e-3, eta=0.01)
    opt = LARS(param_groups(model, 1e-3), **kw)

    def set_grads(m: nn.Module, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for p in m.parameters():
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)

    set_grads(model, 0)
    opt.step()
    set_lr(opt, 0.15)  # a scheduled lr must travel with the state
    saved = copy.deepcopy(opt.state_dict())

    clone = copy.deepcopy(model)
    fresh = LARS(param_groups(clone, 1e-3), **kw)
    fresh.load_state_dict(saved)
    assert [g["lr"] for g in fresh.param_groups] == [0.15, 0.15]
    assert [g["lars_exclude"] for g in fresh.param_groups] == [False, True]

    no_state = copy.deepcopy(model)
    cold = LARS(param_groups(no_state, 1e-3), **kw)
    set_lr(cold, 0.15)

    for m, o in ((model, opt), (clone, fresh), (no_state, cold)):
        set_grads(m, 1)
        o.step()
    for (name, a), b, _c in zip(model.named_parameters(), clone.parameters(), no_state.parameters()):
        assert torch.equal(a, b), name
    # without the momentum buffers the step is different, so the comparison above means something
    assert any(not torch.equal(a, c) for a, c in zip(model.parameters(), no_state.parameters()))


def test_set_lr_sets_every_group():
    opt = LARS(param_groups(Tiny(), 1e-4), lr=0.3)
    set_lr(opt, 0.01)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.01]


# --------------------------------------------------------------------------------------------- cosine_lr

def test_cosine_lr_endpoints_and_midpoint():
    base, total = 0.3, 100
    assert cosine_lr(0, total, base) == pytest.approx(base)
    assert cosine_lr(total // 2, total, base) == pytest.approx(base / 2)
    assert cosine_lr(total, total, base) == pytest.approx(0.0, abs=1e-12)
    assert cosine_lr(total + 10, total, base) == pytest.approx(0.0, abs=1e-12)  # clamped past the end
    assert cosine_lr(25, total, base) == pytest.approx(base * 0.5 * (1 + math.cos(math.pi / 4)))


def test_cosine_lr_final_lr_and_monotone():
    base, final, total = 0.3, 0.01, 40
    lrs = [cosine_lr(s, total, base, final_lr=final) for s in range(total + 1)]
    assert lrs[0] == pytest.approx(base)
    assert lrs[-1] == pytest.approx(final)
    assert lrs[total // 2] == pytest.approx((base + final) / 2)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_cosine_lr_warmup_is_linear_then_cosine():
    base, warm, total = 0.4, 4, 24
    warmup = [cosine_lr(s, total, base, warmup_steps=warm) for s in range(warm)]
    assert warmup == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert cosine_lr(warm, total, base, warmup_steps=warm) == pytest.approx(base)
    assert cosine_lr(warm + (total - warm) // 2, total, base, warmup_steps=warm) == pytest.approx(base / 2)
    assert cosine_lr(total, total, base, warmup_steps=warm) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("total", [0, -5])
def test_cosine_lr_rejects_non_positive_total(total):
    with pytest.raises(ValueError, match="total_steps must be positive"):
        cosine_lr(0, total, 0.3)


# ------------------------------------------------------------------------------------- foreach = the loop

class Mixed(nn.Module):
    """Weights and 1-D parameters in two dtypes (two buckets per group), and one parameter left without grad."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Conv2d(3, 2, 3).double()
        self.bn = nn.BatchNorm1d(3)
        self.unused = nn.Linear(2, 2)  # never gets a gradient


def _run_steps(model: nn.Module, foreach: bool, steps: int, **kw) -> list[dict]:
    """Parameters after each step, with seeded gradients that change from step to step."""
    opt = LARS(param_groups(model, kw.pop("weight_decay")), foreach=foreach, **kw)
    out = []
    for step in range(steps):
        g = torch.Generator().manual_seed(100 + step)
        for name, p in model.named_parameters():
            if not name.startswith("unused"):
                p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype) * (1e-3 if step == 1 else 1.0)
        opt.step()
        out.append({name: p.detach().clone() for name, p in model.named_parameters()})
    return out


@pytest.mark.parametrize("kw", [
    dict(lr=0.3, momentum=0.9, nesterov=True, weight_decay=1e-4, eta=0.005, clip=True),
    dict(lr=0.3, momentum=0.9, nesterov=False, weight_decay=0.0, eta=0.02, clip=False),
    dict(lr=0.1, momentum=0.0, nesterov=False, weight_decay=1e-2, eta=0.005, clip=True),
    dict(lr=0.0, momentum=0.9, nesterov=True, weight_decay=1e-4, eta=0.005, clip=True),
], ids=["nesterov-clip", "momentum-noclip-nowd", "no-momentum", "zero-lr"])
def test_foreach_step_is_bit_identical_to_the_loop(kw):
    torch.manual_seed(3)
    model = Mixed()
    with torch.no_grad():
        model.a.weight.zero_()  # ||p|| = 0: the unit-rate rule inside a bucket
    twin = copy.deepcopy(model)
    fast = _run_steps(model, True, 3, **dict(kw))
    slow = _run_steps(twin, False, 3, **dict(kw))
    for step, (f, s) in enumerate(zip(fast, slow)):
        for name in f:
            assert torch.equal(f[name], s[name]), (step, name)
    if kw["lr"] > 0:  # the steps moved the parameters, so equality above means something
        assert not torch.equal(fast[-1]["b.weight"], fast[0]["b.weight"])
    assert torch.equal(fast[-1]["unused.weight"], twin.unused.weight)


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops dispatched (on a GPU, kernel launches), and among them the reads of a tensor's value by the
    host (.item(), bool(), int(): aten._local_scalar_dense) and the copies of a 0-dim tensor into a 0-dim one
    (`t[i] = 3`, which on a GPU copies a host scalar), both of which on a GPU wait for the device."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.reads = 0
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        self.copies += func is torch.ops.aten.copy_.default and args[0].dim() == 0 and args[1].dim() == 0
        return func(*args, **(kwargs or {}))


def ops_per_step(n_layers: int, foreach: bool | None, device: str = "cpu") -> int:
    """Top-level ops of one steady-state LARS step over n_layers Linear(4, 4) (2 parameters each)."""
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(n_layers)]).to(device)
    opt = LARS(param_groups(model, 1e-4), lr=0.3, foreach=foreach)
    counts = []
    for _ in range(2):  # the first step creates the momentum buffers; count the steady state
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        with _OpCounter() as counter:
            opt.step()
        counts.append(counter.count)
    return counts[1]


def test_foreach_step_launches_a_fixed_number_of_ops():
    # on a GPU every op is a kernel launch: the step must not cost launches per parameter
    assert ops_per_step(2, True) == ops_per_step(12, True)
    # the loop does, so the counter sees what it should
    assert ops_per_step(12, False) > 5 * ops_per_step(2, True)


def test_default_takes_the_loop_on_the_cpu():
    # the loop is the faster one there (module docstring); tests/test_cuda.py checks the CUDA side
    assert ops_per_step(12, None) == ops_per_step(12, False)


# ------------------------------------------------------------------- float16 loss scaling: skipped on the device

def _grads(model: nn.Module, step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return {name: torch.randn(p.shape, generator=g, dtype=p.dtype) for name, p in model.named_parameters()
            if not name.startswith("unused")}


def _state(model: nn.Module, opt: LARS) -> dict[str, torch.Tensor]:
    out = {name: p.detach().clone() for name, p in model.named_parameters()}
    out.update({f"{name}.momentum": opt.state[p]["momentum_buffer"].clone()
                for name, p in model.named_parameters() if "momentum_buffer" in opt.state[p]})
    return out


@pytest.mark.parametrize("unscale_first", [True, False], ids=["unscale_-then-step", "step-unscales"])
@pytest.mark.parametrize("foreach", [True, False], ids=["buckets", "loop"])
@pytest.mark.parametrize("kw", [
    dict(lr=0.3, momentum=0.9, nesterov=True, weight_decay=1e-4, eta=0.005, clip=True),
    dict(lr=0.3, momentum=0.9, nesterov=False, weight_decay=1e-2, eta=0.02, clip=False),
    dict(lr=0.1, momentum=0.0, nesterov=False, weight_decay=1e-2, eta=0.005, clip=True),
], ids=["nesterov", "momentum", "no-momentum"])
def test_loss_scaled_steps_skip_overflow_and_otherwise_equal_unscaled_steps(kw, foreach, unscale_first):
    """Through torch.amp.GradScaler (the float16 recipe): gradients that carry the loss scale, unscaled by
    scaler.unscale_() or inside LARS's step, give bit-identical parameters and momentum to LARS on the plain
    gradients; a step with an inf and a nan gradient (the first step, and a later one) changes no parameter, no
    momentum that exists, halves the scale, and the run goes on as if that step had never been."""
    torch.manual_seed(3)
    scaled_model = Mixed()
    plain_model = copy.deepcopy(scaled_model)
    scaled = LARS(param_groups(scaled_model, kw["weight_decay"]), foreach=foreach, **kw)
    plain = LARS(param_groups(plain_model, kw["weight_decay"]), foreach=foreach, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=1000)
    overflow_at, applied = {0, 3}, 0
    for step in range(6):
        scaler.scale(torch.zeros(()))  # what a training step does with its loss (and creates the scale)
        grads, scale = _grads(scaled_model, step), scaler.get_scale()
        for name, p in scaled_model.named_parameters():
            if name in grads:
                p.grad = grads[name] * scale  # exact: the scale is a power of 2
        if step in overflow_at:
            scaled_model.a.weight.grad[0, 0] = float("inf")  # float32 bucket
            scaled_model.b.weight.grad[0, 0, 0, 0] = float("nan")  # float64 bucket
        before = _state(scaled_model, scaled)
        if unscale_first:
            scaler.unscale_(scaled)
        scaler.step(scaled)
        scaler.update()
        after = _state(scaled_model, scaled)
        if step in overflow_at:
            assert scaler.get_scale() == scale / 2
            for name, value in after.items():  # (the buckets leave zero momentum where a first step left none)
                assert torch.equal(value, before[name]) if name in before else not value.any(), (step, name)
            continue
        for name, p in plain_model.named_parameters():
            if name in grads:
                p.grad = grads[name]
        plain.step()
        applied += 1
        reference = _state(plain_model, plain)
        for name, value in reference.items():
            assert torch.equal(after[name], value), (step, name)
    assert applied == 4 and all(torch.isfinite(p).all() for p in scaled_model.parameters())
    if kw["lr"] > 0:  # the steps moved the parameters, so the equalities above mean something
        assert not torch.equal(scaled_model.b.weight, Mixed().b.weight)


@pytest.mark.parametrize("overflow", [False, True])
def test_loss_scaled_buckets_never_read_a_value_on_the_host(overflow):
    """The CUDA path (buckets) decides a skip on the device: scaler.unscale_, step and update read no tensor value
    on the host, whether the step is skipped or not; the loop reads the flag once per step; an optimizer without
    the amp contract (torch's SGD) is skipped by GradScaler after a read, so the spy sees what it should."""
    def reads(opt_factory) -> int:
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(4)])
        opt = opt_factory(model)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
        for step in range(2):  # the first step creates the momentum buffers: count the second
            scaler.scale(torch.zeros(()))
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            if overflow:
                model[0].weight.grad[0, 0] = float("inf")
            with _OpCounter() as spy:
                scaler.unscale_(opt)
                scaler.step(opt)
                scaler.update()
        return spy.reads

    assert reads(lambda m: LARS(param_groups(m, 1e-4), lr=0.3, foreach=True)) == 0
    assert reads(lambda m: LARS(param_groups(m, 1e-4), lr=0.3, foreach=False)) == 1
    assert reads(lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)) >= 1
