"""Tests for scenarios.datasets on small fixtures written in each official on-disk layout."""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import pickle
import re
import shutil
import struct

import numpy as np
import pytest
import torch
import torchvision
from torchvision.io import ImageReadMode, decode_image, encode_jpeg, encode_png, write_file

from scenarios import datasets as ds
from scenarios.datasets import (
    DATASET_NAMES,
    DATASETS,
    ENV_VAR,
    DataError,
    DatasetSplits,
    ImageData,
    LazyImageFolder,
    dataset_spec,
    load_dataset,
    resolve_root,
    stem_for_size,
)

# torchvision 0.29 flags its image codecs as deprecated (in favour of TorchCodec); they still work.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# sha256 of "\n".join(wnids) of https://github.com/HobbitLong/CMC/blob/master/imagenet100.txt
CMC_IMAGENET100_SHA256 = "b06db93f7ac2851ef476c162d6c4cbba17197be0269c88005add46486f682cb0"


# --------------------------------------------------------------------------- CIFAR fixtures


def _images_hwc(n: int, seed: int) -> np.ndarray:
    """Random (n, 32, 32, 3) uint8 images (HWC)."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def _python_rows(x: np.ndarray) -> np.ndarray:
    """The official python-layout rows: 3072 = R plane, G plane, B plane, each 32x32 row-major."""
    n = x.shape[0]
    rows = np.empty((n, 3072), dtype=np.uint8)
    for c in range(3):
        for r in range(32):
            rows[:, c * 1024 + r * 32 : c * 1024 + (r + 1) * 32] = x[:, r, :, c]
    return rows


def _dump(path: pathlib.Path, obj: object) -> None:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)


def _write_cifar10_python(root: pathlib.Path, x_train, y_train, x_test, y_test, names) -> pathlib.Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    per = len(x_train) // 5
    for b in range(5):
        sl = slice(b * per, (b + 1) * per)
        _dump(folder / f"data_batch_{b + 1}",
              {b"batch_label": b"training batch", b"labels": [int(v) for v in y_train[sl]],
               b"data": _python_rows(x_train[sl]), b"filenames": [b"x.png"] * per})
    _dump(folder / "test_batch", {b"labels": [int(v) for v in y_test], b"data": _python_rows(x_test)})
    _dump(folder / "batches.meta", {b"label_names": [n.encode() for n in names], b"num_vis": 3072})
    return folder


def _write_cifar100_python(root: pathlib.Path, x_train, y_train, x_test, y_test, names) -> pathlib.Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    _dump(folder / "train", {b"fine_labels": [int(v) for v in y_train], b"coarse_labels": [0] * len(y_train),
                             b"data": _python_rows(x_train)})
    _dump(folder / "test", {b"fine_labels": [int(v) for v in y_test], b"coarse_labels": [0] * len(y_test),
                            b"data": _python_rows(x_test)})
    _dump(folder / "meta", {b"fine_label_names": [n.encode() for n in names],
                            b"coarse_label_names": [b"c"] * 20})
    return folder


def _py2_str(b: bytes) -> bytes:
    """A Python-2 ``str`` as cPickle writes it (SHORT_BINSTRING / BINSTRING)."""
    return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b


def _py2_int(v: int) -> bytes:
    return b"K" + bytes([v]) if v < 256 else b"M" + struct.pack("<H", v) if v < 65536 else b"J" + struct.pack("<i", v)


def _py2_pickle(d: dict[bytes, object]) -> bytes:
    """Protocol-2 bytes of ``d`` as Python 2 + numpy 1.x wrote the official CIFAR files: str keys and strings,
    int lists, and uint8 ``(N, 3072)`` arrays rebuilt by ``numpy.core.multiarray._reconstruct`` from a str."""

    def value(v: object) -> bytes:
        if isinstance(v, int):
            return _py2_int(v)
        if isinstance(v, bytes):
            return _py2_str(v)
        if isinstance(v, list):
            return b"](" + b"".join(value(x) for x in v) + b"e"
        a = np.ascontiguousarray(v, dtype=np.uint8)
        return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + _py2_int(0) + b"\x85" + _py2_str(b"b")
                + b"\x87R(" + _py2_int(1) + _py2_int(a.shape[0]) + _py2_int(a.shape[1]) + b"\x86cnumpy\ndtype\n"
                + _py2_str(b"u1") + _py2_int(0) + _py2_int(1) + b"\x87R(" + _py2_int(3) + _py2_str(b"|") + b"NNN"
                + b"J\xff\xff\xff\xff" * 2 + _py2_int(0) + b"tb\x89" + _py2_str(a.tobytes()) + b"tb")

    return b"\x80\x02}(" + b"".join(_py2_str(k) + value(v) for k, v in d.items()) + b"u."


def test_py2_pickle_helper_reads_back():
    rows = _python_rows(_images_hwc(2, 9))
    d = pickle.loads(_py2_pickle({b"data": rows, b"fine_labels": [3, 300]}), encoding="latin1")
    assert sorted(d) == ["data", "fine_labels"] and d["fine_labels"] == [3, 300]
    assert d["data"].dtype == np.uint8 and np.array_equal(d["data"], rows)


def test_cifar100_python_layout_as_python2_wrote_it(tmp_path):
    x_train, x_test = _images_hwc(5, 11), _images_hwc(2, 12)
    y_train, y_test = [4, 99, 0, 4, 57], [99, 1]
    names = [f"class{i:02d}".encode() for i in range(100)]
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        (folder / split).write_bytes(_py2_pickle({
            b"filenames": [b"x_s_000001.png"] * len(y), b"batch_label": b"training batch 1 of 1",
            b"fine_labels": y, b"coarse_labels": [0] * len(y), b"data": _python_rows(x)}))
    (folder / "meta").write_bytes(_py2_pickle({b"fine_label_names": names, b"coarse_label_names": [b"c"] * 20}))
    d = load_dataset("cifar100", tmp_path)
    assert torch.equal(d.train.images, _chw(x_train)) and torch.equal(d.test.images, _chw(x_test))
    assert d.train.targets.tolist() == y_train and d.test.targets.tolist() == y_test
    assert d.class_names == [n.decode() for n in names]


@pytest.fixture()
def cifar10_arrays():
    x_train, x_test = _images_hwc(15, 0), _images_hwc(4, 1)
    y_train = np.array([6, 9, 9, 4, 1, 1, 2, 7, 8, 3, 4, 7, 7, 2, 0], dtype=np.int64)
    y_test = np.array([3, 8, 8, 0], dtype=np.int64)
    return x_train, y_train, x_test, y_test


def _npz_dict(x_train, y_train, x_test, y_test, names) -> dict[str, np.ndarray]:
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test,
            "class_names": np.array(names)}


def _write_npz(path: pathlib.Path, **arrays: np.ndarray) -> pathlib.Path:
    np.savez(path, **arrays)
    return path


def _chw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2)


# --------------------------------------------------------------------------- root / names


def test_resolve_root_explicit_env_and_errors(tmp_path, monkeypatch):
    assert resolve_root(tmp_path) == tmp_path.resolve()
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert resolve_root(None) == tmp_path.resolve()
    monkeypatch.delenv(ENV_VAR)
    with pytest.raises(DataError, match=r"data\.root.*STREAMING_SSL_DATA"):
        resolve_root(None)
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=re.escape(str(missing)) + r".*does not exist.*STREAMING_SSL_DATA"):
        resolve_root(missing)
    monkeypatch.setenv(ENV_VAR, str(missing))
    with pytest.raises(DataError, match=r"\$STREAMING_SSL_DATA.*does not exist"):
        resolve_root(None)
    assert resolve_root(missing, create=True) == missing.resolve() and missing.is_dir()


def test_unknown_name_suggests_closest(tmp_path):
    with pytest.raises(DataError, match=r"dataset: unknown value 'cifar1O'\. Did you mean 'cifar10'\? Valid: cifar10, "
                                        r"cifar100, tinyimagenet, imagenet100, .*folder:PATH.*npz:PATH"):
        load_dataset("cifar1O", tmp_path)
    with pytest.raises(DataError, match=r"Did you mean 'tinyimagenet'"):
        load_dataset("tinyimagenett", tmp_path)
    assert DATASET_NAMES == ("cifar10", "cifar100", "tinyimagenet", "imagenet100")


def test_fixed_size_datasets_reject_other_image_size(tmp_path):
    with pytest.raises(DataError, match=r"cifar10 images are 32x32; image_size=64"):
        load_dataset("cifar10", tmp_path, image_size=64)
    with pytest.raises(DataError, match=r"tinyimagenet images are 64x64"):
        load_dataset("tinyimagenet", tmp_path, image_size=32)


def test_registry_holds_the_builtin_datasets():
    assert DATASET_NAMES == tuple(DATASETS) == ("cifar10", "cifar100", "tinyimagenet", "imagenet100")
    assert [DATASETS[n].stem for n in DATASET_NAMES] == ["cifar", "cifar", "tiny", "imagenet"]
    assert [DATASETS[n].image_size for n in DATASET_NAMES] == [32, 32, 64, 224]
    assert [DATASETS[n].num_classes for n in DATASET_NAMES] == [10, 100, 200, 100]
    assert dataset_spec("CIFAR-10") is DATASETS["cifar10"] and dataset_spec("tiny-imagenet-200") is DATASETS["tinyimagenet"]
    assert dataset_spec("imagenet100", image_size=96).image_size == 96
    assert dataset_spec("imagenet100", image_size=96).stem == "imagenet"
    with pytest.raises(DataError, match=r"cifar10 images are 32x32; image_size=64"):
        dataset_spec("cifar10", image_size=64)
    assert [stem_for_size(s) for s in (8, 32, 33, 64, 65, 224)] == ["cifar", "cifar", "tiny", "tiny", "imagenet", "imagenet"]


def test_registry_spec_matches_what_the_loader_returns(tmp_path, cifar10_arrays):
    _write_cifar10_python(tmp_path, *cifar10_arrays, CIFAR10_NAMES)
    spec = dataset_spec("cifar10")
    d = spec.load(tmp_path)
    assert (d.name, d.image_size, d.mean, d.std) == (spec.name, spec.image_size, spec.mean, spec.std)
    assert d.num_classes == spec.num_classes


# --------------------------------------------------------------------------- CIFAR: loading


def test_cifar10_python_layout(tmp_path, cifar10_arrays):
    x_train, y_train, x_test, y_test = cifar10_arrays
    _write_cifar10_python(tmp_path, *cifar10_arrays, CIFAR10_NAMES)
    d = load_dataset("cifar10", tmp_path)
    assert isinstance(d, DatasetSplits) and d.name == "cifar10"
    assert d.train.images.shape == (15, 3, 32, 32) and d.test.images.shape == (4, 3, 32, 32)
    assert d.train.images.dtype == torch.uint8 and d.train.images.is_contiguous()
    assert d.train.targets.dtype == torch.int64
    # exact round trip: CHW pixel (c, r, col) == original HWC pixel (r, col, c)
    assert d.train.images[4, 0, 5, 7] == x_train[4, 5, 7, 0]
    assert d.train.images[4, 2, 31, 0] == x_train[4, 31, 0, 2]
    assert d.test.images[3, 1, 0, 30] == x_test[3, 0, 30, 1]
    assert torch.equal(d.train.images, _chw(x_train))
    assert torch.equal(d.test.images, _chw(x_test))
    assert d.train.targets.tolist() == y_train.tolist()
    assert d.test.targets.tolist() == y_test.tolist()
    assert d.class_names == CIFAR10_NAMES and d.num_classes == 10
    assert d.image_size == 32 and len(d.train) == 15
    assert d.mean == pytest.approx((0.4914, 0.4822, 0.4465)) and d.std == pytest.approx((0.2470, 0.2435, 0.2616))


def test_cifar100_python_layout(tmp_path):
    x_train, x_test = _images_hwc(6, 2), _images_hwc(3, 3)
    y_train = np.array([0, 99, 50, 7, 7, 1])
    y_test = np.array([98, 0, 3])
    names = [f"class{i:02d}" for i in range(100)]
    _write_cifar100_python(tmp_path, x_train, y_train, x_test, y_test, names)
    d = load_dataset("CIFAR100", tmp_path)
    assert d.name == "cifar100" and d.num_classes == 100 and d.class_names == names
    assert torch.equal(d.train.images, _chw(x_train)) and torch.equal(d.test.images, _chw(x_test))
    assert d.train.targets.tolist() == y_train.tolist() and d.test.targets.tolist() == y_test.tolist()
    assert d.mean == pytest.approx((0.5071, 0.4865, 0.4409))


def test_cifar10_npz_matches_python_layout(tmp_path, cifar10_arrays):
    py_root, npz_root = tmp_path / "py", tmp_path / "npz"
    npz_root.mkdir()
    _write_cifar10_python(py_root, *cifar10_arrays, CIFAR10_NAMES)
    _write_npz(npz_root / "cifar10.npz", **_npz_dict(*cifar10_arrays, CIFAR10_NAMES))
    a, b = load_dataset("cifar10", py_root), load_dataset("cifar10", npz_root)
    for split in ("train", "test"):
        sa, sb = getattr(a, split), getattr(b, split)
        assert torch.equal(sa.images, sb.images) and torch.equal(sa.targets, sb.targets)
    assert b.train.images.is_contiguous() and b.train.images.dtype == torch.uint8
    assert a.class_names == b.class_names == CIFAR10_NAMES


def test_npz_preferred_over_python_layout(tmp_path, cifar10_arrays):
    _write_cifar10_python(tmp_path, *cifar10_arrays, CIFAR10_NAMES)
    x_train, y_train, x_test, y_test = cifar10_arrays
    _write_npz(tmp_path / "cifar10.npz", **_npz_dict(255 - x_train, y_train, x_test, y_test, CIFAR10_NAMES))
    d = load_dataset("cifar10", tmp_path)
    assert torch.equal(d.train.images, _chw(255 - x_train))


def test_cifar100_npz(tmp_path):
    x, y = _images_hwc(4, 5), np.array([0, 99, 3, 3])
    names = [f"c{i}" for i in range(100)]
    _write_npz(tmp_path / "cifar100.npz", **_npz_dict(x, y, x[:2], y[:2], names))
    d = load_dataset("cifar100", tmp_path)
    assert torch.equal(d.train.images, _chw(x)) and d.test.targets.tolist() == [0, 99]
    assert d.num_classes == 100


def test_cifar_download_uses_torchvision_then_reads_python_layout(tmp_path, monkeypatch, cifar10_arrays):
    calls = []

    class FakeCIFAR10:  # stands in for torchvision's downloader (no network in tests)
        def __init__(self, root, train=True, download=False):
            calls.append((root, download))
            _write_cifar10_python(pathlib.Path(root), *cifar10_arrays, CIFAR10_NAMES)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    root = tmp_path / "new_data"
    d = load_dataset("cifar10", root, download=True)
    assert calls == [(str(root.resolve()), True)]
    assert torch.equal(d.train.images, _chw(cifar10_arrays[0]))

    class FailingCIFAR100:
        def __init__(self, root, train=True, download=False):
            raise RuntimeError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", FailingCIFAR100)
    with pytest.raises(DataError, match=r"Downloading cifar100 from https://.*failed: network unreachable"):
        load_dataset("cifar100", root, download=True)


# --------------------------------------------------------------------------- CIFAR: errors


def test_cifar_missing_lists_both_paths(tmp_path):
    msg = (re.escape(str(tmp_path / "cifar10.npz")) + r" and " + re.escape(str(tmp_path / "cifar-10-batches-py"))
           + r".*data\.download: true.*STREAMING_SSL_DATA")
    with pytest.raises(DataError, match=msg):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "cifar-100-python"))):
        load_dataset("cifar100", tmp_path)


def test_npz_truncated_or_garbage(tmp_path, cifar10_arrays):
    path = _write_npz(tmp_path / "cifar10.npz", **_npz_dict(*cifar10_arrays, CIFAR10_NAMES))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cifar10\.npz is truncated or corrupted.*delete it to fall back to.*cifar-10-batches-py"):
        load_dataset("cifar10", tmp_path)
    path.write_bytes(b"this is not a zip file at all" * 10)
    with pytest.raises(DataError, match=r"cifar10\.npz is not an \.npz \(zip\) file; save the arrays with "
                                        r"numpy\.savez.*delete it to fall back to"):
        load_dataset("cifar10", tmp_path)


def test_npz_corrupted_payload(tmp_path, cifar10_arrays):
    path = _write_npz(tmp_path / "cifar10.npz", **_npz_dict(*cifar10_arrays, CIFAR10_NAMES))
    data = bytearray(path.read_bytes())
    start = data.index(b"x_train.npy") + 500  # inside the stored x_train payload
    data[start : start + 64] = bytes(255 - v for v in data[start : start + 64])
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"is truncated or corrupted"):
        load_dataset("cifar10", tmp_path)


def test_npz_missing_key(tmp_path, cifar10_arrays):
    arrays = _npz_dict(*cifar10_arrays, CIFAR10_NAMES)
    del arrays["y_test"]
    _write_npz(tmp_path / "cifar10.npz", **arrays)
    with pytest.raises(DataError, match=r"lacks the key\(s\) y_test"):
        load_dataset("cifar10", tmp_path)


def test_npz_float_images_and_nan(tmp_path, cifar10_arrays):
    x_train, y_train, x_test, y_test = cifar10_arrays
    xf = x_train.astype(np.float32) / 255
    _write_npz(tmp_path / "cifar10.npz", **_npz_dict(xf, y_train, x_test, y_test, CIFAR10_NAMES))
    with pytest.raises(DataError, match=r"key x_train has dtype float32; images must be uint8"):
        load_dataset("cifar10", tmp_path)
    xf[2, 3, 4, 1] = np.nan
    _write_npz(tmp_path / "cifar10.npz", **_npz_dict(xf, y_train, x_test, y_test, CIFAR10_NAMES))
    with pytest.raises(DataError, match=r"key x_train contains NaN"):
        load_dataset("cifar10", tmp_path)


def test_npz_wrong_shape(tmp_path, cifar10_arrays):
    x_train, y_train, x_test, y_test = cifar10_arrays
    chw = np.ascontiguousarray(x_train.transpose(0, 3, 1, 2))
    _write_npz(tmp_path / "cifar10.npz", **_npz_dict(chw, y_train, x_test, y_test, CIFAR10_NAMES))
    with pytest.raises(DataError, match=r"x_train has shape \(15, 3, 32, 32\); expected \(N, 32, 32, 3\)"):
        load_dataset("cifar10", tmp_path)


def test_npz_label_problems(tmp_path, cifar10_arrays):
    x_train, y_train, x_test, y_test = cifar10_arrays
    _write_npz(tmp_path / "cifar10.npz", **_npz_dict(x_train, y_train[:-1], x_test, y_test, CIFAR10_NAMES))
    with pytest.raises(DataError, match=r"y_train has 14 labels but there are 15 images"):
        load_dataset("cifar10", tmp_path)
    bad = y_test.copy()
    bad[1] = 10
    _write_npz(tmp_path / "cifar10.npz", **_npz_dict(x_train, y_train, x_test, bad, CIFAR10_NAMES))
    with pytest.raises(DataError, match=r"y_test has labels out of range \[0, 10\]; expected 0\.\.9"):
        load_dataset("cifar10", tmp_path)
    _write_npz(tmp_path / "cifar10.npz", **_npz_dict(x_train, y_train, x_test, y_test, CIFAR10_NAMES[:9]))
    with pytest.raises(DataError, match=r"class_names lists 9 class names; expected 10"):
        load_dataset("cifar10", tmp_path)


def test_npz_object_array_is_refused(tmp_path, cifar10_arrays):
    arrays = _npz_dict(*cifar10_arrays, CIFAR10_NAMES)
    arrays["class_names"] = np.array(CIFAR10_NAMES, dtype=object)
    _write_npz(tmp_path / "cifar10.npz", **arrays)
    with pytest.raises(DataError, match=r"object arrays"):
        load_dataset("cifar10", tmp_path)


def test_python_batch_wrong_shape_and_missing_file(tmp_path, cifar10_arrays):
    folder = _write_cifar10_python(tmp_path, *cifar10_arrays, CIFAR10_NAMES)
    _dump(folder / "data_batch_2", {b"labels": [0, 1, 2], b"data": np.zeros((3, 1024), np.uint8)})
    with pytest.raises(DataError, match=r"data_batch_2: 'data' has shape \(3, 1024\).*expected \(N, 3072\) uint8"):
        load_dataset("cifar10", tmp_path)
    (folder / "data_batch_2").unlink()
    with pytest.raises(DataError, match=re.escape(str(folder / "data_batch_2")) + r" is missing.*data\.download: true"):
        load_dataset("cifar10", tmp_path)


def test_python_batch_truncated_and_label_mismatch(tmp_path, cifar10_arrays):
    folder = _write_cifar10_python(tmp_path, *cifar10_arrays, CIFAR10_NAMES)
    raw = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(raw[:100])
    with pytest.raises(DataError, match=r"test_batch is truncated or corrupted"):
        load_dataset("cifar10", tmp_path)
    _dump(folder / "test_batch", {b"labels": [1], b"data": _python_rows(cifar10_arrays[2])})
    with pytest.raises(DataError, match=r"test_batch key 'labels' has 1 labels but there are 4 images"):
        load_dataset("cifar10", tmp_path)


def _damaged_copies(raw: bytes, n: int, seed: int, region: int):
    """n copies of `raw`, each with 1, 2 or 4 bytes overwritten: half in the first `region` bytes, where the
    structure lives (pickle opcodes and lengths, zip headers, the .npy header), half anywhere."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        damaged = bytearray(raw)
        for _ in range(int(rng.choice([1, 2, 4]))):
            where = int(rng.integers(0, region if rng.random() < 0.5 else len(raw)))
            damaged[where] = int(rng.integers(0, 256))
        yield bytes(damaged)


