"""Tests of scenarios.streams (class splits, Avalanche streams, row indices) and the strategy's RowBatchLoader.

The synthetic training data makes every row identifiable: the pixels of row n encode n (channel 0: n % 256,
channel 1: n // 256) and channel 2 holds its label, so a sample read back through Avalanche can be traced to
the row of the training tensor it came from.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from scenarios.datasets import ImageData, LazyImageFolder
from scenarios.streams import (
    SSLStream,
    StreamError,
    as_avalanche_dataset,
    build_stream,
    plan_class_split,
    row_indices,
)
from streaming_ssl.strategy import RowBatchLoader

# --------------------------------------------------------------------------------------------- helpers


def make_data(counts: list[int], seed: int = 0) -> ImageData:
    """counts[c] rows of class c, interleaved in a seeded order; the pixels of row n encode n."""
    targets = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(counts)])
    targets = targets[torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))]
    n = len(targets)
    rows = torch.arange(n)
    images = torch.empty(n, 3, 2, 2, dtype=torch.uint8)
    images[:, 0] = (rows % 256).to(torch.uint8).view(n, 1, 1)
    images[:, 1] = (rows // 256).to(torch.uint8).view(n, 1, 1)
    images[:, 2] = targets.to(torch.uint8).view(n, 1, 1)
    return ImageData(images, targets)


def decode_row(img: torch.Tensor) -> int:
    return int(img[0, 0, 0]) + 256 * int(img[1, 0, 0])


def exp_rows(exp) -> torch.Tensor:
    rows = row_indices(exp.dataset)
    assert rows is not None, "experience dataset lost its row_index attribute"
    return rows


def check_samples_match_rows(dataset, data: ImageData, positions=None) -> None:
    """Sample i of an Avalanche dataset is row row_index[i] of the training data (image, label, task 0)."""
    rows = row_indices(dataset)
    assert len(rows) == len(dataset)
    assert list(dataset.targets) == data.targets[rows].tolist()
    for i in positions if positions is not None else range(len(dataset)):
        x, y, t = dataset[i]
        assert decode_row(x) == int(rows[i]), i
        assert torch.equal(x, data.images[rows[i]])
        assert int(y) == int(data.targets[rows[i]]) and int(t) == 0


def assert_each_row_once(row_groups, n: int) -> None:
    counts = torch.bincount(torch.cat(list(row_groups)), minlength=n)
    assert len(counts) == n, "a row index outside the training tensor"
    assert counts.tolist() == [1] * n, f"rows missing: {(counts == 0).nonzero().flatten().tolist()}, " \
                                       f"repeated: {(counts > 1).nonzero().flatten().tolist()}"


def ident_fetch(rows: torch.Tensor):
    """fetch for RowBatchLoader: x is the rows themselves (so batches can be compared), y = rows % 7."""
    return rows.clone(), rows % 7


def loader_batches(loader) -> list[torch.Tensor]:
    out = []
    for x, y, t in loader:
        assert torch.equal(y, x % 7) and t.tolist() == [0] * len(y)
        out.append(x)
    return out


def expected_sizes(num_classes: int, n_experiences: int) -> list[int]:
    base, extra = divmod(num_classes, n_experiences)
    return [base + 1] * extra + [base] * (n_experiences - extra)


# counts per class deliberately unequal so parent sizes depend on which classes an experience holds
COUNTS10 = [3, 4, 5, 3, 4, 5, 3, 4, 5, 6]


@pytest.fixture(scope="module")
def data10() -> ImageData:
    return make_data(COUNTS10)


# ------------------------------------------------------------------------------------- plan_class_split


def test_plan_even_split_is_a_partition():
    split = plan_class_split(10, n_experiences=5, seed=0)
    assert [len(e) for e in split] == [2] * 5
    flat = [c for e in split for c in e]
    assert sorted(flat) == list(range(10))
    assert all(isinstance(c, int) for c in flat)


@pytest.mark.parametrize("num_classes, n_exp, sizes", [
    (10, 3, [4, 3, 3]),  # Avalanche 0.6's own num_experiences path would drop a class here
    (10, 4, [3, 3, 2, 2]),
    (100, 7, [15, 15, 14, 14, 14, 14, 14]),
    (200, 11, [19] * 2 + [18] * 9),
    (7, 7, [1] * 7),
    (5, 1, [5]),
])
def test_plan_uneven_split_drops_no_class(num_classes, n_exp, sizes):
    split = plan_class_split(num_classes, n_experiences=n_exp, seed=3)
    assert [len(e) for e in split] == sizes == expected_sizes(num_classes, n_exp)
    flat = [c for e in split for c in e]
    assert len(flat) == num_classes and set(flat) == set(range(num_classes))


def test_plan_classes_per_experience_cuts_the_same_seeded_order():
    split = plan_class_split(10, classes_per_experience=[5, 2, 3], seed=4)
    assert [len(e) for e in split] == [5, 2, 3]
    flat = [c for e in split for c in e]
    assert sorted(flat) == list(range(10))
    # the seeded class order does not depend on how it is cut
    other = plan_class_split(10, n_experiences=2, seed=4)
    assert flat == [c for e in other for c in e]
    # classes_per_experience wins over n_experiences
    assert plan_class_split(10, n_experiences=7, classes_per_experience=[5, 2, 3], seed=4) == split


def test_plan_explicit_experience_classes_used_as_given():
    given = [[9, 0], [3, 1, 2], [4, 5, 6, 7, 8]]
    for seed in (0, 1, 2):
        split = plan_class_split(10, n_experiences=4, classes_per_experience=[5, 5], experience_classes=given, seed=seed)
        assert split == given
    assert plan_class_split(3, experience_classes=[[2], [0, 1]]) == [[2], [0, 1]]
    assert plan_class_split(2, experience_classes=((1,), (0,))) == [[1], [0]]


@pytest.mark.parametrize("kwargs, match", [
    (dict(classes_per_experience=[5, 2, 2]), r"stream\.classes_per_experience \[5, 2, 2\] sums to 9.*10 classes"),
    (dict(classes_per_experience=[5, 2, 4]), r"stream\.classes_per_experience .*sums to 11"),
    (dict(experience_classes=[[0, 1, 2], [3, 4, 5, 6, 7, 8]]), r"stream\.experience_classes.*missing \[9\]"),
    (dict(experience_classes=[[0, 1, 2, 9], [1, 3, 4, 5, 6, 7, 8]]), r"stream\.experience_classes.*repeated \[1\]"),
    (dict(experience_classes=[[0, 1, 2, 9], [3, 4, 5, 6, 7, 8, 10]]), r"stream\.experience_classes.*unknown \[10\]"),
    (dict(experience_classes=[[0, 1, 2, 9], [-1, 3, 4, 5, 6, 7, 8]]), r"stream\.experience_classes.*unknown \[-1\]"),
    (dict(experience_classes=[list(range(10)), []]), r"stream\.experience_classes.*non-empty"),
    (dict(classes_per_experience=[10, 0]), r"stream\.classes_per_experience \[10, 0\].*at least one class"),
    (dict(classes_per_experience=[12, -2]), r"stream\.classes_per_experience \[12, -2\].*at least one class"),
    (dict(n_experiences=11), r"stream\.n_experiences must be between 1 and 10.*got 11"),
    (dict(n_experiences=0), r"stream\.n_experiences must be between 1 and 10.*got 0"),
    (dict(), r"stream\.n_experiences"),
])
def test_plan_errors(kwargs, match):
    with pytest.raises(StreamError, match=match):
        plan_class_split(10, **kwargs)
    assert issubclass(StreamError, ValueError)


def test_plan_seed_sets_the_order():
    a = plan_class_split(10, n_experiences=5, seed=0)
    assert plan_class_split(10, n_experiences=5, seed=0) == a
    orders = {tuple(c for e in plan_class_split(10, n_experiences=5, seed=s) for c in e) for s in range(4)}
    assert len(orders) == 4, "different seeds gave the same class order"
    # the plan does not depend on (or disturb) the global torch RNG
    torch.manual_seed(123)
    state = torch.get_rng_state()
    assert plan_class_split(10, n_experiences=5, seed=0) == a
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)
    assert plan_class_split(10, n_experiences=5, seed=0) == a


# ----------------------------------------------------------------------------- build_stream: class-incremental


@pytest.mark.parametrize("split_kwargs", [
    dict(n_experiences=5),  # even
    dict(n_experiences=3),  # uneven: 4, 3, 3 classes
    dict(n_experiences=4, classes_per_experience=[5, 2, 3]),
    dict(experience_classes=[[9, 0], [3, 1, 2], [4, 5, 6, 7, 8]]),
], ids=["even5", "uneven3", "cpe523", "explicit"])
def test_class_incremental_stream(data10, split_kwargs):
    stream = build_stream(data10, 10, mode="class_incremental", class_order_seed=7, **split_kwargs)
    plan = plan_class_split(10, seed=7, **split_kwargs)
    assert isinstance(stream, SSLStream) and stream.mode == "class_incremental" and stream.epochs == 1
    assert stream.parent_classes == plan
    exps = list(stream)
    t_count = len(plan)
    assert len(exps) == len(stream) == t_count
    assert stream.step_parent == list(range(t_count))
    assert stream.parent_sizes == [sum(COUNTS10[c] for c in classes) for classes in plan]
    assert stream.step_sizes == stream.parent_sizes
    assert [stream.is_parent_end(i) for i in range(t_count)] == [True] * t_count
    for t, exp in enumerate(exps):
        assert sorted(set(exp.dataset.targets)) == sorted(plan[t]), t
        assert len(exp.dataset) == stream.parent_sizes[t]
        check_samples_match_rows(exp.dataset, data10)
    assert_each_row_once((exp_rows(e) for e in exps), len(data10))


def test_class_incremental_uses_class_order_seed(data10):
    a = build_stream(data10, 10, mode="class_incremental", n_experiences=3, class_order_seed=1)
    b = build_stream(data10, 10, mode="class_incremental", n_experiences=3, class_order_seed=2)
    assert a.parent_classes == plan_class_split(10, n_experiences=3, seed=1)
    assert b.parent_classes == plan_class_split(10, n_experiences=3, seed=2)
    assert a.parent_classes != b.parent_classes
    assert [sorted(set(e.dataset.targets)) for e in b] == [sorted(c) for c in b.parent_classes]


def test_class_incremental_errors(data10):
    with pytest.raises(StreamError, match=r"stream\.n_experiences"):
        build_stream(data10, 10, mode="class_incremental", n_experiences=11)
    with pytest.raises(StreamError, match=r"stream\.classes_per_experience"):
        build_stream(data10, 10, mode="class_incremental", classes_per_experience=[4, 4])
    with pytest.raises(StreamError, match=r"unknown stream mode 'incremental'.*class_incremental"):
        build_stream(data10, 10, mode="incremental")
    with pytest.raises(StreamError, match=r"stream\.online_base"):
        build_stream(data10, 10, mode="online", online_base="offline")


# ------------------------------------------------------------------------------ build_stream: data-incremental

COUNTS4 = [7, 8, 9, 10]


def test_data_incremental_shards(tmp_path):
    data = make_data(COUNTS4, seed=1)
    n_exp = 3
    stream = build_stream(data, 4, mode="data_incremental", n_experiences=n_exp, class_order_seed=2)
    exps = list(stream)
    assert len(exps) == len(stream) == n_exp and stream.mode == "data_incremental"
    assert stream.step_parent == [0, 1, 2] and stream.step_sizes == stream.parent_sizes
    assert stream.parent_sizes == [len(e.dataset) for e in exps] and sum(stream.parent_sizes) == len(data)
    assert stream.parent_classes == [[0, 1, 2, 3]] * n_exp
    assert_each_row_once((exp_rows(e) for e in exps), len(data))
    for e in exps:
        check_samples_match_rows(e.dataset, data)
    # every class is spread evenly: its counts over the shards differ by at most one
    per_class = torch.stack([torch.bincount(data.targets[exp_rows(e)], minlength=4) for e in exps])
    assert per_class.sum(0).tolist() == COUNTS4
    assert ((per_class.max(0).values - per_class.min(0).values) <= 1).all(), per_class
    assert max(stream.parent_sizes) - min(stream.parent_sizes) <= 4  # at most one per class


def test_data_incremental_errors():
    data = make_data([2, 3])
    with pytest.raises(StreamError, match=r"stream\.n_experiences must be between 1 and 5, got 6"):
        build_stream(data, 2, mode="data_incremental", n_experiences=6)
    with pytest.raises(StreamError, match=r"stream\.n_experiences must be between 1 and 5, got 0"):
        build_stream(data, 2, mode="data_incremental", n_experiences=0)


def test_data_incremental_as_many_experiences_as_samples():
    data = make_data([2, 3])
    stream = build_stream(data, 2, mode="data_incremental", n_experiences=5)
    assert_each_row_once((exp_rows(e) for e in stream), 5)
    assert stream.step_sizes == [1] * 5, "an allowed n_experiences produced empty (or doubled) experiences"


@pytest.mark.parametrize("mode", ["data_incremental", "online"])
def test_building_a_stream_leaves_the_global_rng_alone(mode):
    data = make_data(COUNTS4)
    draws = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        build_stream(data, 4, mode=mode, n_experiences=2, online_base="data_incremental", class_order_seed=0)
        draws.append(torch.rand(4))
    assert not torch.equal(draws[0], draws[1]), "the global RNG was reseeded by build_stream"


def test_class_incremental_and_offline_leave_the_global_rng_alone():
    data = make_data(COUNTS4)
    for mode in ("class_incremental", "offline"):
        torch.manual_seed(5)
        state = torch.get_rng_state()
        build_stream(data, 4, mode=mode, n_experiences=2)
        assert torch.equal(torch.get_rng_state(), state), mode


def test_data_incremental_shards_are_seeded_random_splits():
    data = make_data([10, 10, 10, 10], seed=3)
    first_half = sorted(r for c in range(4) for r in (data.targets == c).nonzero().flatten()[:5].tolist())
    shards0 = [sorted(exp_rows(next(iter(build_stream(data, 4, mode="data_incremental", n_experiences=2,
                                                       class_order_seed=s)))).tolist()) for s in range(4)]
    assert any(s != first_half for s in shards0), "shard 0 is the first half of every class for every seed"
    assert len({tuple(s) for s in shards0}) > 1, "class_order_seed does not change the split"


# ------------------------------------------------------------------------------------ build_stream: online


@pytest.mark.parametrize("base, k", [("class_incremental", 4), ("class_incremental", 5), ("data_incremental", 4)])
def test_online_stream_mini_experiences(data10, base, k):
    kw = dict(n_experiences=3, class_order_seed=5, online_base=base)
    parents = build_stream(data10, 10, mode=base, **kw)
    parent_rows = [set(exp_rows(e).tolist()) for e in parents]
    stream = build_stream(data10, 10, mode="online", online_experience_size=k, seed=11, epochs=1, **kw)
    assert stream.mode == "online" and stream.epochs == 1
    assert stream.parent_sizes == parents.parent_sizes and stream.parent_classes == parents.parent_classes
    # sizes: full mini-experiences of k, the last of each parent may be smaller (never empty)
    expected_sizes_, expected_parent = [], []
    for p, size in enumerate(parents.parent_sizes):
        sizes = [k] * (size // k) + ([size % k] if size % k else [])
        expected_sizes_ += sizes
        expected_parent += [p] * len(sizes)
    assert stream.step_sizes == expected_sizes_ and stream.step_parent == expected_parent
    assert sum(1 for s in stream.step_sizes if s < k) <= len(parents.parent_sizes)
    # ... and they are what iterating the stream actually produces
    exps = list(stream)
    assert len(exps) == len(stream) == len(expected_sizes_)
    assert [len(e.dataset) for e in exps] == stream.step_sizes
    covered = [set() for _ in parent_rows]
    for i, e in enumerate(exps):
        rows = set(exp_rows(e).tolist())
        assert rows <= parent_rows[stream.step_parent[i]], f"mini-experience {i} holds rows of another parent"
        covered[stream.step_parent[i]] |= rows
        assert stream.is_parent_end(i) == (i == len(exps) - 1 or stream.step_parent[i + 1] != stream.step_parent[i])
    assert covered == parent_rows
    assert_each_row_once((exp_rows(e) for e in exps), len(data10))
    check_samples_match_rows(exps[0].dataset, data10)
    check_samples_match_rows(exps[-1].dataset, data10)
    assert [stream.is_parent_end(i) for i in range(len(exps))].count(True) == len(parent_rows)


def test_online_stream_is_reproducible(data10):
    """Resuming re-creates the stream in a new process and skips the finished mini-experiences."""
    kw = dict(mode="online", n_experiences=3, online_experience_size=4, seed=11)
    a = [exp_rows(e).tolist() for e in build_stream(data10, 10, **kw)]
    stream = build_stream(data10, 10, **kw)
    assert [exp_rows(e).tolist() for e in stream] == a
    assert [exp_rows(e).tolist() for e in stream] == a  # iterating again gives the same mini-experiences
    # mini-experiences are shuffled within their parent (not the parent's rows cut in order)
    parents = [exp_rows(e).tolist() for e in build_stream(data10, 10, mode="class_incremental", n_experiences=3)]
    n0 = len([p for p in stream.step_parent if p == 0])
    assert [r for mini in a[:n0] for r in mini] != parents[0]


def test_offline_stream(data10):
    stream = build_stream(data10, 10, mode="offline", epochs=3, n_experiences=4)
    exps = list(stream)
    n = len(data10)
    assert len(exps) == len(stream) == 1 and stream.mode == "offline" and stream.epochs == 3
    assert stream.parent_classes == [list(range(10))] and stream.parent_sizes == [n] and stream.step_sizes == [n]
    assert stream.step_parent == [0] and stream.is_parent_end(0)
    assert_each_row_once([exp_rows(exps[0])], n)
    check_samples_match_rows(exps[0].dataset, data10, positions=range(0, n, 5))
    for b in (1, 7, 8, n, n + 3):
        assert stream.n_updates(b) == 3 * math.ceil(n / b)


# ------------------------------------------------------------------------------------------------ n_updates


@pytest.mark.parametrize("mode, kw", [
    ("class_incremental", dict(n_experiences=3)),
    ("data_incremental", dict(n_experiences=4)),
    ("online", dict(n_experiences=3, online_experience_size=6)),
    ("offline", dict(epochs=2)),
])
def test_n_updates_counts_the_loader_batches(data10, mode, kw):
    stream = build_stream(data10, 10, mode=mode, **kw)
    exps = list(stream)
    for batch_size in (1, 4, 5, 7, 100):
        batches = 0
        for i, exp in enumerate(exps):
            loader = RowBatchLoader(exp_rows(exp), ident_fetch, batch_size, seed=0, key=("exp", i))
            for epoch in range(stream.epochs):
                loader.set_epoch(epoch)
                n_batches = sum(1 for _ in loader)
                assert n_batches == len(loader) == math.ceil(len(exp.dataset) / batch_size)
                batches += n_batches
        assert stream.n_updates(batch_size) == batches, (mode, batch_size)


# ------------------------------------------------------------------------------------------- RowBatchLoader

ROWS = torch.arange(100, 137)  # 37 rows that are not positions: the loader must yield the row values


def test_loader_epoch_yields_every_row_once():
    loader = RowBatchLoader(ROWS, ident_fetch, 8, seed=3, key=("exp", 0))
    assert len(loader) == 5
    batches = loader_batches(loader)
    assert [len(b) for b in batches] == [8, 8, 8, 8, 5]
    assert loader.last_global_size == 5
    assert sorted(torch.cat(batches).tolist()) == ROWS.tolist()
    assert not torch.equal(torch.cat(batches), ROWS), "shuffle=True but the rows came in their original order"
    plain = RowBatchLoader(ROWS, ident_fetch, 8, seed=3, key=("exp", 0), shuffle=False)
    assert torch.equal(torch.cat(loader_batches(plain)), ROWS)
    exact = RowBatchLoader(ROWS[:32], ident_fetch, 8, seed=3, key=("exp", 0))
    assert [len(b) for b in loader_batches(exact)] == [8, 8, 8, 8]


def test_loader_starts_workers_only_for_an_epoch_of_several_batches():
    """Workers overlap the fetch of later batches with training on earlier ones; a single batch (an online
    mini-experience) has nothing to overlap, and starting workers for it took 4 to 15 times its decode (PNG folder,
    1 to 8 workers), so this process fetches it. Never more workers than batches; the batches are the same."""
    base = loader_batches(RowBatchLoader(ROWS, ident_fetch, 8, seed=3, key=("exp", 0)))
    for workers, rows, used in ((3, ROWS, 3), (8, ROWS, 5), (3, ROWS[:8], 0), (3, ROWS[:16], 2), (0, ROWS, 0)):
        loader = RowBatchLoader(rows, ident_fetch, 8, seed=3, key=("exp", 0), workers=workers)
        batches = loader_batches(loader)
        assert loader.last_workers == used, (workers, len(rows))
        if len(rows) == len(ROWS):
            assert all(torch.equal(a, b) for a, b in zip(batches, base)) and len(batches) == len(base)
        else:
            assert sorted(torch.cat(batches).tolist()) == rows.tolist()


def test_loader_order_is_seeded_by_seed_key_and_epoch():
    def order(seed=3, key=("exp", 0), epoch=0):
        loader = RowBatchLoader(ROWS, ident_fetch, 8, seed=seed, key=key)
        loader.set_epoch(epoch)
        return torch.cat(loader_batches(loader))

    base = order()
    assert torch.equal(order(), base)
    torch.manual_seed(1)  # the global RNG plays no part
    assert torch.equal(order(), base)
    loader = RowBatchLoader(ROWS, ident_fetch, 8, seed=3, key=("exp", 0))
    assert torch.equal(torch.cat(loader_batches(loader)), base)
    assert torch.equal(torch.cat(loader_batches(loader)), base)  # iterating the same epoch again
    loader.set_epoch(1)
    epoch1 = torch.cat(loader_batches(loader))
    assert sorted(epoch1.tolist()) == ROWS.tolist() and not torch.equal(epoch1, base)
    assert torch.equal(order(epoch=1), epoch1)
    assert not torch.equal(order(key=("exp", 1)), base)
    assert not torch.equal(order(seed=4), base)


@pytest.mark.parametrize("world", [2, 3])
def test_loader_ranks_share_each_global_batch(world):
    epoch = 2
    glob = RowBatchLoader(ROWS, ident_fetch, 8, seed=3, key=("exp", 2))
    glob.set_epoch(epoch)
    global_batches = loader_batches(glob)
    shards = []
    for rank in range(world):
        loader = RowBatchLoader(ROWS, ident_fetch, 8, seed=3, key=("exp", 2), rank=rank, world=world)
        loader.set_epoch(epoch)
        assert len(loader) == len(global_batches)
        rank_batches, sizes = [], []
        for x, _y, _t in loader:
            rank_batches.append(x)
            sizes.append(loader.last_global_size)
        assert sizes == [len(b) for b in global_batches]  # each rank knows the global batch size
        shards.append(rank_batches)
    for b, global_batch in enumerate(global_batches):
        parts = [shards[r][b] for r in range(world)]
        assert torch.equal(torch.cat(parts), global_batch), b  # contiguous shares, in rank order
        lens = [len(p) for p in parts]
        assert max(lens) - min(lens) <= 1
        assert len(set(torch.cat(parts).tolist())) == len(global_batch)  # disjoint


@pytest.mark.parametrize("start", [0, 1, 3, 4, 5, 7])
def test_loader_start_batch_resumes_the_same_order(start):
    full = RowBatchLoader(ROWS, ident_fetch, 8, seed=9, key=("exp", 4))
    full.set_epoch(1)
    expected = loader_batches(full)
    resumed = RowBatchLoader(ROWS, ident_fetch, 8, seed=9, key=("exp", 4), start_batch=start)
    resumed.set_epoch(1)
    assert len(resumed) == max(len(expected) - start, 0)
    got = loader_batches(resumed)
    assert len(got) == len(expected[start:])
    assert all(torch.equal(a, b) for a, b in zip(got, expected[start:]))
    # the skip applies to the interrupted pass only: the next pass is whole again
    assert len(resumed) == len(expected)
    resumed.set_epoch(2)
    full.set_epoch(2)
    again = loader_batches(resumed)
    assert len(again) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(again, loader_batches(full)))


def test_loader_start_batch_with_ranks():
    world, start = 2, 2
    glob = loader_batches(RowBatchLoader(ROWS, ident_fetch, 8, seed=1, key=("exp", 0)))
    for rank in range(world):
        got = loader_batches(RowBatchLoader(ROWS, ident_fetch, 8, seed=1, key=("exp", 0), start_batch=start,
                                            rank=rank, world=world))
        assert len(got) == len(glob) - start
        for a, g in zip(got, glob[start:]):
            half = (len(g) + 1) // 2
            assert torch.equal(a, g[:half] if rank == 0 else g[half:])


# ----------------------------------------------------------------------------------------------- row_indices


def test_as_avalanche_dataset_rows(data10):
    ds = as_avalanche_dataset(data10)
    assert len(ds) == len(data10)
    assert torch.equal(row_indices(ds), torch.arange(len(data10)))
    check_samples_match_rows(ds, data10, positions=[0, 1, 17, len(data10) - 1])


def test_row_indices_survive_subset_and_concat(data10):
    stream = build_stream(data10, 10, mode="class_incremental", n_experiences=3)
    e0, e1, e2 = list(stream)
    r0, r1, r2 = exp_rows(e0), exp_rows(e1), exp_rows(e2)

    sub = e0.dataset.subset([3, 0, 5])
    assert torch.equal(row_indices(sub), r0[[3, 0, 5]])
    check_samples_match_rows(sub, data10)

    cat = e0.dataset.concat(e1.dataset)
    assert torch.equal(row_indices(cat), torch.cat([r0, r1]))
    check_samples_match_rows(cat, data10, positions=[0, len(r0) - 1, len(r0), len(cat) - 1])
    plus = e2.dataset + e0.dataset
    assert torch.equal(row_indices(plus), torch.cat([r2, r0]))

    # a replay-buffer-like mix: a subset of a concat of subsets
    buffer = e0.dataset.subset([1, 2]).concat(e1.dataset.subset([0]))
    mixed = buffer.concat(e2.dataset).subset([0, 2, 3, len(buffer) + len(r2) - 1])
    expect = torch.cat([r0[[1, 2]], r1[[0]], r2])[[0, 2, 3, len(buffer) + len(r2) - 1]]
    assert torch.equal(row_indices(mixed), expect)
    check_samples_match_rows(mixed, data10)


def test_row_indices_none_without_attribute():
    plain = torch.utils.data.TensorDataset(torch.zeros(3, 1))
    assert row_indices(plain) is None


def test_as_avalanche_dataset_with_lazy_images(tiny_imagenet_root):
    paths = sorted((tiny_imagenet_root / "tiny-imagenet-200" / "train").glob("*/images/*.JPEG"))[:5]
    lazy = LazyImageFolder(paths, image_size=8)
    data = ImageData(lazy, torch.tensor([0, 0, 1, 1, 2]))
    ds = as_avalanche_dataset(data)
    sub = ds.subset([4, 1])
    assert row_indices(sub).tolist() == [4, 1]
    x, y, t = sub[0]
    assert torch.equal(x, lazy[4]) and int(y) == 2 and int(t) == 0
    assert Counter(ds.targets) == Counter([0, 0, 1, 1, 2])
