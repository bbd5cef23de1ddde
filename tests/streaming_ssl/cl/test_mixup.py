"""LUMP mixup: lambda ~ Beta(alpha, alpha), the mixed images are lam * stream + (1 - lam) * buffer, the buffer
keeps the original stream images, and mixup composes with replay (mix first, then append)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from avalanche.core import SupervisedPlugin
from scipy import stats

from streaming_ssl.cl.mixup import MixupPlugin, mix_images, sample_mixup
from streaming_ssl.cl.replay import ReplayBufferPlugin
from tests.streaming_ssl.cl.tiny import Recorder, build_strategy


@pytest.mark.parametrize("alpha", [0.4, 2.0])
def test_lambda_follows_beta_alpha_alpha(alpha: float) -> None:
    rng = np.random.default_rng(0)
    lams = np.array([sample_mixup(rng, alpha, 3, 5)[0] for _ in range(4000)])
    assert stats.kstest(lams, stats.beta(alpha, alpha).cdf).pvalue > 1e-3
    # and not some other symmetric law on [0, 1]: the variance is 1 / (4 (2 alpha + 1))
    assert lams.var() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.08)


def test_partners_are_distinct_uniform_draws_as_lumps_buffer_gives() -> None:
    """n <= buffer: n distinct slots (LUMP's buffer draws without replacement), each slot equally likely."""
    rng = np.random.default_rng(0)
    counts = np.zeros(9, dtype=np.int64)
    for _ in range(3000):
        _, partners = sample_mixup(rng, 0.4, 6, 9)
        assert partners.dtype == np.int64 and len(partners) == 6
        assert len(set(partners.tolist())) == 6 and partners.min() >= 0 and partners.max() <= 8
        counts += np.bincount(partners, minlength=9)
    # each slot is chosen with probability 6/9 per update
    assert stats.chisquare(counts).pvalue > 1e-3
    _, whole = sample_mixup(rng, 0.4, 9, 9)
    assert sorted(whole.tolist()) == list(range(9))


@pytest.mark.parametrize("n,buffer_len", [(10, 3), (7, 7), (13, 5), (1, 1)])
def test_more_stream_images_than_buffer_use_each_slot_at_most_ceil_times(n: int, buffer_len: int) -> None:
    rng = np.random.default_rng(n)
    for _ in range(50):
        _, partners = sample_mixup(rng, 0.4, n, buffer_len)
        uses = np.bincount(partners, minlength=buffer_len)
        assert len(partners) == n and len(uses) == buffer_len
        assert uses.max() <= -(-n // buffer_len) and uses.min() >= n // buffer_len


def test_an_empty_buffer_is_refused() -> None:
    with pytest.raises(ValueError, match="buffer of 0"):
        sample_mixup(np.random.default_rng(0), 0.4, 3, 0)


def test_mix_images_is_the_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8, generator=gen)
    b = torch.rand(4, 3, 5, 5, generator=gen)
    out = mix_images(a, b, 0.3)
    torch.testing.assert_close(out, 0.3 * a.float() / 255 + 0.7 * b, rtol=0, atol=1e-6)
    assert out.dtype == torch.float32 and 0 <= float(out.min()) and float(out.max()) <= 1
    assert torch.equal(mix_images(a, b, 1.0), a.float() / 255)


class MixWatch(SupervisedPlugin):
    """Before each update (before any before_forward): the mixup generator's state and the buffer's images."""

    def __init__(self, mixup: MixupPlugin) -> None:
        super().__init__()
        self.mixup = mixup
        self.states: list = []

    def before_training_iteration(self, strategy, **kwargs) -> None:
        self.states.append((self.mixup.rng.bit_generator.state, self.mixup.replay.buffer.contents().clone()))

    def expected(self, u: int, own: torch.Tensor) -> torch.Tensor:
        """lam * own + (1 - lam) * partners of update u, with the draws the plugin made from its generator."""
        state, buffer = self.states[u]
        rng = np.random.default_rng()
        rng.bit_generator.state = state
        lam, partners = sample_mixup(rng, self.mixup.alpha, len(own), len(buffer))
        return lam * own.float() / 255 + (1 - lam) * buffer[torch.as_tensor(partners)].float() / 255


def test_a_run_trains_on_mixtures_then_appended_buffer_images() -> None:
    replay = ReplayBufferPlugin(size=10, batch=3, policy="reservoir", seed=1)
    mixup = MixupPlugin(replay, alpha=0.4, seed=1)
    rec, watch = Recorder(), MixWatch(mixup)
    stream, strategy, data = build_strategy([watch, mixup, replay, rec])
    strategy.train(list(stream), eval_streams=[])
    assert torch.equal(rec.mb_x[0], rec.stream[0])  # empty buffer: nothing mixed, nothing appended
    for u in range(1, len(rec.mb_x)):
        own, x, buffer = rec.stream[u], rec.mb_x[u], watch.states[u][1]
        want = watch.expected(u, own)
        assert x.dtype == torch.float32 and x.shape[0] == len(own) + 3
        torch.testing.assert_close(x[:len(own)], want, rtol=0, atol=1e-6)
        # the appended replay images are plain buffer images, as floats
        for img in x[len(own):]:
            assert ((buffer.float() / 255 - img).abs().flatten(1).max(1).values < 1e-6).any()
    # the buffer keeps original stream images (uint8), never mixtures
    assert all((data.images == img).flatten(1).all(1).any() for img in replay.buffer.contents())
    # buffer images read: 5 updates x 3 appended + every stream image of updates 2..6 mixed with one
    assert strategy.counters.buffer_images == 5 * 3 + sum(len(s) for s in rec.stream[1:])
    assert strategy.counters.patches_forward == 2 * (48 + 5 * 3)  # mixing adds no image


def test_mixup_listed_after_replay_still_mixes_only_the_stream_images() -> None:
    replay = ReplayBufferPlugin(size=10, batch=3, policy="reservoir", seed=1)
    mixup = MixupPlugin(replay, alpha=0.4, seed=1)
    rec, watch = Recorder(), MixWatch(mixup)
    stream, strategy, _ = build_strategy([watch, replay, mixup, rec])
    strategy.train(list(stream), eval_streams=[])
    n = len(rec.stream[3])
    torch.testing.assert_close(rec.mb_x[3][:n], watch.expected(3, rec.stream[3]), rtol=0, atol=1e-6)
    assert rec.mb_x[3].shape[0] == n + 3


def test_mixup_state_round_trips() -> None:
    replay = ReplayBufferPlugin(size=10, batch=0, policy="reservoir", seed=1)
    a, b = MixupPlugin(replay, alpha=0.4, seed=1), MixupPlugin(replay, alpha=0.4, seed=2)
    a.rng.random(7)
    b.load_state_dict(a.state_dict())
    assert sample_mixup(a.rng, 0.4, 5, 9)[1].tolist() == sample_mixup(b.rng, 0.4, 5, 9)[1].tolist()


def test_mixup_without_its_replay_plugin_in_the_strategy_is_refused() -> None:
    """Its buffer would never fill, and nothing would be mixed, silently."""
    with pytest.raises(TypeError, match=r"mixes with the buffer of a ReplayBufferPlugin, got NoneType"):
        MixupPlugin(None)
    replay = ReplayBufferPlugin(size=10, batch=3, policy="reservoir", seed=1)
    stream, strategy, _ = build_strategy([MixupPlugin(replay, alpha=0.4)])
    with pytest.raises(ValueError, match=r"ReplayBufferPlugin is not among the strategy's plugins.*plugins=\[replay"):
        strategy.train(list(stream), eval_streams=[])
    assert strategy.global_step == 0