@pytest.mark.parametrize("name", ["test_batch", "batches.meta"])
def test_any_damage_to_a_cifar_batch_is_a_data_error(tmp_path, cifar10_arrays, name):
    """A damaged pickle raises many types (LookupError for a garbled codec name, MemoryError for a length that
    asks too much, OverflowError, ...), and one that still unpickles may hold lists numpy cannot make an array of:
    each must come out of the loader as the DataError that names the file and the fix."""
    folder = _write_cifar10_python(tmp_path, *cifar10_arrays, CIFAR10_NAMES)
    path = folder / name
    raw = path.read_bytes()
    loaded = 0
    for damaged in _damaged_copies(raw, 1000, seed=0, region=300):
        path.write_bytes(damaged)
        try:
            load_dataset("cifar10", tmp_path)
            loaded += 1  # a byte of pixels or of a name changed: still a valid file
        except DataError as err:
            assert str(path) in str(err) and str(err).rstrip().endswith(("set data.download: true to fetch it again.",
                                                                          "Re-create the file.", "Re-create it.")), err
    assert loaded < 1000


_LOAD_UNDER_A_MEMORY_CAP = """
import json, resource, sys
from scenarios import datasets as ds
size = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + 2**30, resource.RLIM_INFINITY))  # 1 GiB above what imports took
out = {}
for path in sys.argv[1:]:
    try:
        loaded = ds._unpickle(__import__("pathlib").Path(path), "the fix")
        out[path] = {"data": loaded["data"].tolist(), "labels": list(loaded["labels"])}
    except ds.DataError as err:
        out[path] = {"error": str(err)}
print(json.dumps(out))
"""


