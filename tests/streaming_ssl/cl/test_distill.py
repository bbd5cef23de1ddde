"""CaSSLe distillation: the frozen copy never changes nor gets a gradient, the term is its formula, the
predictor learns."""

from __future__ import annotations

import copy

import pytest
import torch
from avalanche.core import SupervisedPlugin

from scenarios.streams import build_stream
from streaming_ssl.cl.distill import DistillPlugin, distill_loss, frozen_copy
from tests.streaming_ssl.cl.tiny import N_PATCHES, PROJ_DIM, build_strategy, tiny_model


class FrozenWatch(SupervisedPlugin):
    """The frozen model at the start of the 2nd experience and at its last update; the loss around the term."""

    def __init__(self, distill: DistillPlugin) -> None:
        super().__init__()
        self.distill = distill
        self.at_start = self.at_end = self.frozen_obj = None
        self.grads: list = []
        self.terms: list[tuple[float, float]] = []

    def before_training_exp(self, strategy, **kwargs) -> None:
        if self.distill.frozen is not None:
            self.frozen_obj = self.distill.frozen
            self.at_start = {k: v.clone() for k, v in self.distill.frozen.state_dict().items()}

    def after_backward(self, strategy, **kwargs) -> None:
        if self.distill.frozen is not None:
            self.grads += [p.grad for p in self.distill.frozen.parameters()]
            self.at_end = {k: v.clone() for k, v in self.distill.frozen.state_dict().items()}
            self.terms.append(float(strategy.last_stats["distill"]))


def test_distill_loss_is_its_formula() -> None:
    pred = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    target = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, -1.0]])
    # 1 - cos per row: 0, 1 - 1/sqrt(2), 2
    want = (0.0 + (1 - 2 ** -0.5) + 2.0) / 3
    assert float(distill_loss(pred, target)) == pytest.approx(want, abs=1e-7)
    assert distill_loss(pred.bfloat16(), target).dtype == torch.float32


@pytest.mark.parametrize("frozen_bn", ["running", "batch"])
def test_frozen_model_gets_no_gradient_and_never_changes(frozen_bn: str) -> None:
    """Also with frozen_bn=batch, whose train-mode BatchNorm must leave its running statistics as they were."""
    distill = DistillPlugin(tiny_model(), dim=PROJ_DIM, hidden_dim=8, weight=1.0, frozen_bn=frozen_bn)
    watch = FrozenWatch(distill)
    stream, strategy, _ = build_strategy([distill, watch])
    before = {k: v.clone() for k, v in strategy.model.state_dict().items()}
    strategy.train(list(stream), eval_streams=[])
    assert watch.at_start is not None and watch.at_end is not None and len(watch.terms) == 3  # exp 2 only
    assert all(g is None for g in watch.grads)
    assert all(torch.equal(watch.at_start[k], watch.at_end[k]) for k in watch.at_start)  # BN stats too
    assert watch.frozen_obj.training == (frozen_bn == "batch")
    assert not any(p.requires_grad for p in watch.frozen_obj.parameters())
    # not vacuous: the trained model did change during the 2nd experience, and the frozen copy is the model of the
    # 1st boundary, not the live one
    after = strategy.model.state_dict()
    assert any(not torch.equal(watch.at_end[k], after[k]) for k in after if after[k].is_floating_point())
    assert any(not torch.equal(before[k], watch.at_start[k]) for k in before if before[k].is_floating_point())
    assert strategy.counters.frozen_forwards == N_PATCHES * 24  # the 24 images of the 2nd experience


class LossAround(SupervisedPlugin):
    def __init__(self) -> None:
        super().__init__()
        self.losses: list[torch.Tensor] = []

    def before_backward(self, strategy, **kwargs) -> None:
        self.losses.append(strategy.loss.detach().clone())


