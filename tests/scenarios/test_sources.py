"""Tests for scenarios.sources: any image folder (folder:PATH) or .npz (npz:PATH) as a dataset.

Fixtures are written through real encoders (torchvision.io encode_png / encode_jpeg): PNG and JPEG,
grayscale and RGB, several sizes, an .npz with HWC RGB images and one with NHW grayscale images.
"""

from __future__ import annotations

import json
import logging
import pathlib
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import encode_png, write_file

from scenarios import sources
from scenarios.datasets import (
    DataError,
    LazyImageFolder,
    _resize_center_crop,
    dataset_spec,
    load_dataset,
)
from scenarios.streams import build_stream
from streaming_ssl.augment import MultiPatchAugment
from streaming_ssl.config import ConfigError, config_from_dict, load_config, save_config
from tests.conftest import class_image, write_jpeg, write_png

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)

CLASSES = ["zebra", "ant", "moth"]  # written in this order; ids follow the sorted names: ant 0, moth 1, zebra 2


def gray_png(path: pathlib.Path, img: torch.Tensor) -> None:
    """Write a one-channel PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(str(path), encode_png(img))


def make_folder(root: pathlib.Path, *, test_name: str = "test", size: int = 12, per_class: int = 3) -> dict:
    """ROOT/train/<class>/ and ROOT/<test_name>/<class>/ with lossless PNGs of one size; returns the pixels.

    The first training image of class 'moth' is a grayscale PNG; the rest are RGB.
    """
    pixels: dict[str, torch.Tensor] = {}
    for c, name in enumerate(CLASSES):
        for split, n in (("train", per_class), (test_name, 1)):
            for k in range(n):
                img = class_image(c, k + (100 if split != "train" else 0), size, size, seed=5)
                path = root / split / name / f"{name}_{k}.png"
                if name == "moth" and split == "train" and k == 0:
                    img = img[:1]
                    gray_png(path, img)
                else:
                    write_png(path, img)
                pixels[str(path)] = img
    return pixels


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Keep the statistics cache of every test in its own folder."""
    monkeypatch.setenv(sources.CACHE_ENV_VAR, str(tmp_path / "cache"))


# --------------------------------------------------------------------------- names and the registry


def test_names_parse_and_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sources.parse_source("folder:/data/svhn/").path == pathlib.Path("/data/svhn")
    assert sources.parse_source("folder:/data/svhn/").name == "svhn"
    assert sources.parse_source("npz:/data/digits.npz").name == "digits"
    assert sources.parse_source("npz:sub/d.npz").path == tmp_path / "sub" / "d.npz"
    assert sources.parse_source("NPZ:~/d.npz").path == pathlib.Path.home() / "d.npz"
    assert sources.is_generic("folder:x") and not sources.is_generic("cifar10") and not sources.is_generic("foldr:x")
    with pytest.raises(DataError, match=r"'folder:' names no path; write folder:PATH"):
        sources.parse_source("folder:")


