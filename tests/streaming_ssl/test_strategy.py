"""EMPSSLStrategy on a tiny synthetic stream: one update per batch, the schedule, plugin composition."""

from __future__ import annotations

import math

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import ReplayPlugin

from scenarios.datasets import ImageData
from scenarios.streams import build_stream
from streaming_ssl.augment import MultiPatchAugment
from streaming_ssl.lars import LARS, cosine_lr, param_groups
from streaming_ssl.models import EMPSSLModel
from streaming_ssl.strategy import FLOAT16_INIT_SCALE, EMPSSLStrategy, NonFiniteLossError


class Recorder(SupervisedPlugin):
    """Labels of every training mini-batch and the learning rate of every update."""

    def __init__(self) -> None:
        super().__init__()
        self.labels: list[list[int]] = []
        self.lrs: list[float] = []

    def after_forward(self, strategy, **kwargs):
        self.labels.append(strategy.mb_y.tolist())

    def after_update(self, strategy, **kwargs):
        self.lrs.append(strategy.optimizer.param_groups[0]["lr"])


def _setup(plugins, per_class: int = 12, batch: int = 8, amp_dtype: torch.dtype | None = None,
           foreach: bool | None = None):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    targets = torch.arange(4).repeat_interleave(per_class)
    data = ImageData(torch.randint(0, 256, (len(targets), 3, 16, 16), dtype=torch.uint8, generator=gen), targets)
    stream = build_stream(data, 4, mode="class_incremental", experience_classes=[[0, 1], [2, 3]])
    model = EMPSSLModel(width=0.125, feature_dim=32, proj_hidden_dim=32, proj_dim=16)
    opt = LARS(param_groups(model, 1e-4), lr=0.3, foreach=foreach)
    total = stream.n_updates(batch)
    strategy = EMPSSLStrategy(model=model, optimizer=opt, augment=MultiPatchAugment(2, 16),
                              n_patches=2, batch_size=batch, total_updates=total, base_lr=0.3,
                              device="cpu", amp_dtype=amp_dtype, channels_last=False, plugins=plugins)
    return stream, strategy, total


def test_one_update_per_batch_and_schedule_over_the_whole_stream() -> None:
    rec = Recorder()
    stream, strategy, total = _setup([rec])
    before = [p.detach().clone() for p in strategy.model.parameters()]
    strategy.train(list(stream), eval_streams=[])
    assert total == 2 * math.ceil(24 / 8)
    assert strategy.global_step == len(rec.labels) == len(rec.lrs) == total
    assert strategy.samples_seen == 48 and strategy.stream_step == 2
    assert rec.lrs == pytest.approx([cosine_lr(i, total, 0.3) for i in range(total)])
    # labels are never used for training, but each experience's batches hold exactly its classes
    first, second = rec.labels[: total // 2], rec.labels[total // 2:]
    assert {y for b in first for y in b} == {0, 1} and {y for b in second for y in b} == {2, 3}
    assert sorted(y for b in rec.labels for y in b) == sorted(torch.arange(4).repeat_interleave(12).tolist())
    assert any(not torch.equal(a, p) for a, p in zip(before, strategy.model.parameters()))


def test_a_replay_plugin_composes() -> None:
    rec = Recorder()
    stream, strategy, _ = _setup([ReplayPlugin(mem_size=8), rec])
    strategy.train(list(stream), eval_streams=[])
    second = [y for b in rec.labels[3:] for y in b]
    assert {0, 1} & set(second), "no replayed sample of the first experience reached the second"
    assert {2, 3} <= set(second)
    assert all(torch.isfinite(p).all() for p in strategy.model.parameters())


def test_the_update_reads_nothing_back_on_the_host() -> None:
    """The update's maths (augmentation as on a GPU, the encoder, the objective, LARS) runs on the meta device,
    which has shapes but no values: none of it reads a value back on the host, so on CUDA the host never waits for
    the device inside an update (tests/test_cuda.py checks the whole strategy there with sync debug mode)."""
    from streaming_ssl.objective import emp_ssl_loss

    meta = torch.device("meta")
    model = EMPSSLModel(width=0.125, feature_dim=32, proj_hidden_dim=32, proj_dim=16).to(meta)
    model = model.to(memory_format=torch.channels_last)
    opt = LARS(param_groups(model, 1e-4), lr=0.3)
    augment = MultiPatchAugment(4, 16, blur_p=0.5, solarize_p=0.5).to(meta)
    for _ in range(2):  # the second step has momentum buffers
        patches = augment(torch.empty(6, 3, 20, 20, dtype=torch.uint8, device=meta))
        _, z = model(patches.contiguous(memory_format=torch.channels_last))
        loss, stats = emp_ssl_loss(z, 4)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.device == meta and all(p.grad is not None for p in model.parameters())
    assert all("momentum_buffer" in opt.state[p] for p in model.parameters())
    with pytest.raises((NotImplementedError, RuntimeError)):  # a value read back is refused there
        float(loss)


def test_a_non_finite_loss_pending_on_the_device_stops_the_run_before_an_evaluation() -> None:
    """On CUDA the loss is checked only every finite_check_every updates (no host sync per update): a non-finite
    loss still pending there is raised when an evaluation is due, before the probes read the diverged model, so
    its row is never logged. A finite one lets the evaluation run."""
    from streaming_ssl.evaluation import ProbeMetric, ProbeSet, StreamEvaluator

    _, strategy, _ = _setup([])
    gen = torch.Generator().manual_seed(1)
    imgs = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8, generator=gen)
    labels = torch.arange(12) % 2
    probes = ProbeSet("tiny", imgs, labels, imgs, labels, 2)
    evaluator = StreamEvaluator(in_domain=probes, transfer=[], parent_classes=[[0, 1]], augment=strategy.augment,
                                device=torch.device("cpu"), channels_last=False, batch_size=6, knn_k=3,
                                probe_kwargs={"epochs": 2})
    metric = ProbeMetric(evaluator, strategy.model)
    strategy.stream_step = 1
    strategy._nonfinite = torch.tensor(True)  # what backward accumulates on CUDA after a NaN loss
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        metric.after_training_exp(strategy)
    assert metric.last_row is None and evaluator.history == []
    strategy._nonfinite = torch.tensor(False)
    metric.after_training_exp(strategy)
    assert metric.last_row is not None and "probe/acc_all" in metric.last_row and len(evaluator.history) == 1


