"""Where image tensors become Avalanche streams.

Every experience dataset is an Avalanche ClassificationDataset whose samples are (uint8 image, label,
task label) and which carries a `row_index` data attribute: the row of each sample in the training
image tensor. Avalanche keeps data attributes through subset and concat (online splitting, replay
buffers), so the strategy can gather a whole batch of images with one indexing operation instead of
collating samples one by one.

Class-incremental streams are planned here (seeded class order, even or uneven split, nothing dropped)
and built with Avalanche's class_incremental_benchmark; data-incremental streams as seeded i.i.d. shards
with benchmark_from_datasets; online streams with split_online_stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from collections.abc import Iterable, Iterator, Sequence

from typing import TYPE_CHECKING

import torch

from scenarios.datasets import ImageData

if TYPE_CHECKING:  # Avalanche is imported where streams are built, so that reading the registry stays cheap
    from avalanche.benchmarks.utils.classification_dataset import ClassificationDataset


class StreamError(ValueError):
    """A stream cannot be built as configured; the message names the setting to change."""


class _Rows(torch.utils.data.Dataset):
    """Sample i is (images[i], targets[i]); used by Avalanche's generic (per-sample) code paths."""

    def __init__(self, images, targets: torch.Tensor) -> None:
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        img = self.images[torch.tensor([i])][0] if not isinstance(self.images, torch.Tensor) else self.images[i]
        return img, int(self.targets[i])


def as_avalanche_dataset(data: ImageData) -> ClassificationDataset:
    """Wrap image data as an Avalanche classification dataset with a `row_index` attribute."""
    from avalanche.benchmarks.utils import DataAttribute
    from avalanche.benchmarks.utils.classification_dataset import ClassificationDataset
    from avalanche.benchmarks.utils.flat_data import ConstantSequence

    n = len(data)
    return ClassificationDataset(
        [_Rows(data.images, data.targets)],
        data_attributes=[
            DataAttribute(data.targets.tolist(), "targets"),
            DataAttribute(ConstantSequence(0, n), "targets_task_labels", use_in_getitem=True),
            DataAttribute(list(range(n)), "row_index"),
        ],
    )


def row_indices(dataset) -> torch.Tensor | None:
    """Rows of the training tensor that an experience dataset holds, or None if it has no `row_index`."""
    attr = getattr(dataset, "row_index", None)
    if attr is None:
        return None
    return torch.as_tensor(list(attr), dtype=torch.long)


def row_source(dataset) -> tuple[object, torch.Tensor] | None:
    """(images, targets) of the one training tensor an experience dataset's `row_index` points into, or None.

    Found by walking the Avalanche dataset tree down to our `_Rows` leaves; a dataset without `row_index`, or one
    that mixes leaves of several sources (a foreign concatenation), has none, and the strategy then collates
    samples one by one.
    """
    if getattr(dataset, "row_index", None) is None:
        return None
    leaves, todo, seen = [], [dataset], set()
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, _Rows):
            leaves.append(node)
        todo.extend(getattr(node, "_datasets", None) or [])
    sources = {id(leaf.images): leaf for leaf in leaves}
    if len(sources) != 1:
        return None
    leaf = next(iter(sources.values()))
    return leaf.images, leaf.targets


