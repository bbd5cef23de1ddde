"""Replay: reservoir keeps every past image with equal probability, MinRed drops the most redundant, and an
update trains on exactly its stream images plus buffer images from earlier updates (never labels)."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from streaming_ssl.cl.replay import ImageBuffer, ReplayBufferPlugin, last_writers, minred_keep, reservoir_slots
from tests.streaming_ssl.cl.tiny import BATCH, N_PATCHES, Recorder, build_strategy
from tests.streaming_ssl.test_lars import _OpCounter


def _id_images(ids: range) -> torch.Tensor:
    """(n, 1, 1, 1) uint8 images whose single pixel is the image's id."""
    return torch.tensor(list(ids), dtype=torch.uint8).view(-1, 1, 1, 1)


def test_reservoir_keeps_every_past_image_with_probability_size_over_n() -> None:
    n, size, batch, runs = 60, 12, 7, 3000  # batches of 7 do not divide 60 nor the size
    counts = torch.zeros(n)
    for r in range(runs):
        buf, gen = ImageBuffer(size), torch.Generator().manual_seed(r)
        for lo in range(0, n, batch):
            buf.add_reservoir(_id_images(range(lo, min(lo + batch, n))), gen)
        held = buf.contents().flatten().long()
        assert len(held) == size and len(set(held.tolist())) == size and buf.seen == n
        counts[held] += 1
    p = size / n
    std = math.sqrt(runs * p * (1 - p))
    assert (counts - runs * p).abs().max() < 4.5 * std, counts  # every image: binomial(runs, size/n)
    # the whole profile: sum of squared standardised deviations ~ chi2 with n - 1 degrees of freedom
    chi2 = float((((counts - runs * p) / std) ** 2).sum())
    assert stats.chi2.sf(chi2, n - 1) > 1e-4, chi2
    # early (filling) and late images are equally likely: no bias towards either end of the stream
    assert abs(float(counts[:size].mean() - counts[-size:].mean())) < 4 * std / math.sqrt(size)


def test_reservoir_slots_follow_algorithm_r() -> None:
    gen = torch.Generator().manual_seed(1)
    first = reservoir_slots(0, 5, 5, gen)
    assert first.tolist() == [0, 1, 2, 3, 4]  # filling: image t goes to slot t - 1
    later = reservoir_slots(1000, 4000, 5, gen)
    assert later.min() >= -1 and later.max() < 5
    # image t is kept with probability size / t: here t in 1001..5000, about 5 * ln 5 = 8 images in all
    kept = int((later >= 0).sum())
    assert 1 <= kept <= 25
    dst, src = last_writers(torch.tensor([2, -1, 2, 0]), 5)
    assert dst.tolist() == [0, 2] and src.tolist() == [3, 2]  # the later writer of slot 2 wins


def test_minred_drops_the_most_redundant() -> None:
    a, b, c = torch.eye(3)
    near_a = torch.tensor([1.0, 0.05, 0.0])  # a near-duplicate of a, and slightly towards b
    # the pair (near_a, a) is the most similar; near_a is also closer to the rest (b): it goes, wherever it stands
    assert minred_keep(torch.stack([a, b, c, near_a]), 3).tolist() == [0, 1, 2]
    assert minred_keep(torch.stack([near_a, a, b, c]), 3).tolist() == [1, 2, 3]
    # two tight clusters and a loner; keeping 3 leaves one of each cluster and the loner
    d1, d2, d3 = torch.tensor([[0.0, 1.0, 0.02], [0.0, 1.0, 0.0], [0.02, 1.0, 0.0]])
    e1, e2 = torch.tensor([[0.0, 0.01, 1.0], [0.0, 0.0, 1.0]])
    keep = minred_keep(torch.stack([d1, d2, d3, a, e1, e2]), 3).tolist()
    assert 3 in keep and len({0, 1, 2} & set(keep)) == 1 and len({4, 5} & set(keep)) == 1
    # nothing to drop
    assert minred_keep(torch.stack([a, b]), 5).tolist() == [0, 1]


def _minred_by_the_rule(features: torch.Tensor, size: int) -> list[int]:
    """MinRed's rule, read literally, on Python floats: while more than `size` rows remain, take the most similar
    remaining pair a < b (the first such pair in row order on a tie) and drop whichever of the two is more similar
    to its nearest other remaining row (a on a tie). S is the symmetrised float32 cosine matrix."""
    f = torch.nn.functional.normalize(features.float(), dim=1)
    s = f @ f.T
    s = ((s + s.T) / 2).tolist()
    alive = list(range(len(s)))
    while len(alive) > size:
        _, a, b = max((s[a][b], -a, -b) for a in alive for b in alive if a < b)
        a, b = -a, -b
        second = [max((s[r][c] for c in alive if c not in (a, b)), default=-math.inf) for r in (a, b)]
        alive.remove(a if second[0] >= second[1] else b)
    return alive