class Float16Probe(SupervisedPlugin):
    """Before update `overflow_at`, sets the loss scale so high that the gradients overflow, and before the others
    after the first so low that they cannot; records every update's weights and LARS momentum, and the scale,
    before and after."""

    def __init__(self, overflow_at: int) -> None:
        super().__init__()
        self.overflow_at = overflow_at
        self.states_in: list[list[torch.Tensor]] = []
        self.states_out: list[list[torch.Tensor]] = []
        self.scales: list[float] = []

    @staticmethod
    def _state(strategy) -> list[torch.Tensor]:
        params = list(strategy.model.parameters())
        momenta = [strategy.optimizer.state[p]["momentum_buffer"] for p in params if p in strategy.optimizer.state]
        return [t.detach().clone() for t in params + momenta]

    def before_forward(self, strategy, **kwargs):
        if strategy.global_step == self.overflow_at:
            strategy.grad_scaler.update(new_scale=2.0 ** 120)  # float32 gradients of 2^120 x the loss overflow
        elif strategy.global_step:  # (the scale exists once the first update scaled a loss)
            strategy.grad_scaler.update(new_scale=2.0)  # a scale that cannot overflow here
        self.scales.append(float(strategy.grad_scaler.get_scale()) if strategy.global_step else FLOAT16_INIT_SCALE)
        self.states_in.append(self._state(strategy))

    def after_update(self, strategy, **kwargs):
        self.states_out.append(self._state(strategy))
        self.scales.append(float(strategy.grad_scaler.get_scale()))


@pytest.mark.parametrize("foreach", [None, True], ids=["loop", "buckets"])
def test_float16_scales_the_loss_and_skips_an_update_whose_gradients_overflow(foreach) -> None:
    """amp_dtype float16 trains through a GradScaler: an update whose scaled gradients overflow changes neither the
    weights nor LARS's momentum, halves the scale and is counted; every other update trains with finite weights.
    Both LARS paths: the loop (the CPU's), which reads the overflow flag on the host, and the buckets (CUDA's), which
    skip on the device and whose flags the counters sum unread. bf16 and float32 have no scaler."""
    probe = Float16Probe(overflow_at=3)
    stream, strategy, total = _setup([probe], amp_dtype=torch.float16, foreach=foreach)
    assert strategy.grad_scaler is not None
    assert _setup([])[1].grad_scaler is None and _setup([], amp_dtype=torch.bfloat16)[1].grad_scaler is None
    strategy.train(list(stream), eval_streams=[])
    assert strategy.global_step == total == 6
    skipped = []
    for step, (before, after) in enumerate(zip(probe.states_in, probe.states_out)):
        scale_in, scale_out = probe.scales[2 * step], probe.scales[2 * step + 1]
        # the same weights and momentum (the buckets leave a zero momentum where a skipped first update left none)
        n = len(list(strategy.model.parameters()))
        same = (len(before) in (n, len(after)) and all(torch.equal(a, b) for a, b in zip(before, after))
                and not any(bool(t.any()) for t in after[len(before):]))
        assert same == (scale_out == scale_in / 2), f"update {step}: skipped {same}, scale {scale_in} -> {scale_out}"
        skipped += [step] * same
    # update 3 overflowed and was skipped (the first may be too, at the initial scale); the others, at scale 2, were
    # applied
    assert skipped in ([3], [0, 3]) and probe.scales[7] == 2.0 ** 119
    assert strategy.counters.skipped_updates == len(skipped)
    assert len(probe.states_out[3]) > len(list(strategy.model.parameters()))  # the momentum buffers were compared too
    assert all(torch.isfinite(p).all() for p in strategy.model.parameters())
    assert all(math.isfinite(float(v)) for v in strategy.last_stats.values())  # the logged loss is the unscaled one