def plan_class_split(
    num_classes: int,
    *,
    n_experiences: int | None = None,
    classes_per_experience: Sequence[int] | None = None,
    experience_classes: Sequence[Sequence[int]] | None = None,
    seed: int = 0,
) -> list[list[int]]:
    """Classes of each experience.

    Explicit `experience_classes` are used as given (they must cover every class exactly once);
    otherwise a seeded permutation of the classes is cut into `classes_per_experience` (must sum to
    num_classes) or into `n_experiences` parts whose sizes differ by at most one (the first parts get
    the remainder), so no class is ever dropped.
    """
    if experience_classes is not None:
        flat = [int(c) for exp in experience_classes for c in exp]
        missing = sorted(set(range(num_classes)) - set(flat))
        extra = sorted(set(flat) - set(range(num_classes)))
        dup = sorted({c for c in flat if flat.count(c) > 1})
        if missing or extra or dup or any(len(e) == 0 for e in experience_classes):
            raise StreamError(
                "stream.experience_classes must list every class 0.."
                f"{num_classes - 1} exactly once, each experience non-empty: missing {missing[:10]}, "
                f"unknown {extra[:10]}, repeated {dup[:10]}")
        return [[int(c) for c in exp] for exp in experience_classes]
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_classes, generator=gen).tolist()
    if classes_per_experience is not None:
        if any(size < 1 for size in classes_per_experience):
            raise StreamError(f"stream.classes_per_experience {list(classes_per_experience)}: every experience needs "
                              "at least one class")
        if sum(classes_per_experience) != num_classes:
            raise StreamError(
                f"stream.classes_per_experience {list(classes_per_experience)} sums to "
                f"{sum(classes_per_experience)}, but the dataset has {num_classes} classes; make the "
                "counts add up to the number of classes")
        sizes = list(classes_per_experience)
    else:
        if n_experiences is None or not 1 <= n_experiences <= num_classes:
            raise StreamError(f"stream.n_experiences must be between 1 and {num_classes} (the number of "
                              f"classes) for a class-incremental stream, got {n_experiences}")
        base, extra_n = divmod(num_classes, n_experiences)
        sizes = [base + (1 if i < extra_n else 0) for i in range(n_experiences)]
    out, start = [], 0
    for size in sizes:
        out.append(order[start:start + size])
        start += size
    return out


@dataclass
class SSLStream:
    """A training stream plus what the evaluator and the schedule need to know about it.

    Attributes:
        experiences: Avalanche experiences in training order (online: a lazy CLStream).
        parent_classes: classes of each parent experience (the columns of the accuracy matrix).
        parent_sizes: number of training samples of each parent experience.
        step_parent: for each training experience, the index of its parent experience.
        step_sizes: number of samples of each training experience.
        epochs: passes over each experience.
    """

    experiences: Iterable
    parent_classes: list[list[int]]
    parent_sizes: list[int]
    step_parent: list[int]
    step_sizes: list[int]
    epochs: int = 1
    mode: str = "class_incremental"
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.step_sizes)

    def n_updates(self, batch_size: int) -> int:
        """Optimizer updates of the whole stream (every batch of every experience, every epoch)."""
        return self.epochs * sum(math.ceil(n / batch_size) for n in self.step_sizes)

    def is_parent_end(self, step: int) -> bool:
        return step == len(self.step_parent) - 1 or self.step_parent[step + 1] != self.step_parent[step]

    def __iter__(self) -> Iterator:
        return iter(self.experiences)


@dataclass
class StreamOptions:
    """The settings of build_stream, handed to the mode's builder."""

    n_experiences: int = 5
    classes_per_experience: Sequence[int] | None = None
    experience_classes: Sequence[Sequence[int]] | None = None
    class_order_seed: int = 0
    epochs: int = 1
    online_base: str = "class_incremental"
    online_experience_size: int = 10
    access_task_boundaries: bool = False
    seed: int = 0


def _offline(train: ImageData, num_classes: int, o: StreamOptions) -> SSLStream:
    """One experience holding the whole training set, `epochs` passes."""
    return SSLStream([_single_experience(as_avalanche_dataset(train))], [list(range(num_classes))], [len(train)], [0],
                     [len(train)], epochs=o.epochs, mode="offline")