def test_damaged_lengths_in_a_cifar_batch_cost_no_memory(tmp_path, cifar10_arrays):
    """One damaged byte can make a memo index 1.5 billion (Python's C unpickler then sizes its memo array to it:
    12 GB of zeros, and the kernel killed the process here) or a BYTEARRAY8 length 14 GB (pickle's own loader
    zero-fills that much before reading: seen in the fuzz test). Loaded in a process capped at 1 GiB above what its
    imports took: the first batch loads as if undamaged (the index is a dict key), the second is a DataError."""
    import json
    import pickletools
    import subprocess
    import sys

    folder = _write_cifar10_python(tmp_path, *cifar10_arrays, CIFAR10_NAMES)
    raw = (folder / "test_batch").read_bytes()
    at = next(pos for op, _, pos in pickletools.genops(raw) if op.name == "BINPUT")  # 2 bytes: q and the index
    memo = tmp_path / "memo_index"
    memo.write_bytes(raw[:at] + b"r" + struct.pack("<I", 1_500_000_000) + raw[at + 2:])  # LONG_BINPUT 1.5e9
    long = tmp_path / "bytearray_length"
    long.write_bytes(raw[:at] + b"\x96" + struct.pack("<Q", 14 * 2**30) + raw[at + 2:])  # BYTEARRAY8 of 14 GB
    proc = subprocess.run([sys.executable, "-c", _LOAD_UNDER_A_MEMORY_CAP, str(memo), str(long)], capture_output=True,
                          text=True, timeout=120, cwd=pathlib.Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out[str(memo)]["data"] == _python_rows(cifar10_arrays[2]).tolist()
    assert out[str(memo)]["labels"] == list(cifar10_arrays[3])
    assert out[str(long)]["error"].startswith(f"CIFAR file {long} is truncated or corrupted (UnpicklingError: pickle "
                                              "data was truncated")


def test_any_damage_to_an_npz_is_a_data_error(tmp_path, cifar10_arrays):
    """The same for .npz, stored and compressed: TokenError or SyntaxError from a garbled .npy header,
    MemoryError from a shape that asks too much, BadZipFile, zlib.error..."""
    x_train, y_train = cifar10_arrays[0], cifar10_arrays[1]
    for save in (np.savez, np.savez_compressed):
        path = tmp_path / f"{save.__name__}.npz"
        save(path, x_train=x_train, y_train=y_train)
        raw = path.read_bytes()
        for damaged in _damaged_copies(raw, 600, seed=1, region=300):
            path.write_bytes(damaged)
            try:
                ds.read_npz_arrays(path, ["x_train", "y_train"], fix="the fix")
            except DataError as err:
                assert str(err).startswith(f"{path} ") and str(err).endswith("the fix"), err


def test_python_batch_refuses_arbitrary_globals(tmp_path, cifar10_arrays):
    folder = _write_cifar10_python(tmp_path, *cifar10_arrays, CIFAR10_NAMES)
    _dump(folder / "batches.meta", {b"label_names": os.system})
    with pytest.raises(DataError, match=r"batches\.meta is truncated or corrupted.*not allowed"):
        load_dataset("cifar10", tmp_path)


# --------------------------------------------------------------------------- containers


def test_image_data_subset_and_length_check():
    images = torch.arange(5 * 3 * 2 * 2, dtype=torch.uint8).reshape(5, 3, 2, 2)
    data = ImageData(images, torch.tensor([0, 1, 2, 3, 4]))
    sub = data.subset(torch.tensor([4, 1]))
    assert len(sub) == 2 and torch.equal(sub.images, images[[4, 1]]) and sub.targets.tolist() == [4, 1]
    with pytest.raises(DataError, match=r"5 images but 4 targets"):
        ImageData(images, torch.tensor([0, 1, 2, 3]))


# --------------------------------------------------------------------------- Tiny ImageNet

TINY_WNIDS = ["n09999999", "n01443537", "n02000000"]  # deliberately not sorted


def _solid(color: tuple[int, int, int], h: int, w: int) -> torch.Tensor:
    return torch.tensor(color, dtype=torch.uint8).view(3, 1, 1).expand(3, h, w).contiguous()


def _write_jpeg(path: pathlib.Path, img: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(str(path), encode_jpeg(img, quality=95))


def _write_png(path: pathlib.Path, img: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(str(path), encode_png(img))


def _tiny_color(cls: int, k: int) -> tuple[int, int, int]:
    return (40 + 80 * cls, 200 - 60 * k, 90)


def _make_tiny(root: pathlib.Path, words: bool = True) -> pathlib.Path:
    folder = root / "tiny-imagenet-200"
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    if words:
        (folder / "words.txt").write_text(
            "n01443537\tgoldfish, Carassius auratus\nn09999999\tthing\nn02000000\tgadget, gizmo\nn00000001\tunused\n")
    for c, wnid in enumerate(TINY_WNIDS):
        for k in range(2):
            _write_jpeg(folder / "train" / wnid / "images" / f"{wnid}_{k}.JPEG", _solid(_tiny_color(c, k), 64, 64))
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    gray = torch.full((1, 64, 64), 120, dtype=torch.uint8)
    gray[:, :32] = 30
    _write_jpeg(folder / "val" / "images" / "val_0.JPEG", gray)
    _write_jpeg(folder / "val" / "images" / "val_1.JPEG", _solid((250, 10, 10), 64, 64))
    _write_jpeg(folder / "val" / "images" / "val_2.JPEG", _solid((10, 10, 250), 64, 64))
    (folder / "val" / "val_annotations.txt").write_text(
        "val_0.JPEG\tn02000000\t0\t0\t63\t63\n"
        "val_1.JPEG\tn09999999\t1\t2\t30\t40\n"
        "val_2.JPEG\tn01443537\t0\t0\t10\t10\n")
    return folder


def test_tiny_imagenet_layout_and_cache(tmp_path):
    folder = _make_tiny(tmp_path)
    d = load_dataset("tinyimagenet", tmp_path)
    assert d.name == "tinyimagenet" and d.image_size == 64 and d.num_classes == 3
    assert d.class_names == ["thing", "goldfish", "gadget"]  # wnids.txt order, first synonym
    assert d.train.images.shape == (6, 3, 64, 64) and d.train.images.dtype == torch.uint8
    assert d.train.targets.tolist() == [0, 0, 1, 1, 2, 2]
    for i, (c, k) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]):
        mean = d.train.images[i].float().mean(dim=(1, 2))
        assert torch.allclose(mean, torch.tensor(_tiny_color(c, k), dtype=torch.float32), atol=4)
    assert d.test.targets.tolist() == [2, 0, 1]  # from val_annotations.txt
    gray = d.test.images[0]
    assert gray.shape == (3, 64, 64) and torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert abs(int(gray[0, 10, 5]) - 30) <= 4 and abs(int(gray[0, 50, 5]) - 120) <= 4
    assert torch.equal(d.test.images[1], decode_image(str(folder / "val/images/val_1.JPEG"), mode=ImageReadMode.RGB))
    assert d.mean == pytest.approx((0.485, 0.456, 0.406))

    cache = folder / ".streaming_ssl_cache.pt"
    assert cache.is_file()
    # the second load reads the cache: an image replaced in place (same file count) is not re-decoded
    _write_jpeg(folder / "train" / TINY_WNIDS[0] / "images" / f"{TINY_WNIDS[0]}_0.JPEG", _solid((0, 0, 0), 64, 64))
    d2 = load_dataset("tinyimagenet", tmp_path)
    assert torch.equal(d2.train.images, d.train.images) and torch.equal(d2.test.images, d.test.images)
    assert torch.equal(d2.train.targets, d.train.targets) and d2.class_names == d.class_names

    # a changed number of files invalidates the cache
    _write_jpeg(folder / "train" / TINY_WNIDS[2] / "images" / "extra.JPEG", _solid((1, 2, 3), 64, 64))
    d3 = load_dataset("tinyimagenet", tmp_path)
    assert d3.train.targets.tolist() == [0, 0, 1, 1, 2, 2, 2]
    assert int(d3.train.images[0].float().mean()) < 5  # re-decoded: sees the replaced black image


def test_tiny_imagenet_unusable_cache(tmp_path, caplog):
    folder = _make_tiny(tmp_path, words=False)
    (folder / ".streaming_ssl_cache.pt").write_bytes(b"garbage")
    with caplog.at_level(logging.INFO, logger="scenarios.datasets"):
        d = load_dataset("tinyimagenet", tmp_path)
    assert "ignoring unreadable cache" in caplog.text
    assert d.class_names == TINY_WNIDS  # no words.txt: wnids are the names
    # cache path not writable (here: a folder is in the way): loading still works, quietly
    (folder / ".streaming_ssl_cache.pt").unlink()
    (folder / ".streaming_ssl_cache.pt").mkdir()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="scenarios.datasets"):
        d2 = load_dataset("tinyimagenet", tmp_path)
    assert "not caching" in caplog.text
    assert torch.equal(d2.train.images, d.train.images)
    assert not list(folder.glob("*.tmp*"))