def test_config_reads_the_registry(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.dataset=folder:/data/svhn/", "eval.transfer=[cifar100, NPZ:rel/d.npz, Cifar10]"])
    assert cfg.data.dataset == "folder:/data/svhn"  # generic paths absolute and normalised, kind in lower case
    assert cfg.eval.transfer == ["cifar100", f"npz:{tmp_path / 'rel' / 'd.npz'}", "Cifar10"]  # built-ins as written
    with pytest.raises(ConfigError, match=r"^data\.dataset: unknown value 'tinyimagnet'\. Did you mean 'tinyimagenet'\?"
                                          r".*folder:PATH.*npz:PATH"):
        load_config(None, ["data.dataset=tinyimagnet"])
    with pytest.raises(ConfigError, match=r"^eval\.transfer\[1\]: unknown value 'foldr:/x'\..*folder:PATH.*npz:PATH"):
        load_config(None, ["eval.transfer=[cifar10, 'foldr:/x']"])
    with pytest.raises(ConfigError, match=r"^eval\.transfer\[0\]: 'npz:' names no path"):
        load_config(None, ["eval.transfer=['npz:']"])


def test_relative_sources_are_saved_absolute(tmp_path, monkeypatch):
    """A run's config.yaml (and checkpoint config) names the data given relative to where the run started."""
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    make_folder(here / "data" / "shapes")
    make_folder(elsewhere / "data" / "shapes", size=6)  # the same relative path from another directory: other data
    x = np.zeros((2, 4, 4), dtype=np.uint8)
    save_npz(here / "d.npz", x_train=x, y_train=np.array([0, 1]), x_test=x, y_test=np.array([1, 0]))
    monkeypatch.chdir(here)
    cfg = load_config(None, ["data.dataset=folder:data/shapes", "eval.transfer=[npz:./d.npz, cifar10]"])
    saved = tmp_path / "config.yaml"
    save_config(cfg, saved)  # what the training CLI writes
    monkeypatch.chdir(elsewhere)
    for again in (load_config(saved), config_from_dict(cfg.to_dict())):
        assert again.data.dataset == f"folder:{here / 'data' / 'shapes'}"
        assert again.eval.transfer == [f"npz:{here / 'd.npz'}", "cifar10"]
    d = load_dataset(load_config(saved).data.dataset)
    assert d.image_size == 12 and d.name == "shapes"  # the folder of the run, not elsewhere/data/shapes (6x6)


# --------------------------------------------------------------------------- image folders


def test_folder_classes_pixels_and_grayscale(tmp_path):
    pixels = make_folder(tmp_path / "shapes", test_name="val")
    d = load_dataset(f"folder:{tmp_path / 'shapes'}/")
    assert d.name == "shapes" and d.class_names == ["ant", "moth", "zebra"] and d.image_size == 12
    assert isinstance(d.train.images, torch.Tensor) and d.train.images.shape == (9, 3, 12, 12)
    assert d.train.targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and d.test.targets.tolist() == [0, 1, 2]
    paths = sorted(p for p in pixels if "/train/" in p)  # sorted class folders, sorted files
    for i, p in enumerate(paths):
        expect = pixels[p].expand(3, -1, -1)  # the grayscale image becomes three equal channels
        assert torch.equal(d.train.images[i], expect), p
    gray = d.train.images[3]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2]) and not torch.equal(d.train.images[4][0], d.train.images[4][1])
    assert dataset_spec(f"folder:{tmp_path / 'shapes'}").stem == "cifar"


def test_folder_resize_equals_the_whole_image_probe_resize(tmp_path):
    root = tmp_path / "mixed"
    square = class_image(0, 0, 20, 20, seed=9)
    write_png(root / "train" / "a" / "0.png", square)
    wide = torch.zeros(3, 16, 64, dtype=torch.uint8)  # red | green (the middle half) | blue
    wide[0, :, :16], wide[1, :, 16:48], wide[2, :, 48:] = 255, 255, 255
    write_png(root / "train" / "a" / "1.png", wide)
    write_jpeg(root / "train" / "b" / "0.jpg", class_image(1, 0, 30, 25, seed=9))
    write_png(root / "test" / "b" / "0.png", class_image(1, 1, 9, 9, seed=9))
    with pytest.raises(DataError, match=r"images differ in size \(.*0\.png is 20x20, .*1\.png is 16x64\); set data\.image_size"):
        load_dataset(f"folder:{root}")
    d = load_dataset(f"folder:{root}", image_size=8)
    assert d.train.images.shape == (3, 3, 8, 8) and d.test.images.shape == (1, 3, 8, 8) and d.image_size == 8
    probe = MultiPatchAugment(2, 8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)).whole_image(square[None])
    assert (d.train.images[0].float() / 255 - probe[0]).abs().max() <= 0.5 / 255 + 1e-6  # rounding only
    green = torch.tensor([0, 255, 0], dtype=torch.int16).view(3, 1, 1)
    assert (d.train.images[1].to(torch.int16) - green).abs().max() <= 1  # shorter side resized, center crop
    assert torch.equal(d.test.images[0], _resize_center_crop(class_image(1, 1, 9, 9, seed=9), 8))


def test_folder_stream_is_class_incremental(tmp_path):
    make_folder(tmp_path / "f", per_class=4)
    d = load_dataset(f"folder:{tmp_path / 'f'}")
    stream = build_stream(d.train, d.num_classes, mode="class_incremental", n_experiences=3, class_order_seed=0)
    assert sorted(c for cs in stream.parent_classes for c in cs) == [0, 1, 2]
    for exp, classes in zip(stream, stream.parent_classes):
        assert sorted(set(exp.dataset.targets)) == sorted(classes) and len(exp.dataset) == 4


