"""The features cache reuses valid entries and recomputes (then rewrites) any entry it cannot use."""

from __future__ import annotations

import fractions
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scenarios.datasets import LazyImageFolder
from streaming_ssl.atomic import list_temp_files
from streaming_ssl.features_cache import cached_features, data_fingerprint, entry_path

KEY = {"dataset": "cifar10", "split": "train", "patches": 16, "n": 6, "checkpoint": "ckpt_000000003.pt"}


class Counter:
    """A compute function that counts its calls and returns distinct features each time."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, images: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        self.calls += 1
        return images.float().view(len(images), -1) * scale + self.calls


IMAGES = torch.arange(6 * 5, dtype=torch.uint8).view(6, 5)


def test_a_valid_entry_is_reused_without_computing(tmp_path: Path) -> None:
    compute = Counter()
    first = cached_features(tmp_path, KEY, compute, IMAGES, scale=2.0)
    assert compute.calls == 1 and torch.equal(first, IMAGES.float() * 2.0 + 1)
    assert entry_path(tmp_path, KEY).is_file()
    again = cached_features(tmp_path, dict(reversed(KEY.items())), compute, IMAGES, scale=2.0)  # key order is free
    assert compute.calls == 1 and torch.equal(again, first)
    other = cached_features(tmp_path, {**KEY, "split": "test"}, compute, IMAGES, scale=2.0)
    assert compute.calls == 2 and not torch.equal(other, first)
    assert list_temp_files(tmp_path) == []


def test_no_folder_always_computes(tmp_path: Path) -> None:
    compute = Counter()
    for folder in (None, ""):
        cached_features(folder, KEY, compute, IMAGES)
    assert compute.calls == 2


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _save(obj) -> Callable[[Path], None]:
    return lambda path: torch.save(obj, path)


DAMAGE = {
    "truncated": _truncated,
    "garbage bytes": lambda path: path.write_bytes(b"\x89not a torch file at all" * 50),
    "plain tensor": _save(torch.ones(6, 5)),
    "dict without the keys": _save({"features": torch.ones(6, 5)}),
    "another key": _save({"key": '{"dataset": "cifar100"}', "features": torch.ones(6, 5)}),
    "foreign pickle": lambda path: torch.save({"key": _stored_key(path), "features": fractions.Fraction(1, 3)}, path),
    "integer tensor": lambda path: torch.save({"key": _stored_key(path), "features": torch.ones(6, 5, dtype=torch.long)},
                                              path),
    "1-D tensor": lambda path: torch.save({"key": _stored_key(path), "features": torch.ones(30)}, path),
}


def _stored_key(path: Path) -> str:
    """The key string of the valid entry at path (so only the features are wrong)."""
    return torch.load(path, weights_only=True)["key"]


@pytest.mark.parametrize("damage", list(DAMAGE), ids=list(DAMAGE))
def test_an_unusable_entry_is_recomputed_once_rewritten_and_then_reused(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str) -> None:
    compute = Counter()
    cached_features(tmp_path, KEY, compute, IMAGES)
    path = entry_path(tmp_path, KEY)
    DAMAGE[damage](path)
    with caplog.at_level(logging.WARNING, logger="streaming_ssl.features_cache"):
        feats = cached_features(tmp_path, KEY, compute, IMAGES)
    assert compute.calls == 2 and torch.equal(feats, IMAGES.float() + 2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0] and "recomputing" in warnings[0]
    reused = cached_features(tmp_path, KEY, compute, IMAGES)
    assert compute.calls == 2 and torch.equal(reused, feats)
    assert list_temp_files(tmp_path) == []


def test_a_key_without_the_naming_fields_is_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lacks \\['patches'\\]"):
        cached_features(tmp_path, {"dataset": "cifar10", "split": "train"}, Counter(), IMAGES)


def test_an_entry_lies_in_the_folder_whatever_the_dataset_is_called(tmp_path: Path) -> None:
    key = {**KEY, "dataset": "npz:/data/digits.npz"}
    path = entry_path(tmp_path, key)
    assert path.parent == tmp_path and path.name.startswith("npz__data_digits.npz_train_p16_")
    assert entry_path(tmp_path, {**key, "dataset": "npz:/data_digits.npz"}) != path  # the digest tells them apart
    cached_features(tmp_path, key, Counter(), IMAGES)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_data_fingerprint_follows_every_pixel_and_label() -> None:
    images, labels = torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.uint8), torch.arange(6)
    base = data_fingerprint(images, labels)
    assert data_fingerprint(images.clone(), labels.clone()) == base
    one_pixel = images.clone()
    one_pixel[5, 2, 3, 3] ^= 1
    relabelled = labels.clone()
    relabelled[0] = 1
    others = {data_fingerprint(one_pixel, labels), data_fingerprint(images, relabelled),
              data_fingerprint(images.view(6, 3, 2, 8), labels), data_fingerprint(labels, images)}
    assert base not in others and len(others) == 4


def test_data_fingerprint_of_a_lazy_folder_follows_its_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    paths = [tmp_path / f"{i}.png" for i in range(2)]
    for p in paths:
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(p)
    base = data_fingerprint(LazyImageFolder(paths, 8))
    assert data_fingerprint(LazyImageFolder(paths, 8)) == base and data_fingerprint(LazyImageFolder(paths, 4)) != base
    st = os.stat(paths[1])
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(paths[1])
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # rewritten: a later modification time
    assert data_fingerprint(LazyImageFolder(paths, 8)) != base
    with pytest.raises(TypeError, match="takes tensors and LazyImageFolders"):
        data_fingerprint(np.zeros(3))


def test_without_mtimes_a_lazy_folder_copied_elsewhere_is_the_same_data(tmp_path: Path) -> None:
    """What a resume compares (build.stream_data): a requeued job that stages the same files afresh on its node (new
    times, another folder) resumes; a file of another size, or another name, is other data."""
    import shutil

    rng = np.random.default_rng(0)
    first = tmp_path / "job1" / "imagenet100" / "train"
    for i in range(3):
        (first / f"n0{i}").mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(first / f"n0{i}" / "a.png")
    second = tmp_path / "job2" / "scratch" / "imagenet100" / "train"
    shutil.copytree(first, second)  # new modification times too

    def lazy(root: Path) -> LazyImageFolder:
        return LazyImageFolder(sorted(root.rglob("*.png")), 8)

    base = data_fingerprint(lazy(first), mtimes=False)
    assert data_fingerprint(lazy(second), mtimes=False) == base
    assert data_fingerprint(lazy(second)) != data_fingerprint(lazy(first))  # the features cache: by path and time
    (second / "n02" / "a.png").rename(second / "n02" / "b.png")
    assert data_fingerprint(lazy(second), mtimes=False) != base
    (second / "n02" / "b.png").rename(second / "n02" / "a.png")
    with open(second / "n01" / "a.png", "ab") as fh:
        fh.write(b"x")
    assert data_fingerprint(lazy(second), mtimes=False) != base