@pytest.mark.parametrize("space", ["z", "h"])
def test_the_term_added_to_the_loss_equals_the_formula(space: str) -> None:
    """space z (CaSSLe) distils the projections, space h (PFR) the encoder's features."""
    model = tiny_model()
    dim = PROJ_DIM if space == "z" else model.feature_dim
    distill = DistillPlugin(model, dim=dim, hidden_dim=8, weight=0.7, every=2, space=space)
    first, last = LossAround(), LossAround()
    captured = {}

    class Capture(SupervisedPlugin):
        def before_backward(self, strategy, **kwargs):
            if distill.frozen is not None and "z" not in captured:
                current = strategy.mb_output if space == "z" else strategy.mb_features
                captured.update(z=current.detach().clone(), patches=strategy.mb_patches.clone(),
                                frozen=frozen_copy(distill.frozen), predictor=copy.deepcopy(distill.predictor),
                                step=len(first.losses) - 1)

    stream, strategy, _ = build_strategy([first, Capture(), distill, last], model=model)
    strategy.train(list(stream), eval_streams=[])
    step = captured["step"]
    assert step == 2  # every=2: the first frozen copy is taken after the 2nd update
    added = float(last.losses[step] - first.losses[step])
    with torch.no_grad():
        h_frozen, z_frozen = captured["frozen"](captured["patches"])
        # the predictor in training mode, as in the update: BatchNorm normalises with the batch's statistics
        want = 0.7 * float(distill_loss(captured["predictor"](captured["z"]), z_frozen if space == "z" else h_frozen))
    assert added == pytest.approx(want, rel=1e-4, abs=1e-6) and want > 1e-3
    # no term before the first frozen copy
    assert all(torch.equal(a, b) for a, b in zip(first.losses[:2], last.losses[:2]))


def test_the_predictor_trains_and_the_term_decreases() -> None:
    torch.manual_seed(0)
    model = tiny_model()
    distill = DistillPlugin(model, dim=PROJ_DIM, hidden_dim=32, weight=1.0)
    frozen = frozen_copy(model)
    patches = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        _, z = model.eval()(patches)
        _, target = frozen(patches)
    start = [p.detach().clone() for p in distill.predictor.parameters()]
    opt = torch.optim.SGD(distill.predictor.parameters(), lr=0.5, momentum=0.9)
    terms = []
    for _ in range(30):
        opt.zero_grad()
        term = distill_loss(distill.predictor(z), target)
        term.backward()
        opt.step()
        terms.append(float(term))
    assert terms[-1] < 0.2 * terms[0] and terms[0] > 0.1
    assert all(not torch.equal(a, b) for a, b in zip(start, distill.predictor.parameters()))


def test_the_predictor_is_optimised_in_a_run_and_round_trips() -> None:
    distill = DistillPlugin(tiny_model(), dim=PROJ_DIM, hidden_dim=8, weight=1.0)
    start = {k: v.clone() for k, v in distill.predictor.state_dict().items()}
    stream, strategy, _ = build_strategy([distill])
    assert any(p is q for g in strategy.optimizer.param_groups for p in g["params"]
               for q in distill.predictor.parameters())
    strategy.train(list(stream), eval_streams=[])
    assert any(not torch.equal(start[k], v) for k, v in distill.predictor.state_dict().items())
    state = distill.state_dict()
    again = DistillPlugin(tiny_model(), dim=PROJ_DIM, hidden_dim=8)
    again.load_state_dict(state)
    assert not again.frozen.training and not any(p.requires_grad for p in again.frozen.parameters())
    for k, v in distill.frozen.state_dict().items():
        assert torch.equal(again.frozen.state_dict()[k], v)
    for k, v in distill.predictor.state_dict().items():
        assert torch.equal(again.predictor.state_dict()[k], v)