def test_tiny_imagenet_errors(tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "tiny-imagenet-200")) + r".*tiny-imagenet-200\.zip"):
        load_dataset("tinyimagenet", tmp_path)
    folder = _make_tiny(tmp_path)
    ann = folder / "val" / "val_annotations.txt"
    text = ann.read_text()
    ann.unlink()
    with pytest.raises(DataError, match=re.escape(str(ann)) + r" is missing"):
        load_dataset("tinyimagenet", tmp_path)
    ann.write_text(text + "val_2.JPEG\tn07777777\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match=r"line 4 names wnid 'n07777777', which is not in .*wnids\.txt"):
        load_dataset("tinyimagenet", tmp_path)
    ann.write_text(text)
    (folder / "wnids.txt").unlink()
    with pytest.raises(DataError, match=re.escape(str(folder / "wnids.txt")) + r" is missing"):
        load_dataset("tinyimagenet", tmp_path)


def test_tiny_imagenet_corrupt_jpeg(tmp_path):
    folder = _make_tiny(tmp_path)
    bad = folder / "val" / "images" / "val_2.JPEG"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match=r"Cannot decode image .*val_2\.JPEG"):
        load_dataset("tinyimagenet", tmp_path)


# --------------------------------------------------------------------------- ImageNet-100


def _in_color(cls: int) -> tuple[int, int, int]:
    return (2 * cls + 1, 255 - cls, 7)


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory) -> pathlib.Path:
    """ROOT/imagenet/{train,val}/<wnid>/ for the 100 classes: 1 val + 1-2 train images each."""
    root = tmp_path_factory.mktemp("in100")
    wnids = ds.imagenet100_classes()
    exts = [".JPEG", ".png", ".jpg", ".jpeg"]
    for c, wnid in enumerate(wnids):
        h, w = [(12, 12), (10, 20), (24, 9), (8, 8)][c % 4]
        for split in ("train", "val"):
            ext = exts[c % 4] if split == "train" else ".png"
            path = root / "imagenet" / split / wnid / f"{wnid}_{split}{ext}"
            img = _solid(_in_color(c), h, w)
            (_write_jpeg if ext.lower() in (".jpeg", ".jpg") else _write_png)(path, img)
        (root / "imagenet" / "train" / wnid / "notes.txt").write_text("not an image")
    # class 0 gets two structured images: wide (red | green | blue columns) and tall (rows)
    wide = torch.zeros(3, 16, 64, dtype=torch.uint8)
    wide[0, :, :16], wide[1, :, 16:48], wide[2, :, 48:] = 255, 255, 255
    tall = torch.zeros(3, 64, 16, dtype=torch.uint8)
    tall[0, :16], tall[1, 16:48], tall[2, 48:] = 255, 255, 255
    _write_png(root / "imagenet" / "train" / wnids[0] / "z_wide.png", wide)
    _write_png(root / "imagenet" / "train" / wnids[0] / "z_tall.PNG", tall)
    return root