def test_large_folder_is_lazy_and_equal(tmp_path, monkeypatch):
    make_folder(tmp_path / "f")
    dense = load_dataset(f"folder:{tmp_path / 'f'}", image_size=8)
    monkeypatch.setattr(sources, "MAX_IN_MEMORY_IMAGES", 5)
    lazy = load_dataset(f"folder:{tmp_path / 'f'}", image_size=8)
    assert isinstance(lazy.train.images, LazyImageFolder) and isinstance(lazy.test.images, LazyImageFolder)
    assert torch.equal(lazy.train.images[torch.arange(9)], dense.train.images)
    assert torch.equal(lazy.test.images[torch.arange(3)], dense.test.images)
    assert torch.equal(lazy.train.targets, dense.train.targets)
    assert lazy.mean == pytest.approx(dense.mean) and lazy.std == pytest.approx(dense.std)
    with pytest.raises(DataError, match=r"holds 12 images .* read lazily .* set data\.image_size"):
        load_dataset(f"folder:{tmp_path / 'f'}")


def test_folder_errors_name_the_problem(tmp_path):
    root = tmp_path / "f"
    with pytest.raises(DataError, match=re.escape(f"folder source {root} does not exist")):
        load_dataset(f"folder:{root}")
    make_folder(root)
    (root / "test").rename(root / "holdout")
    with pytest.raises(DataError, match=rf"neither {re.escape(str(root))}/test/ nor .*/val/ exists"):
        load_dataset(f"folder:{root}")
    (root / "holdout").rename(root / "test")
    write_png(root / "test" / "wasp" / "0.png", class_image(5, 0, 12, 12, seed=1))
    with pytest.raises(DataError, match=r"test/ has class folder\(s\) wasp that .*train/ lacks"):
        load_dataset(f"folder:{root}")
    (root / "train" / "wasp").mkdir()
    (root / "train" / "wasp" / "scan.bmp").write_bytes(b"BM")
    with pytest.raises(DataError, match=r"class folder .*train/wasp/ is empty: no \.jpeg/\.jpg/\.png/\.webp image; "
                                        r"it holds \.bmp \(1\)"):
        load_dataset(f"folder:{root}")
    write_png(root / "train" / "wasp" / "queens" / "0.png", class_image(5, 0, 12, 12, seed=2))
    with pytest.raises(DataError, match=r"train/wasp/ is empty: .*it holds \.bmp \(1\); its subfolders \(queens\) "
                                        r"are not read: a class's images lie directly in its folder, so move them up"):
        load_dataset(f"folder:{root}")
    (root / "train" / "wasp" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"Cannot decode image .*train/wasp/broken\.png"):
        load_dataset(f"folder:{root}")
    (root / "train").rename(root / "training")
    with pytest.raises(DataError, match=rf"{re.escape(str(root))}/train/ is missing"):
        load_dataset(f"folder:{root}")


@pytest.mark.parametrize("kept", [True, False], ids=["checkpoint keeps its data", "older checkpoint"])
def test_evaluating_a_run_whose_folder_is_gone_names_the_flags(tmp_path, kept):
    """evaluate.py on a run trained on a folder: source that has moved since: --dataset NEWPATH or --no-in-domain
    (a checkpoint that keeps the training data's size and normalisation needs no data to rebuild its model)."""
    from streaming_ssl import checkpoint as ckpt
    from streaming_ssl.probe_run import ProbeRequest, probe_checkpoint

    gone = tmp_path / "shapes"
    cfg = load_config(None, [f"data.dataset=folder:{gone}"])
    data = {"name": "shapes", "image_size": 12, "mean": [0.5] * 3, "std": [0.25] * 3, "num_classes": 3}
    state = {"format": ckpt.FORMAT_VERSION, "model": {}, "config": cfg.to_dict(), **({"data": data} if kept else {})}
    (tmp_path / "run").mkdir()
    ckpt.atomic_save(state, tmp_path / "run" / "ckpt_000000001.pt")
    with pytest.raises(DataError) as err:
        probe_checkpoint(ProbeRequest(checkpoint=str(tmp_path / "run"), device="cpu"))
    message = str(err.value)
    assert f"folder source {gone} does not exist" in message
    assert f"The run trained on folder:{gone} (its data.dataset), which is gone" in message
    if kept:
        assert "pass --dataset folder:NEWPATH; to probe other datasets only, pass --no-in-domain --transfer" in message
    else:
        assert f"put it back at {gone}" in message and "--dataset" not in message