def test_sync_bn_makes_the_predictors_batchnorm_synchronised_with_the_same_state() -> None:
    """Under DDP on CUDA (build_cl_plugins asks for it with model.sync_bn) the predictor's BatchNorm normalises with
    the global batch's statistics: a SyncBatchNorm, the one the optimizer gets, starting from the same weights, with
    the same state_dict, so that a checkpoint of a one-GPU run resumes under torchrun and back."""
    torch.manual_seed(0)
    plain = DistillPlugin(tiny_model(), dim=PROJ_DIM, hidden_dim=8)
    torch.manual_seed(0)
    synced = DistillPlugin(tiny_model(), dim=PROJ_DIM, hidden_dim=8, sync_bn=True)
    kinds = [type(m) for m in synced.predictor.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert kinds == [torch.nn.SyncBatchNorm]
    assert not any(type(m) is torch.nn.SyncBatchNorm for m in plain.predictor.modules())
    assert synced.trainable_modules == [synced.predictor]
    a, b = plain.predictor.state_dict(), synced.predictor.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    synced.load_state_dict(plain.state_dict())
    plain.load_state_dict(synced.state_dict())


def test_frozen_bn_batch_normalises_with_each_batchs_own_statistics() -> None:
    """frozen_bn=batch (CaSSLe's frozen copy): the frozen model's output is the train-mode forward's (batch
    statistics), so a patch's target depends on the patches beside it, and its running statistics stay; the default
    (running) is the eval-mode forward, the same for a patch whatever its companions."""
    torch.manual_seed(0)
    model = tiny_model()
    x = torch.rand(12, 3, 8, 8) * 2 + 1  # far from the running statistics (0, 1) of a new model
    by_batch, by_running = frozen_copy(model, "batch"), frozen_copy(model, "running")
    kept = {k: v.clone() for k, v in by_batch.state_dict().items()}
    with torch.inference_mode():
        z_batch, z_batch_half = by_batch(x)[1], by_batch(x[:6])[1]
        z_running, z_running_half = by_running(x)[1], by_running(x[:6])[1]
    with torch.no_grad():
        z_train = copy.deepcopy(model).train()(x)[1]
        z_eval = copy.deepcopy(model).eval()(x)[1]
    torch.testing.assert_close(z_batch, z_train, rtol=0, atol=1e-6)
    torch.testing.assert_close(z_running, z_eval, rtol=0, atol=1e-6)
    assert (z_batch - z_running).abs().max() > 0.05  # not vacuous: the two statistics differ on this data
    assert (z_batch[:6] - z_batch_half).abs().max() > 1e-3  # the batch's statistics: companions matter
    torch.testing.assert_close(z_running[:6], z_running_half, rtol=0, atol=1e-6)
    assert all(torch.equal(kept[k], v) for k, v in by_batch.state_dict().items())  # running statistics unchanged
    with pytest.raises(ValueError, match="frozen_bn must be one of"):
        DistillPlugin(model, dim=PROJ_DIM, hidden_dim=8, frozen_bn="eval")


def test_frozen_bn_batch_round_trips_in_its_mode() -> None:
    """A checkpoint restores the frozen copy in the plugin's mode: with frozen_bn=batch, batch statistics again."""
    distill = DistillPlugin(tiny_model(), dim=PROJ_DIM, hidden_dim=8, every=2, frozen_bn="batch")
    stream, strategy, _ = build_strategy([distill])
    strategy.train(list(stream)[:1], eval_streams=[])
    again = DistillPlugin(tiny_model(), dim=PROJ_DIM, hidden_dim=8, every=2, frozen_bn="batch")
    again.load_state_dict(distill.state_dict())
    x = torch.rand(6, 3, 8, 8)
    with torch.inference_mode():
        assert torch.equal(again.frozen(x)[1], distill.frozen(x)[1])
    assert again.frozen.training and not any(m.track_running_stats for m in again.frozen.modules()
                                             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))


def test_a_predictor_missing_from_the_optimizer_is_refused_before_any_update() -> None:
    """The term would be added against a predictor that never trains (a random map), silently."""
    distill = DistillPlugin(tiny_model(), dim=PROJ_DIM, hidden_dim=8, weight=1.0)
    modules, distill.trainable_modules = distill.trainable_modules, []  # the optimizer is built without them
    stream, strategy, _ = build_strategy([distill])
    distill.trainable_modules = modules
    with pytest.raises(ValueError, match=r"DistillPlugin.trainable_modules holds a Sequential whose parameters are not "
                                         r"in the strategy's optimizer.*getattr\(p, 'trainable_modules'"):
        strategy.train(list(stream), eval_streams=[])
    assert strategy.global_step == 0


def test_a_predictor_with_frozen_parameters_is_accepted() -> None:
    """Only what can train must be in the optimizer (param_groups leaves out parameters without requires_grad)."""
    distill = DistillPlugin(tiny_model(), dim=PROJ_DIM, hidden_dim=8, weight=1.0)
    frozen = [p for p in distill.predictor.parameters() if p.ndim == 1]
    for p in frozen:
        p.requires_grad_(False)
    stream, strategy, _ = build_strategy([distill])
    strategy.train(list(stream), eval_streams=[])
    assert strategy.global_step > 0 and frozen


def test_a_dim_other_than_the_models_projection_is_refused_with_the_right_one() -> None:
    """It failed at the first update with torch's 'mat1 and mat2 shapes cannot be multiplied'."""
    with pytest.raises(ValueError, match=rf"DistillPlugin\(dim={2 * PROJ_DIM}, space='z'\), but the model projects to "
                                         rf"{PROJ_DIM} dimensions: pass dim={PROJ_DIM}"):
        DistillPlugin(tiny_model(), dim=2 * PROJ_DIM, hidden_dim=8)
    DistillPlugin(tiny_model(), dim=PROJ_DIM, hidden_dim=8)
    h = tiny_model().feature_dim
    with pytest.raises(ValueError, match=rf"DistillPlugin\(dim={PROJ_DIM}, space='h'\), but the model has features h "
                                         rf"of {h} dimensions: pass dim={h} \(the model's feature_dim"):
        DistillPlugin(tiny_model(), dim=PROJ_DIM, hidden_dim=8, space="h")
    with pytest.raises(ValueError, match="space must be one of"):
        DistillPlugin(tiny_model(), dim=PROJ_DIM, space="x")