def test_imagenet100_loads_with_labels_and_center_crop(imagenet_root):
    d = load_dataset("imagenet100", imagenet_root, image_size=8)
    wnids = ds.imagenet100_classes()
    assert len(wnids) == 100 and wnids[0] == "n02869837"
    assert d.name == "imagenet100" and d.num_classes == 100 and d.class_names == wnids and d.image_size == 8
    assert d.mean == pytest.approx((0.485, 0.456, 0.406)) and d.std == pytest.approx((0.229, 0.224, 0.225))
    assert isinstance(d.train.images, LazyImageFolder) and isinstance(d.test.images, LazyImageFolder)
    assert len(d.train) == 102 and len(d.test) == 100
    assert d.train.targets.tolist() == [0, 0, 0] + list(range(1, 100))
    assert d.test.targets.tolist() == list(range(100))
    batch = d.test.images[torch.arange(100)]
    assert batch.shape == (100, 3, 8, 8) and batch.dtype == torch.uint8
    for i in range(100):  # PNG: lossless, resized solid colours stay exact
        expect = torch.tensor(_in_color(int(d.test.targets[i])), dtype=torch.uint8).view(3, 1, 1).expand(3, 8, 8)
        assert torch.equal(batch[i], expect), i
    train = d.train.images[torch.arange(len(d.train))]
    assert train.shape == (102, 3, 8, 8)
    for i in range(3, 102):  # JPEG-encoded ones are within a few levels
        expect = torch.tensor(_in_color(int(d.train.targets[i])), dtype=torch.int16).view(3, 1, 1)
        assert (train[i].to(torch.int16) - expect).abs().max() <= 6, i
    # rows 1, 2 of class 0 are the tall (z_tall.PNG) and wide (z_wide.png) images: the center crop is green
    green = torch.tensor([0, 255, 0], dtype=torch.int16).view(3, 1, 1)
    assert (train[1].to(torch.int16) - green).abs().max() <= 1
    assert (train[2].to(torch.int16) - green).abs().max() <= 1
    assert torch.equal(d.train.images[2], train[2])  # int indexing -> one (3, S, S) image