def gray16_png(path: pathlib.Path, values: np.ndarray) -> None:
    """Write a 16-bit grayscale PNG (PIL mode I;16) of uint16 ``values``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint16)).save(path)


def test_16bit_png_is_scaled_to_8_bits(tmp_path, monkeypatch):
    """uint16 pixels become v >> 8 (65535 -> 255, 40000 -> 156), at native size, resized, and lazily."""
    rng = np.random.default_rng(3)
    root = tmp_path / "deep"
    values = {}
    for split, n in (("train", 2), ("test", 1)):
        for c in ("a", "b"):
            for k in range(n):
                v = rng.integers(0, 65536, (6, 8), dtype=np.uint16)
                v[0, 1:5] = [0, 255, 40000, 65535]  # columns 0..3 after the 6x6 center crop
                path = root / split / c / f"{k}.png"
                gray16_png(path, v)
                values[(split, c, k)] = torch.from_numpy((v >> 8).astype(np.uint8)).expand(3, -1, -1)
    expect = [values[("train", c, k)] for c in ("a", "b") for k in range(2)]
    d = load_dataset(f"folder:{root}")
    assert d.train.images.dtype == torch.uint8 and d.image_size == 6
    assert d.train.images[0, 0, 0, :4].tolist() == [0, 0, 156, 255]
    for i, img in enumerate(expect):
        assert torch.equal(d.train.images[i], _resize_center_crop(img, 6))
    resized = load_dataset(f"folder:{root}", image_size=4)
    for i, img in enumerate(expect):
        assert torch.equal(resized.train.images[i], _resize_center_crop(img, 4))
    assert torch.equal(resized.test.images[1], _resize_center_crop(values[("test", "b", 0)], 4))
    monkeypatch.setattr(sources, "MAX_IN_MEMORY_IMAGES", 2)
    lazy = load_dataset(f"folder:{root}", image_size=4)
    assert isinstance(lazy.train.images, LazyImageFolder)
    assert torch.equal(lazy.train.images[torch.arange(4)], resized.train.images)
    assert torch.equal(lazy.train.images[3], _resize_center_crop(expect[3], 4))


def test_hidden_files_in_class_folders_are_skipped(tmp_path, monkeypatch):
    root = tmp_path / "mac"
    make_folder(root)
    for folder in (root / "train" / "ant", root / "test" / "moth"):
        for real in sorted(folder.iterdir()):
            (folder / f"._{real.name}").write_bytes(b"\x00\x05\x16\x07 AppleDouble metadata")
        (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
        (folder / ".hidden.jpg").write_bytes(b"not an image")
    d = load_dataset(f"folder:{root}")
    assert d.train.targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and d.test.targets.tolist() == [0, 1, 2]
    monkeypatch.setattr(sources, "MAX_IN_MEMORY_IMAGES", 5)
    lazy = load_dataset(f"folder:{root}", image_size=6)
    assert not any(pathlib.Path(p).name.startswith(".") for p in lazy.train.images.paths + lazy.test.images.paths)
    (root / "train" / "wasp").mkdir()
    (root / "train" / "wasp" / "._0.png").write_bytes(b"\x00\x05\x16\x07")
    with pytest.raises(DataError, match=r"class folder .*train/wasp/ is empty: no \.jpeg/\.jpg/\.png/\.webp "
                                        r"image\. Add"):
        load_dataset(f"folder:{root}")  # a folder of hidden files only is empty


def test_classes_without_test_images_are_warned_about(tmp_path, caplog):
    root = tmp_path / "f"
    make_folder(root)
    with caplog.at_level(logging.WARNING, logger="scenarios.sources"):
        load_dataset(f"folder:{root}")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # every class tested: no warning
    for f in (root / "test" / "moth").iterdir():
        f.unlink()
    (root / "test" / "moth").rmdir()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="scenarios.sources"):
        d = load_dataset(f"folder:{root}")
    assert d.test.targets.tolist() == [0, 2]  # loads: a user may want that
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert re.search(r"folder source .*/f \(.*/f/test/\): class\(es\) 1 \('moth'\) have no test image: the accuracy "
                     r"on an experience .* undefined \(NaN\)", warning.getMessage())
    x = np.zeros((4, 5, 5), dtype=np.uint8)
    p = save_npz(tmp_path / "u.npz", x_train=x, y_train=np.array([0, 1, 2, 3]), x_test=x[:2], y_test=np.array([2, 2]))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="scenarios.sources"):
        assert load_dataset(f"npz:{p}").num_classes == 4
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert re.search(r"npz source .*u\.npz: class\(es\) 0, 1, 3 have no test image", warning.getMessage())


# --------------------------------------------------------------------------- npz


def save_npz(path: pathlib.Path, **arrays) -> pathlib.Path:
    np.savez(path, **arrays)
    return path


def test_npz_hwc_rgb_and_nhw_gray(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 10, 10, 3), dtype=np.uint8)
    rgb = save_npz(tmp_path / "colour.npz", x_train=x, y_train=np.array([0, 1, 2, 0, 1, 2]), x_test=x[:2],
                   y_test=np.array([2, 0]), class_names=np.array(["a", "b", "c"]))
    d = load_dataset(f"npz:{rgb}")
    assert d.name == "colour" and d.class_names == ["a", "b", "c"] and d.image_size == 10
    assert torch.equal(d.train.images, torch.from_numpy(x).permute(0, 3, 1, 2))
    assert d.test.targets.tolist() == [2, 0]
    g = rng.integers(0, 256, (4, 14, 14), dtype=np.uint8)
    gray = save_npz(tmp_path / "digits.npz", x_train=g, y_train=np.array([1, 0, 2, 3]), x_test=g[:1],
                    y_test=np.array([3]))
    d = load_dataset(f"npz:{gray}", image_size=7)
    assert d.name == "digits" and d.class_names == ["0", "1", "2", "3"] and d.train.images.shape == (4, 3, 7, 7)
    assert torch.equal(d.train.images[:, 0], d.train.images[:, 1]) and torch.equal(d.train.images[:, 1], d.train.images[:, 2])
    probe = MultiPatchAugment(2, 7, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)).whole_image(
        torch.from_numpy(g)[:, None].expand(-1, 3, -1, -1))
    assert (d.train.images.float() / 255 - probe).abs().max() <= 0.5 / 255 + 1e-6
    assert dataset_spec(f"npz:{gray}", image_size=48).stem == "tiny"
    assert dataset_spec(f"npz:{gray}", image_size=100).stem == "imagenet"
    # labels shaped (N, 1), as Keras' cifar10.load_data() gives them, are the same labels
    keras = save_npz(tmp_path / "keras.npz", x_train=x, y_train=np.array([[0], [1], [2], [0], [1], [2]]),
                     x_test=x[:2], y_test=np.array([[2], [0]]))
    d = load_dataset(f"npz:{keras}")
    assert d.train.targets.tolist() == [0, 1, 2, 0, 1, 2] and d.test.targets.tolist() == [2, 0]


def test_npz_errors_name_the_problem(tmp_path):
    x = np.zeros((3, 8, 8, 3), dtype=np.uint8)
    y = np.array([0, 1, 1])
    missing = tmp_path / "nothere.npz"
    with pytest.raises(DataError, match=re.escape(f"npz source {missing} does not exist")):
        load_dataset(f"npz:{missing}")
    p = save_npz(tmp_path / "a.npz", x_train=x, y_train=y, x_test=x)
    with pytest.raises(DataError, match=r"a\.npz lacks the key\(s\) y_test \(has: x_train, y_train, x_test\)"):
        load_dataset(f"npz:{p}")
    p = save_npz(tmp_path / "b.npz", x_train=x, y_train=y, x_test=x, y_test=np.array([0, 1]))
    with pytest.raises(DataError, match=r"b\.npz: y_test has 2 labels but x_test holds 3 images; give one label per "
                                        r"image"):
        load_dataset(f"npz:{p}")
    p = save_npz(tmp_path / "c.npz", x_train=x, y_train=y, x_test=x, y_test=np.array([0, 1, 2]))
    with pytest.raises(DataError, match=r"c\.npz key y_test \(max\(y_train\) \+ 1 classes\) has labels out of range "
                                        r"\[0, 2\]; expected 0\.\.1"):
        load_dataset(f"npz:{p}")
    p = save_npz(tmp_path / "d.npz", x_train=x, y_train=np.array([0, -1, 1]), x_test=x, y_test=y,
                 class_names=np.array(["u", "v"]))
    with pytest.raises(DataError, match=r"d\.npz key y_train \(class_names classes\) has labels out of range"):
        load_dataset(f"npz:{p}")
    p = save_npz(tmp_path / "e.npz", x_train=x.astype(np.float32), y_train=y, x_test=x, y_test=y)
    with pytest.raises(DataError, match=r"e\.npz key x_train has dtype float32; images must be uint8"):
        load_dataset(f"npz:{p}")
    (tmp_path / "f.npz").write_bytes(b"PK not a zip")
    with pytest.raises(DataError, match=r"f\.npz is truncated or corrupted"):
        load_dataset(f"npz:{tmp_path / 'f.npz'}")


@pytest.mark.parametrize(("name", "write", "message"), [
    ("x.npy", lambda p: np.save(p, np.zeros((3, 8, 8, 3), dtype=np.uint8)),
     r"x\.npy is not an \.npz \(zip\) file but an \.npy .*; save the arrays with numpy\.savez\("),
    ("t.npz", lambda p: p.write_text("x_train,y_train\n1,2\n"),
     r"t\.npz is not an \.npz \(zip\) file; save the arrays with numpy\.savez\("),
    ("empty.npz", lambda p: p.write_bytes(b""), r"empty\.npz is not an \.npz \(zip\) file"),
])
def test_npz_that_is_not_a_zip_says_so(tmp_path, name, write, message):
    write(tmp_path / name)
    with pytest.raises(DataError, match=message):
        load_dataset(f"npz:{tmp_path / name}")


def test_npz_empty_splits_are_refused(tmp_path):
    x = np.zeros((4, 6, 6, 3), dtype=np.uint8)
    y = np.array([0, 1, 0, 1])
    p = save_npz(tmp_path / "notest.npz", x_train=x, y_train=y, x_test=x[:0], y_test=y[:0])
    with pytest.raises(DataError, match=rf"npz source {re.escape(str(p))}: key x_test holds no image; .*add test"):
        load_dataset(f"npz:{p}")
    p = save_npz(tmp_path / "notrain.npz", x_train=x[:0], y_train=y[:0], x_test=x, y_test=y,
                 class_names=np.array(["u", "v"]))
    with pytest.raises(DataError, match=rf"npz source {re.escape(str(p))}: key x_train holds no image; .*needs train"):
        load_dataset(f"npz:{p}")


def test_npz_classes_without_training_images_are_refused(tmp_path):
    x = np.arange(4 * 36, dtype=np.uint8).reshape(4, 6, 6)
    y = np.array([0, 2, 4, 2])
    p = save_npz(tmp_path / "gaps.npz", x_train=x, y_train=y, x_test=x[:2], y_test=np.array([4, 0]))
    with pytest.raises(DataError, match=r"gaps\.npz: class\(es\) 1, 3 of the 5 \(max\(y_train\) \+ 1\) have no "
                                        r"training image.*numpy\.unique\(y_train, return_inverse=True\)"
                                        r".*numpy\.searchsorted"):
        load_dataset(f"npz:{p}")
    classes, y_train = np.unique(y, return_inverse=True)  # the remap the message suggests loads
    p = save_npz(tmp_path / "remapped.npz", x_train=x, y_train=y_train, x_test=x[:2],
                 y_test=np.searchsorted(classes, np.array([4, 0])))
    d = load_dataset(f"npz:{p}")
    assert d.num_classes == 3 and d.train.targets.tolist() == [0, 1, 2, 1] and d.test.targets.tolist() == [2, 0]
    p = save_npz(tmp_path / "names.npz", x_train=x, y_train=np.array([0, 1, 0, 1]), x_test=x,
                 y_test=np.array([0, 1, 1, 0]), class_names=np.array(["cat", "dog", "eel"]))
    with pytest.raises(DataError, match=r"names\.npz: class\(es\) 2 \('eel'\) of the 3 \(class_names\) have no "
                                        r"training image.*remove the names of the empty classes from class_names"):
        load_dataset(f"npz:{p}")


@pytest.mark.parametrize(("x", "found", "fix"), [
    (np.linspace(0, 1, 3 * 64, dtype=np.float32), r"\[0, 1\], so they are fractions of full intensity",
     r"\(x \* 255\)\.round\(\)\.astype\(numpy\.uint8\)"),
    (np.linspace(0, 255, 3 * 64), r"\[0, 255\], so they are 0\.\.255 pixel values already",
     r"x\.round\(\)\.clip\(0, 255\)\.astype\(numpy\.uint8\)"),
    (np.arange(3 * 64, dtype=np.uint16) * 256, r"\[0, 48896\], beyond 0\.\.255: if they are 16-bit pixels",
     r"\(x // 257\)\.astype\(numpy\.uint8\)"),
    (np.arange(3 * 64, dtype=np.int64), r"\[0, 191\], so they are 0\.\.255 pixel values already",
     r"convert with x\.astype\(numpy\.uint8\)"),
    (np.linspace(-1, 1, 3 * 64, dtype=np.float32), r"\[-1, 1\] \(normalised to \[-1, 1\]\?\)",
     r"\(\(x \+ 1\) \* 127\.5\)\.round\(\)\.astype\(numpy\.uint8\)"),
    (np.arange(3 * 64) % 2 == 0, r"", r"Store the pixel values as numpy\.uint8"),
], ids=["float 0..1", "float 0..255", "uint16", "int64 0..255", "float -1..1", "bool"])
def test_npz_dtype_errors_give_the_fix_for_the_values_found(tmp_path, x, found, fix):
    """Each dtype gets the conversion its values need, in a sentence of its own before the general help."""
    x = x.reshape(3, 8, 8)
    p = save_npz(tmp_path / "v.npz", x_train=x, y_train=np.array([0, 1, 1]), x_test=x, y_test=np.array([0, 1, 1]))
    found = rf"Its values lie in {found}" if found else ""
    with pytest.raises(DataError, match=rf"v\.npz key x_train has dtype {x.dtype}; images must be uint8 0\.\.255\. "
                                        rf"{found}.*{fix}.*\. An npz source holds x_train"):
        load_dataset(f"npz:{p}")


def test_npz_class_names_shorter_than_the_labels_say_so(tmp_path):
    x = np.zeros((3, 8, 8), dtype=np.uint8)
    p = save_npz(tmp_path / "n.npz", x_train=x, y_train=np.array([0, 1, 2]), x_test=x, y_test=np.array([0, 1, 2]),
                 class_names=np.array(["cat", "dog"]))
    with pytest.raises(DataError, match=r"n\.npz: y_train has labels up to 2 but class_names lists 2 names \(0\.\.1\): "
                                        r"add the missing names to class_names or fix the labels"):
        load_dataset(f"npz:{p}")
    p = save_npz(tmp_path / "t.npz", x_train=x, y_train=np.array([0, 1, 1]), x_test=x, y_test=np.array([0, 3, 1]),
                 class_names=np.array(["cat", "dog"]))
    with pytest.raises(DataError, match=r"t\.npz: y_test has labels up to 3 but class_names lists 2 names"):
        load_dataset(f"npz:{p}")


def test_npz_byte_string_class_names_are_decoded(tmp_path):
    x = np.zeros((2, 4, 4), dtype=np.uint8)
    p = save_npz(tmp_path / "b.npz", x_train=x, y_train=np.array([0, 1]), x_test=x, y_test=np.array([1, 0]),
                 class_names=np.array([b"airplane", "b\u00e4r".encode("utf-8")]))
    assert load_dataset(f"npz:{p}").class_names == ["airplane", "b\u00e4r"]


# --------------------------------------------------------------------------- statistics


def hand_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    x = images.double() / 255
    return x.mean(dim=(0, 2, 3)).tolist(), x.permute(1, 0, 2, 3).reshape(3, -1).std(dim=1, unbiased=False).tolist()


def test_stats_are_computed_once_cached_and_invalidated(tmp_path):
    root = tmp_path / "f"
    make_folder(root)
    d = load_dataset(f"folder:{root}")
    mean, std = hand_stats(d.train.images)
    assert d.mean == pytest.approx(mean, abs=1e-9) and d.std == pytest.approx(std, abs=1e-9)
    cache = root / sources.STATS_FILE
    blob = json.loads(cache.read_text())
    assert blob["stats"]["12"] == {"mean": pytest.approx(mean), "std": pytest.approx(std)}
    blob["stats"]["12"] = {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}  # a second load must read, not compute
    cache.write_text(json.dumps(blob))
    again = load_dataset(f"folder:{root}")
    assert again.mean == (0.1, 0.2, 0.3) and again.std == (0.4, 0.5, 0.6)
    resized = load_dataset(f"folder:{root}", image_size=6)  # another size: its own entry, the first one kept
    assert resized.mean == pytest.approx(hand_stats(resized.train.images)[0], abs=1e-9)
    assert set(json.loads(cache.read_text())["stats"]) == {"12", "6"}
    changed = class_image(7, 7, 12, 12, seed=7)
    write_png(root / "train" / "ant" / "ant_0.png", changed)  # the data changes: the cache is stale
    fresh = load_dataset(f"folder:{root}")
    assert fresh.mean == pytest.approx(hand_stats(fresh.train.images)[0], abs=1e-9)
    assert fresh.mean != pytest.approx(mean, abs=1e-6)


def test_stats_cache_falls_back_to_the_cache_folder(tmp_path):
    x = np.random.default_rng(1).integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)
    p = save_npz(tmp_path / "d.npz", x_train=x, y_train=np.arange(5), x_test=x, y_test=np.arange(5))
    d = load_dataset(f"npz:{p}")
    beside = tmp_path / f".d.npz{sources.STATS_FILE}"
    assert beside.is_file()
    ref = sources.parse_source(f"npz:{p}")
    fallback = sources._cache_files(ref)[1]
    assert fallback.parent == tmp_path / "cache"  # $STREAMING_SSL_CACHE
    blob = json.loads(beside.read_text())
    blob["stats"]["6"]["mean"] = [0.25, 0.5, 0.75]
    fallback.parent.mkdir(parents=True)
    fallback.write_text(json.dumps(blob))
    beside.unlink()
    assert load_dataset(f"npz:{p}").mean == (0.25, 0.5, 0.75)
    assert d.mean == pytest.approx(hand_stats(d.train.images)[0], abs=1e-9)
    given = save_npz(tmp_path / "g.npz", x_train=x, y_train=np.arange(5), x_test=x, y_test=np.arange(5),
                     mean=np.array([0.5, 0.5, 0.5]), std=np.array([0.2, 0.3, 0.4]))
    assert load_dataset(f"npz:{given}").std == (0.2, 0.3, 0.4)
    assert not (tmp_path / f".g.npz{sources.STATS_FILE}").exists()


# --------------------------------------------------------------------------- end to end


def test_training_cli_on_a_folder_with_an_npz_transfer(zygote, tmp_path):
    root = tmp_path / "blobs"
    for c in range(3):
        for k in range(8):
            write_png(root / "train" / f"c{c}" / f"{k}.png", class_image(c, k, 16, 16, seed=11))
        for k in range(4):
            write_jpeg(root / "test" / f"c{c}" / f"{k}.jpg", class_image(c, 50 + k, 16, 16, seed=11))
    g = np.random.default_rng(2).integers(0, 256, (12, 20, 20), dtype=np.uint8)
    transfer = save_npz(tmp_path / "digits.npz", x_train=g, y_train=np.arange(12) % 2, x_test=g[:6], y_test=np.arange(6) % 2)
    out = tmp_path / "run"
    # the training CLI in a process of its own, forked with the imports done (tests/zygote.py)
    argv = ["--config", "configs/smoke.yaml", f"data.dataset=folder:{root}",
           "data.train_per_class=null", "data.test_per_class=null", f"eval.transfer=[npz:{transfer}]",
           "model.width=0.125", "model.feature_dim=32", "model.proj_hidden_dim=32", "model.proj_dim=32",
           "augment.n_patches=2", "eval.probe_epochs=2", "eval.knn_k=3", "train.batch_size=8", "train.threads=1",
           "run.tensorboard=false", f"run.out_dir={out}"]
    log = tmp_path / "run.log"
    rc = zygote.run(argv, log, 240, env={sources.CACHE_ENV_VAR: str(tmp_path / "cache")})
    assert rc == 0, log.read_text(errors="replace")[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert len(rows) == 3  # configs/smoke.yaml: 3 experiences
    for r in rows:
        assert 0.0 <= r["transfer/digits"] <= 1.0
        assert len(r["probe/acc_matrix_row"]) == 3
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