def test_pfr_leaves_the_projector_free_of_the_term() -> None:
    """space h: the term's gradient reaches the encoder and not the projector; space z: both."""
    torch.manual_seed(0)
    patches = torch.randn(8, 3, 8, 8)
    for space in ("h", "z"):
        model = tiny_model()
        distill = DistillPlugin(model, dim=PROJ_DIM if space == "z" else model.feature_dim, hidden_dim=8, space=space)
        frozen = frozen_copy(model)
        with torch.no_grad():  # move the live model away from its copy, so that the term is not at its minimum
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        h, z = model(patches)
        with torch.no_grad():
            h_frozen, z_frozen = frozen(patches)
        pred = distill.predictor(z if space == "z" else h)
        distill_loss(pred, z_frozen if space == "z" else h_frozen).backward()
        projector = [p.grad for p in model.projector.parameters()]
        encoder = [p.grad for p in model.backbone.parameters()]
        assert any(g is not None and float(g.abs().sum()) > 0 for g in encoder)
        assert all(g is None for g in projector) == (space == "h")


class SnapshotSteps(SupervisedPlugin):
    """The updates at which the plugin froze a copy (a new frozen object after an experience)."""

    def __init__(self, distill: DistillPlugin) -> None:
        super().__init__()
        self.distill, self.last, self.steps = distill, None, []

    def before_training_exp(self, strategy, **kwargs) -> None:
        if self.distill.frozen is not None and self.distill.frozen is not self.last:
            self.last = self.distill.frozen
            self.steps.append(strategy.global_step)


@pytest.mark.parametrize("boundaries", [True, False])
def test_an_online_streams_copies_are_frozen_at_parent_ends_whatever_the_plugins_order(boundaries: bool) -> None:
    """Online (mini-experiences of 8 images: 3 per parent experience, one update each): every=0 freezes a copy only
    where a parent experience ends (update 3), whether EvalSchedule stands before or after DistillPlugin in the
    plugin list (it used to set the boundary flag after the experience, so a DistillPlugin listed first read a
    missing flag as a boundary, then the previous mini-experience's), with or without access to the stream's
    boundaries. Without EvalSchedule the plugin refuses before the first update, naming both fixes: Avalanche 0.6's
    mini-experiences do not say where a parent ends when its size divides by theirs (here: 24 by 8)."""
    from streaming_ssl.plugins import EvalSchedule
    from tests.streaming_ssl.cl.tiny import BATCH, tiny_data

    def run(order: str) -> tuple[list[int], dict]:
        torch.manual_seed(0)
        stream = build_stream(tiny_data(), 4, mode="online", online_base="class_incremental",
                              experience_classes=[[0, 1], [2, 3]], n_experiences=2, online_experience_size=BATCH,
                              access_task_boundaries=boundaries)
        model = tiny_model()
        distill = DistillPlugin(model, dim=PROJ_DIM, hidden_dim=8, weight=1.0, every=0)
        watch, schedule = SnapshotSteps(distill), EvalSchedule(stream.step_parent, every=0)
        plugins = {"schedule first": [schedule, distill, watch], "distill first": [distill, watch, schedule],
                   "no schedule": [distill, watch]}[order]
        _, strategy, _ = build_strategy(plugins, model=model)
        strategy.train(list(stream.experiences), eval_streams=[])
        return watch.steps, model.state_dict()

    cut = build_stream(tiny_data(), 4, mode="online", online_base="class_incremental", n_experiences=2,
                       experience_classes=[[0, 1], [2, 3]], online_experience_size=BATCH)
    assert cut.step_parent == [0] * 3 + [1] * 3
    first_steps, first = run("schedule first")
    assert first_steps == [3]
    second_steps, second = run("distill first")
    assert second_steps == [3] and all(torch.equal(first[k], second[k]) for k in first)
    with pytest.raises(ValueError, match=r"no EvalSchedule maps.*EvalSchedule\(step_parent, every\).*every=N"):
        run("no schedule")