def _class_incremental(train: ImageData, num_classes: int, o: StreamOptions) -> SSLStream:
    """Classes in a seeded order, split into experiences (plan_class_split; nothing dropped)."""
    from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark

    split = plan_class_split(num_classes, n_experiences=o.n_experiences, classes_per_experience=o.classes_per_experience,
                             experience_classes=o.experience_classes, seed=o.class_order_seed)
    bench = class_incremental_benchmark({"train": as_avalanche_dataset(train)},
                                        class_order=[c for e in split for c in e],
                                        num_classes_per_exp=[len(e) for e in split])
    counts = torch.bincount(train.targets, minlength=num_classes)
    sizes = [int(counts[e].sum()) for e in split]
    return SSLStream(list(bench.train_stream), split, sizes, list(range(len(split))), sizes, epochs=o.epochs,
                     mode="class_incremental")


def _data_incremental(train: ImageData, num_classes: int, o: StreamOptions) -> SSLStream:
    """Seeded i.i.d. shards, stratified: each class's rows, shuffled, dealt round-robin, so every shard holds each
    class within one sample of the others and shard sizes differ by at most one.

    Our own shards: Avalanche 0.6's new_instances_benchmark reseeds the global torch RNG, never shuffles within a
    class, and can leave experiences empty."""
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets

    if not 1 <= o.n_experiences <= len(train):
        raise StreamError(f"stream.n_experiences must be between 1 and {len(train)}, got {o.n_experiences}")
    gen = torch.Generator().manual_seed(o.class_order_seed)
    dealt = torch.cat([rows[torch.randperm(len(rows), generator=gen)]
                       for rows in (torch.nonzero(train.targets == c).flatten() for c in range(num_classes))])
    owner = torch.arange(len(dealt)) % o.n_experiences
    dataset = as_avalanche_dataset(train)
    bench = benchmark_from_datasets(train=[dataset.subset(dealt[owner == k].tolist()) for k in range(o.n_experiences)])
    parents = list(bench.train_stream)
    sizes = [len(e.dataset) for e in parents]
    return SSLStream(parents, [list(range(num_classes)) for _ in parents], sizes, list(range(len(parents))), sizes,
                     epochs=o.epochs, mode="data_incremental")


def _online(train: ImageData, num_classes: int, o: StreamOptions) -> SSLStream:
    """Each experience of the `online_base` stream cut into mini-experiences of `online_experience_size` samples
    (Avalanche's split_online_stream); one pass."""
    from avalanche.benchmarks.scenarios.online import split_online_stream

    if o.online_base not in ONLINE_BASES:
        raise StreamError(f"stream.online_base must be one of {', '.join(ONLINE_BASES)}, got {o.online_base!r}")
    base = STREAM_MODES[o.online_base](train, num_classes, o)
    k = o.online_experience_size
    step_parent, step_sizes = [], []
    for p, size in enumerate(base.parent_sizes):
        full, rest = divmod(size, k)
        step_sizes += [k] * full + ([rest] if rest else [])
        step_parent += [p] * (full + (1 if rest else 0))
    online = split_online_stream(base.experiences, k, shuffle=True, drop_last=False,
                                 access_task_boundaries=o.access_task_boundaries, seed=o.seed)
    return SSLStream(online, base.parent_classes, base.parent_sizes, step_parent, step_sizes, epochs=1, mode="online")


# The stream modes: name -> builder(train, num_classes, StreamOptions). Adding a mode touches only this dict
# (config validation reads its names).
STREAM_MODES = {"class_incremental": _class_incremental, "data_incremental": _data_incremental, "online": _online,
                "offline": _offline}
MODES = tuple(STREAM_MODES)
ONLINE_BASES = ("class_incremental", "data_incremental")  # the modes an online stream can be cut from


def build_stream(train: ImageData, num_classes: int, *, mode: str, **options) -> SSLStream:
    """Build the training stream of a run: STREAM_MODES[mode] with the StreamOptions fields as keywords."""
    if mode not in STREAM_MODES:
        raise StreamError(f"unknown stream mode {mode!r}; valid: {', '.join(MODES)}")
    return STREAM_MODES[mode](train, num_classes, StreamOptions(**options))


def _single_experience(dataset: ClassificationDataset):
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets

    return next(iter(benchmark_from_datasets(train=[dataset]).train_stream))
