"""Shared fixtures: tiny copies of the official on-disk layouts of Tiny ImageNet and ImageNet-100.

Both trees are written once per test session into a temporary folder (a few images per class, small
sizes) and are meant to be read through `scenarios.datasets.load_dataset` / `data.root`. Also
`child_env`, the environment of a Python subprocess that imports this checkout (`from tests.conftest import ...`),
`lock_held_elsewhere`, a process holding a run's lock,
`zygote`, the session's helper that forks training processes with the heavy modules imported (tests/zygote.py),
and `dies_after`, which ends a training run in this process as if it were killed after N updates.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from torchvision.io import encode_jpeg, encode_png, write_file

TINY_FIXTURE_WNIDS = ["n01443537", "n01629819", "n01641577", "n01644900"]
TINY_TRAIN_PER_CLASS = 4
TINY_VAL_PER_CLASS = 2

IMAGENET_TRAIN_PER_CLASS = 3
IMAGENET_VAL_PER_CLASS = 1

REPO = pathlib.Path(__file__).resolve().parents[1]


def child_env(**extra: str) -> dict:
    """os.environ for a Python subprocess of the tests: this checkout first on PYTHONPATH, what was there kept (on
    the GPU machine, .gpu/site with the carried avalanche wheels), then `extra`."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


@contextlib.contextmanager
def lock_held_elsewhere(run_dir, seconds: float, then: str = "", *args):
    """Another process holds `run_dir`'s lock (runlock.RunLock) for `seconds`, then runs the Python lines `then` (a
    predecessor still writing the run; sys.argv[2:] are `args`) and exits, which lets go of the lock. Yields the
    process once it holds the lock; it is killed if still running when the block ends."""
    code = ("import os, shutil, sys, time\nfrom streaming_ssl.runlock import RunLock\n"
            f"lock = RunLock(sys.argv[1]).acquire()\nprint('locked', flush=True)\ntime.sleep({seconds})\n{then}\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run_dir), *map(str, args)], stdout=subprocess.PIPE,
                              text=True, env=child_env(), cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait()
        holder.stdout.close()


def class_image(cls: int, k: int, h: int, w: int, seed: int) -> torch.Tensor:
    """A (3, h, w) uint8 image: a class colour plus seeded noise (distinct for every (cls, k))."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + cls * 1009 + k)
    base = torch.tensor([(37 * cls) % 200, (91 * cls + 60) % 200, (13 * cls + 120) % 200], dtype=torch.int16)
    noise = torch.randint(0, 56, (3, h, w), generator=gen, dtype=torch.int16)
    return (base.view(3, 1, 1) + noise).clamp(0, 255).to(torch.uint8)


def write_jpeg(path: pathlib.Path, img: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(str(path), encode_jpeg(img, quality=90))


def write_png(path: pathlib.Path, img: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(str(path), encode_png(img))


def make_tiny_imagenet(root: pathlib.Path, wnids: list[str] = TINY_FIXTURE_WNIDS,
                       train_per_class: int = TINY_TRAIN_PER_CLASS,
                       val_per_class: int = TINY_VAL_PER_CLASS) -> pathlib.Path:
    """ROOT/tiny-imagenet-200/ as extracted from the official zip (64x64 JPEGs)."""
    folder = root / "tiny-imagenet-200"
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (folder / "words.txt").write_text("".join(f"{w}\tclass {i}, thing {i}\n" for i, w in enumerate(wnids)))
    for c, wnid in enumerate(wnids):
        boxes = []
        for k in range(train_per_class):
            name = f"{wnid}_{k}.JPEG"
            write_jpeg(folder / "train" / wnid / "images" / name, class_image(c, k, 64, 64, seed=1))
            boxes.append(f"{name}\t0\t0\t63\t63\n")
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(boxes))
    lines, i = [], 0
    for k in range(val_per_class):
        for c, wnid in enumerate(wnids):
            name = f"val_{i}.JPEG"
            write_jpeg(folder / "val" / "images" / name, class_image(c, 100 + k, 64, 64, seed=2))
            lines.append(f"{name}\t{wnid}\t0\t0\t63\t63\n")
            i += 1
    (folder / "val" / "val_annotations.txt").write_text("".join(lines))
    return folder


def make_imagenet100(root: pathlib.Path, train_per_class: int = IMAGENET_TRAIN_PER_CLASS,
                     val_per_class: int = IMAGENET_VAL_PER_CLASS) -> pathlib.Path:
    """ROOT/imagenet100/{train,val}/<wnid>/ for the 100 classes of imagenet100_classes.txt (small images)."""
    from scenarios.datasets import imagenet100_classes

    folder = root / "imagenet100"
    sizes = [(40, 36), (36, 48), (34, 34)]
    for c, wnid in enumerate(imagenet100_classes()):
        for k in range(train_per_class):
            h, w = sizes[(c + k) % len(sizes)]
            img = class_image(c, k, h, w, seed=3)
            if k % 2:
                write_png(folder / "train" / wnid / f"{wnid}_{k}.png", img)
            else:
                write_jpeg(folder / "train" / wnid / f"{wnid}_{k}.JPEG", img)
        for k in range(val_per_class):
            write_jpeg(folder / "val" / wnid / f"ILSVRC2012_val_{c:05d}_{k}.JPEG", class_image(c, 100 + k, 36, 40, seed=4))
    return folder


@pytest.fixture(scope="session")
def tiny_imagenet_root(tmp_path_factory) -> pathlib.Path:
    """A data root holding tiny-imagenet-200/ (4 classes, 4 train + 2 val images each)."""
    root = tmp_path_factory.mktemp("tiny_root")
    make_tiny_imagenet(root)
    return root


@pytest.fixture(scope="session")
def imagenet100_root(tmp_path_factory) -> pathlib.Path:
    """A data root holding imagenet100/{train,val}/ (100 classes, 3 train + 1 val images each)."""
    root = tmp_path_factory.mktemp("in100_root")
    make_imagenet100(root)
    return root


@pytest.fixture(scope="session")
def zygote():
    """One forking helper for the whole session (tests/zygote.py): each training process it forks starts with
    torch and avalanche imported."""
    from tests.zygote import Zygote

    z = Zygote(child_env())
    try:
        yield z
    finally:
        z.close()


@pytest.fixture
def dies_after(monkeypatch):
    """dies_after(n, fn, *args): run fn(*args) (a training run in this process) and let it die once n updates are
    done, as a killed process would: the backward of the next update raises RuntimeError("injected failure ..."),
    nothing of that update applied, and the test fails unless it does. The real backward is back afterwards."""
    from streaming_ssl.strategy import EMPSSLStrategy

    backward = EMPSSLStrategy.backward

    def run(n: int, fn, *args):
        def failing(self):
            if self.global_step == n:
                raise RuntimeError(f"injected failure after {n} updates")
            backward(self)

        monkeypatch.setattr(EMPSSLStrategy, "backward", failing)
        try:
            with pytest.raises(RuntimeError, match="injected failure"):
                fn(*args)
        finally:
            monkeypatch.setattr(EMPSSLStrategy, "backward", backward)

    return run