def test_imagenet100_lazy_view_pickle_and_default_size(imagenet_root):
    d = load_dataset("imagenet100", imagenet_root, image_size=8)
    sub = d.test.subset(torch.tensor([5, 42, 7]))
    assert isinstance(sub.images, LazyImageFolder) and len(sub) == 3 and sub.targets.tolist() == [5, 42, 7]
    assert torch.equal(sub.images[torch.arange(3)], d.test.images[torch.tensor([5, 42, 7])])
    clone = pickle.loads(pickle.dumps(sub.images))
    assert torch.equal(clone[torch.tensor([2, 0])], sub.images[torch.tensor([2, 0])])
    assert sub.images.shape == (3, 3, 8, 8) and sub.images[torch.tensor([], dtype=torch.long)].shape == (0, 3, 8, 8)
    with pytest.raises(IndexError):
        sub.images[torch.tensor([3])]
    big = load_dataset("imagenet100", imagenet_root)
    assert big.image_size == 224 and big.test.images[torch.tensor([0])].shape == (1, 3, 224, 224)


def test_imagenet100_spec_of_a_size_loads_that_size(imagenet_root):
    spec = dataset_spec("imagenet100", image_size=8)
    d = spec.load(imagenet_root)  # no image_size: the spec's own, as DatasetSpec.image_size promises
    assert d.image_size == spec.image_size == 8
    assert d.test.images[torch.tensor([0])].shape == (1, 3, 8, 8)
    assert spec.load(imagenet_root, image_size=4).image_size == 4  # an explicit size still wins