def test_minred_keep_makes_the_rules_choices_with_ties_and_reads_nothing_back() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(40, 6, generator=gen)
    x[7] = x[5]                 # exact duplicates: tied pairs (5, 7), (5, 9), (7, 9) and tied second neighbours
    x[9] = 2 * x[5]
    x[30:36] = x[30] + 0.05 * torch.randn(6, 6, generator=gen)  # a tight cluster
    for size in (39, 33, 20, 2, 1):
        assert minred_keep(x, size).tolist() == _minred_by_the_rule(x, size), size
    # every step is a tensor op on the features' device (no value read back to the host): on the meta device,
    # which holds shapes only, the whole loop runs and gives `size` int64 indices there
    keep = minred_keep(torch.empty(40, 6, device="meta"), 25)
    assert keep.device.type == "meta" and keep.shape == (25,) and keep.dtype == torch.long
    # on a GPU every op is a kernel launch: a fixed number per drop (10 kernels and their views), whatever N
    per_drop = []
    for n in (40, 400):
        counts = []
        for drops in (5, 15):
            with _OpCounter() as counter:
                minred_keep(torch.randn(n, 6, generator=gen), n - drops)
            counts.append(counter.count)
        per_drop.append((counts[1] - counts[0]) / 10)
    assert per_drop[0] == per_drop[1] <= 16, per_drop
    # and no value comes from the host either: `t[1] = 1` on a CUDA tensor copies a host scalar (aten.copy_ from a
    # 0-dim CPU tensor) and waits for the device, where a fill does not
    with _OpCounter() as counter:
        minred_keep(x, 20)
    assert counter.reads == 0 and counter.copies == 0, (counter.reads, counter.copies)


def test_an_update_sees_its_stream_images_plus_buffer_images_of_earlier_updates() -> None:
    replay, rec = ReplayBufferPlugin(size=10, batch=4, policy="reservoir", seed=3), Recorder()
    stream, strategy, data = build_strategy([replay, rec])
    strategy.train(list(stream), eval_streams=[])
    assert len(rec.mb_x) == strategy.global_step == 6
    for u, (x, own) in enumerate(zip(rec.mb_x, rec.stream)):
        k = 0 if u == 0 else 4  # the buffer is empty at the first update
        assert x.shape[0] == len(own) + k and rec.patch_rows[u] == N_PATCHES * (len(own) + k)
        assert torch.equal(x[:len(own)], own)  # the stream images, untouched
        earlier = torch.cat(rec.stream[:u]) if u else own[:0]
        for img in x[len(own):]:  # each appended image is a stream image of an earlier update ...
            assert (earlier == img).flatten(1).all(1).any()
        for img in x[len(own):]:  # ... never one of this update
            assert not (own == img).flatten(1).all(1).any()
        assert len({tuple(img.flatten().tolist()) for img in x[len(own):]}) == k  # distinct buffer images
        assert len(rec.labels[u]) == len(own)  # labels are never extended
    held = replay.buffer.contents()
    assert len(held) == 10 and replay.buffer.seen == len(data)
    assert all((data.images == img).flatten(1).all(1).any() for img in held)
    assert strategy.counters.buffer_images == 5 * 4 and strategy.mb_added == 4


def test_the_buffer_holds_images_only_and_round_trips() -> None:
    replay = ReplayBufferPlugin(size=10, batch=4, policy="reservoir", seed=3)
    stream, strategy, _ = build_strategy([replay])
    strategy.train(list(stream), eval_streams=[])
    state = replay.state_dict()
    tensors = []

    def walk(v):
        if isinstance(v, dict):
            for w in v.values():
                walk(w)
        elif isinstance(v, torch.Tensor):
            tensors.append(v)

    walk(state)
    # the images (uint8, 3 channels) and two generator states: no label tensor anywhere
    assert sorted(t.dim() for t in tensors) == [1, 1, 4] and all(t.dtype == torch.uint8 for t in tensors)
    assert state["buffer"]["images"].shape[1:] == (3, 8, 8)
    again = ReplayBufferPlugin(size=10, batch=4, policy="reservoir", seed=99)
    again.load_state_dict(state)
    assert torch.equal(again.buffer.contents(), replay.buffer.contents()) and again.buffer.seen == 48
    assert torch.equal(again.buffer.sample(4, again.sample_gen), replay.buffer.sample(4, replay.sample_gen))
    with pytest.raises(ValueError, match="cl.replay.policy"):
        ReplayBufferPlugin(size=10, batch=4, policy="minred").load_state_dict(state)


def test_a_filling_buffer_saves_only_the_images_it_holds(tmp_path) -> None:
    """A buffer of 1000 slots holding 10 images saves 10 images: its state owns their bytes (a view of the slots
    would make torch.save write all 1000), and later inserts do not change a state already taken."""
    buf = ImageBuffer(1000)
    buf.add_reservoir(torch.full((10, 3, 32, 32), 7, dtype=torch.uint8), torch.Generator().manual_seed(0))
    state = buf.state_dict()
    path = tmp_path / "buffer.pt"
    torch.save(state, path)
    held = 10 * 3 * 32 * 32
    assert state["images"].untyped_storage().nbytes() == held
    assert held <= path.stat().st_size < 2 * held  # the full allocation would be 3 MB
    buf.add_reservoir(torch.zeros(5, 3, 32, 32, dtype=torch.uint8), torch.Generator().manual_seed(1))
    assert bool((state["images"] == 7).all())