def test_the_progress_bar_shows_float16s_loss_scale_and_skipped_updates() -> None:
    from streaming_ssl.plugins import ProgressPlugin

    class Postfix(SupervisedPlugin):  # after the bar's own hook: what it shows after each update
        def __init__(self, progress: ProgressPlugin) -> None:
            super().__init__()
            self.progress, self.shown = progress, []

        def after_training_iteration(self, strategy, **kwargs):
            self.shown.append(self.progress.bar.postfix)

    for amp_dtype in (torch.float16, None):
        progress = ProgressPlugin(6, log_every=1)
        postfix = Postfix(progress)
        stream, strategy, _ = _setup([progress, postfix], amp_dtype=amp_dtype)
        strategy.train(list(stream), eval_streams=[])
        assert len(postfix.shown) == 6 and all("loss=" in s and "tcr=" in s for s in postfix.shown)
        if amp_dtype is None:
            assert not any("scale=" in s for s in postfix.shown)
        else:
            scale = strategy.grad_scaler.get_scale()
            last = postfix.shown[-1].split(", ")  # (tqdm sorts the keys)
            assert f"scale={scale:.0f}" in last and f"skipped={strategy.counters.skipped_updates}" in last, last


def test_skipped_updates_are_summed_unread_until_reported_or_saved() -> None:
    """float16's overflow flags are added as tensors and read only by flush(), which a row and a checkpoint of the
    counters call: any non-zero flag counts once, a zero one not at all, and a restored state drops pending flags."""
    from streaming_ssl.accounting import ComputeCounters

    counters = ComputeCounters()
    for flag in (torch.tensor(0.0), torch.tensor(1.0), torch.tensor(float("inf")), torch.tensor(1.0), 0, True):
        counters.add_skipped(flag)
    assert counters.skipped_updates == 0  # not read yet
    assert counters.as_row()["compute/skipped_updates"] == 4 and counters.skipped_updates == 4
    counters.add_skipped(torch.tensor(1.0))
    saved = counters.state_dict()
    assert saved["skipped_updates"] == 5 and "_pending_skipped" not in saved
    counters.add_skipped(torch.tensor(1.0))
    counters.load_state_dict(saved)
    counters.flush()
    assert counters.skipped_updates == 5


def test_a_methods_own_counters_are_reported_saved_and_restored() -> None:
    """counters.add(name, n): ours add to ours, a new name starts at 0; both are in the row (compute/<name>) and the
    state, a restored state replaces them (a counter the state lacks is gone); device tensors and bad names are
    refused."""
    from streaming_ssl.accounting import ComputeCounters

    counters = ComputeCounters()
    counters.add("frozen_forwards", 7)
    counters.add("teacher_images", 3)
    counters.add("teacher_images", 2)
    assert counters.frozen_forwards == 7 and counters.extra == {"teacher_images": 5}
    row = counters.as_row()
    assert row["compute/frozen_forwards"] == 7 and row["compute/teacher_images"] == 5 and "compute/extra" not in row
    saved = counters.state_dict()
    counters.add("teacher_images", 100)
    counters.add("other", 1)
    counters.load_state_dict(saved)
    assert counters.extra == {"teacher_images": 5} and counters.frozen_forwards == 7
    counters.load_state_dict({"stream_images": 4})  # a checkpoint from before a method's counters existed
    assert counters.extra == {} and counters.stream_images == 4 and counters.frozen_forwards == 0
    with pytest.raises(TypeError, match="Python int"):
        counters.add("teacher_images", torch.tensor(1))
    with pytest.raises(ValueError, match="without '/'"):
        counters.add("a/b", 1)


def test_n_patches_argument_sets_the_patches_of_every_update() -> None:
    """`n_patches` overrides the augmentation's default: the update cuts each image into that many patches, so the
    objective's (n, B, d) blocks hold patch i of every image (the augmentation's 4 patches viewed as 2 blocks would
    pair other images' patches in the invariance term and size the coding rate from 2 B rows)."""
    model = EMPSSLModel(width=0.125, feature_dim=32, proj_hidden_dim=32, proj_dim=16)
    opt = LARS(param_groups(model, 1e-4), lr=0.3)
    strategy = EMPSSLStrategy(model=model, optimizer=opt, augment=MultiPatchAugment(4, 16), n_patches=2,
                              batch_size=3, device="cpu", channels_last=False)
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    strategy.mbatch = [images, torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long)]
    z = strategy.forward()
    assert strategy.n_patches == 2
    assert strategy.mb_patches.shape == (2 * 3, 3, 16, 16) and z.shape == (2 * 3, 16)