def test_generic_spec_of_a_size_loads_that_size(tmp_path, cifar10_arrays):
    x_train, _, x_test, _ = cifar10_arrays
    y_train, y_test = np.arange(15) % 3, np.array([0, 1, 2, 0])
    path = _write_npz(tmp_path / "digits.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    spec = dataset_spec(f"npz:{path}", image_size=16)
    d = spec.load()
    assert d.image_size == spec.image_size == 16 and d.train.images.shape == (15, 3, 16, 16)
    assert dataset_spec(f"npz:{path}").load().image_size == 32


def test_imagenet100_class_list_is_the_cmc_list():
    wnids = ds.imagenet100_classes()
    assert len(wnids) == len(set(wnids)) == 100 and all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    # CMC's imagenet100.txt (Tian et al.), in its order: the list solo-learn and later work use
    assert wnids[:5] == ["n02869837", "n01749939", "n02488291", "n02107142", "n13037406"]
    assert wnids[-5:] == ["n02116738", "n02108089", "n03424325", "n01855672", "n02090622"]
    assert hashlib.sha256("\n".join(wnids).encode()).hexdigest() == CMC_IMAGENET100_SHA256


def test_imagenet100_prefers_imagenet100_folder(tmp_path, imagenet_root):
    (tmp_path / "imagenet").mkdir()  # would fail: no class folders
    (tmp_path / "imagenet100").symlink_to(imagenet_root / "imagenet")
    d = load_dataset("imagenet100", tmp_path, image_size=4)
    assert len(d.test) == 100


def test_imagenet100_errors(tmp_path, imagenet_root):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "imagenet100")) + r"/ and "
                       + re.escape(str(tmp_path / "imagenet")) + r"/.*STREAMING_SSL_DATA"):
        load_dataset("imagenet100", tmp_path)
    wnids = ds.imagenet100_classes()
    shutil.copytree(imagenet_root / "imagenet", tmp_path / "imagenet")
    for w in (wnids[3], wnids[10], wnids[50]):
        shutil.rmtree(tmp_path / "imagenet" / "val" / w)
    val = re.escape(str(tmp_path / "imagenet" / "val"))
    with pytest.raises(DataError, match=rf"3 of 100 class folders are missing in {val}/ \(first: {wnids[3]}, {wnids[10]}, {wnids[50]}\)"):
        load_dataset("imagenet100", tmp_path, image_size=8)
    for w in (wnids[3], wnids[10], wnids[50]):
        (tmp_path / "imagenet" / "val" / w).mkdir()
    with pytest.raises(DataError, match=rf"class folder {val}/{wnids[3]}/ holds no image"):
        load_dataset("imagenet100", tmp_path, image_size=8)
    # val/ as ILSVRC2012_img_val.tar extracts it: every image flat in one folder
    shutil.rmtree(tmp_path / "imagenet" / "val")
    (tmp_path / "imagenet" / "val").mkdir()
    for i in (1, 2):
        shutil.copy(next((imagenet_root / "imagenet" / "val" / wnids[0]).iterdir()),
                    tmp_path / "imagenet" / "val" / f"ILSVRC2012_val_{i:08d}.JPEG")
    with pytest.raises(DataError, match=r"100 of 100 class folders are missing.*holds the images flat.*valprep\.sh"):
        load_dataset("imagenet100", tmp_path, image_size=8)
    shutil.rmtree(tmp_path / "imagenet" / "val")
    with pytest.raises(DataError, match=rf"{val}/ is missing"):
        load_dataset("imagenet100", tmp_path, image_size=8)


def test_lazy_folder_corrupt_image(tmp_path):
    bad = tmp_path / "bad.JPEG"
    bad.write_bytes(b"nope")
    folder = LazyImageFolder([bad], image_size=8)
    with pytest.raises(DataError, match=r"Cannot decode image .*bad\.JPEG"):
        folder[torch.tensor([0])]


# --------------------------------------------------------------------------- the real file


def test_real_cifar10_npz_if_present():
    root = os.environ.get(ENV_VAR, "")
    if not root or not (pathlib.Path(root) / "cifar10.npz").is_file():
        pytest.skip(f"${ENV_VAR}/cifar10.npz not present")
    d = load_dataset("cifar10", root)
    assert d.train.images.shape == (50000, 3, 32, 32) and d.test.images.shape == (10000, 3, 32, 32)
    assert d.train.images[0, 0, 0, :4].tolist() == [59, 43, 50, 68]
    assert d.train.images[0, :, 0, 0].tolist() == [59, 62, 63]
    assert d.train.targets[:5].tolist() == [6, 9, 9, 4, 1]
    assert d.test.targets[:5].tolist() == [3, 8, 8, 0, 6]
    assert d.class_names == CIFAR10_NAMES