def test_minred_run_keeps_a_full_buffer_of_stream_images() -> None:
    replay = ReplayBufferPlugin(size=10, batch=4, policy="minred", seed=3)
    stream, strategy, data = build_strategy([replay])
    strategy.train(list(stream), eval_streams=[])
    held = replay.buffer.contents()
    assert len(held) == 10 and len({tuple(i.flatten().tolist()) for i in held}) == 10
    assert all((data.images == img).flatten(1).all(1).any() for img in held)
    # candidates forwarded when the buffer overflowed: 8 + 8 at the 2nd update, then 10 + 8 at each later one
    assert strategy.counters.extra_forwards == 2 * BATCH + 4 * (10 + BATCH)
    assert strategy.model.training  # the feature forwards restored the training mode


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    """BatchNorm statistics that training does not move (with lr=0, the model's features never change)."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):  # 2-d in the encoder, 1-d in the heads
            m.momentum = 0.0
    return model


def test_minred_stored_features_choose_as_recomputed_ones_while_the_model_is_fixed() -> None:
    from tests.streaming_ssl.cl.tiny import tiny_model

    runs = {}
    for refresh in ("all", "stored"):
        replay = ReplayBufferPlugin(size=10, batch=4, policy="minred", minred_refresh=refresh, seed=3)
        torch.manual_seed(0)  # the same weights in both runs
        stream, strategy, _ = build_strategy([replay], model=_frozen(tiny_model()), lr=0.0)
        strategy.train(list(stream), eval_streams=[])
        runs[refresh] = (replay, strategy)
    (all_, s_all), (stored, s_stored) = runs["all"], runs["stored"]
    assert torch.equal(stored.buffer.contents(), all_.buffer.contents())  # the same choices ...
    # ... for 8 offered per update (6 updates) + 4 replayed in each of the last 5, instead of every candidate
    assert s_stored.counters.extra_forwards == 6 * BATCH + 5 * 4 < s_all.counters.extra_forwards == 88
    # the stored features are those of the held images (refreshing with the same model changes nothing)
    torch.testing.assert_close(stored.features, stored._features(stored.buffer.contents(), s_stored), atol=1e-5,
                               rtol=0)
    assert all_.features is None and "features" not in all_.state_dict()


def test_minred_stored_refresh_moves_only_the_replayed_features_by_the_ema() -> None:
    replay = ReplayBufferPlugin(size=10, batch=4, policy="minred", minred_refresh="stored", minred_ema=0.25, seed=3)
    stream, strategy, _ = build_strategy([replay])
    strategy.train(list(stream), eval_streams=[])  # a model that learned: stored features are now stale
    before = replay.features.clone()
    current = replay._features(replay.buffer.contents(), strategy)
    assert (before - current).norm(dim=1).max() > 1e-3
    slots = torch.tensor([1, 4, 7])
    forwards = strategy.counters.extra_forwards
    replay.refresh(slots, strategy)
    want = torch.nn.functional.normalize(0.25 * before[slots] + 0.75 * current[slots], dim=1)
    torch.testing.assert_close(replay.features[slots], want, atol=1e-6, rtol=0)
    others = torch.tensor([i for i in range(10) if i not in slots.tolist()])
    assert torch.equal(replay.features[others], before[others])
    assert strategy.counters.extra_forwards == forwards + 3


def test_minred_stored_state_round_trips_and_refuses_the_other_mode_or_a_damaged_state() -> None:
    replay = ReplayBufferPlugin(size=10, batch=4, policy="minred", minred_refresh="stored", seed=3)
    stream, strategy, _ = build_strategy([replay])
    strategy.train(list(stream), eval_streams=[])
    state = replay.state_dict()
    assert state["features"].shape == (10, replay.features.shape[1]) and state["features"].dtype == torch.float32
    again = ReplayBufferPlugin(size=10, batch=4, policy="minred", minred_refresh="stored", seed=3)
    again.load_state_dict(state)
    assert torch.equal(again.features, replay.features)
    assert torch.equal(again.buffer.contents(), replay.buffer.contents())
    with pytest.raises(ValueError, match="cl.replay.minred_refresh"):
        ReplayBufferPlugin(size=10, batch=4, policy="minred", seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="cl.replay.minred_refresh"):
        again.load_state_dict(ReplayBufferPlugin(size=10, batch=4, policy="minred", seed=3).state_dict())
    with pytest.raises(ValueError, match="earlier ckpt"):
        again.load_state_dict({**state, "features": state["features"][:7]})
    with pytest.raises(ValueError, match="minred_ema"):
        ReplayBufferPlugin(size=10, batch=4, policy="minred", minred_refresh="stored", minred_ema=1.0)
