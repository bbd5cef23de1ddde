"""End to end through run_stream.main: Tiny ImageNet and ImageNet-100 on the on-disk fixtures of conftest.py,
and online mode on a slice of the real CIFAR-10 ($STREAMING_SSL_DATA/cifar10.npz).

Every run is tiny (a 1/8-width ResNet-18, 2 patches, 2 probe epochs, one CPU thread); the tests check the
bookkeeping of a run (updates, samples, evaluation cadence, accuracy-matrix shape, files written), never the
accuracy.
"""

from __future__ import annotations

import json
import math
import os
import pathlib

import pytest

import streaming_ssl.cli.train as run_stream
from streaming_ssl import checkpoint as ckpt

TINY = [
    "model.width=0.125", "model.feature_dim=32", "model.proj_hidden_dim=32", "model.proj_dim=32",
    "augment.n_patches=2", "eval.probe_epochs=2", "eval.knn_k=3", "run.tensorboard=false", "train.threads=1",
]


def run_main(run_dir: pathlib.Path, *overrides: str) -> list[dict]:
    rc = run_stream.main(["--config", "configs/smoke.yaml", *TINY, *overrides, f"run.out_dir={run_dir}"])
    assert rc == 0, f"run_stream.main returned {rc}; see {run_dir / 'train.log'}"
    path = run_dir / "metrics.jsonl"
    assert path.is_file(), "no metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_run_files(run_dir: pathlib.Path, rows: list[dict], *, n_steps: int, updates: int, samples: int) -> dict:
    """accuracy.png, summary.json, config.yaml and a final checkpoint at the end of the stream."""
    png = run_dir / "accuracy.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run_dir / "summary.json").read_text()) == rows[-1]
    assert (run_dir / "config.yaml").is_file()
    assert ckpt.list_checkpoints(run_dir), "no checkpoint written"
    latest = ckpt.latest(run_dir)
    assert (run_dir / "ckpt.pt").resolve() == latest.resolve()
    state = ckpt.load(latest)
    pos = state["position"]
    assert pos["stream_step"] == n_steps and pos["global_step"] == updates and pos["samples_seen"] == samples
    assert state["metrics_rows"] == len(rows)
    return state


def check_rows(rows: list[dict], n_parents: int) -> None:
    for r in rows:
        matrix_row = r["probe/acc_matrix_row"]
        assert len(matrix_row) == n_parents
        assert all(0.0 <= v <= 1.0 for v in matrix_row), matrix_row
        assert 0.0 <= r["probe/acc_all"] <= 1.0 and 0.0 <= r["knn/acc_all"] <= 1.0
        assert len(r["probe/forgetting"]) == n_parents


def test_tiny_imagenet_two_experiences(tiny_imagenet_root, tmp_path):
    folder = tiny_imagenet_root / "tiny-imagenet-200"
    wnids = (folder / "wnids.txt").read_text().split()
    per_class = {len(list((folder / "train" / w / "images").glob("*.JPEG"))) for w in wnids}
    assert len(wnids) == 4 and per_class == {4}
    run_dir = tmp_path / "run_tiny"
    batch = 6
    rows = run_main(run_dir, "data.dataset=tinyimagenet", f"data.root={tiny_imagenet_root}", "stream.n_experiences=2",
                    "augment.size=32", f"train.batch_size={batch}")
    per_exp = [2 * 4, 2 * 4]  # 2 classes x 4 images in each experience
    assert len(rows) == 2
    assert [r["experience"] for r in rows] == [0, 1] and [r["parent_experience"] for r in rows] == [0, 1]
    assert [r["samples_seen"] for r in rows] == [per_exp[0], sum(per_exp)]
    updates = [math.ceil(n / batch) for n in per_exp]
    assert [r["updates"] for r in rows] == [updates[0], sum(updates)]
    check_rows(rows, 2)
    assert rows[0]["probe/forgetting"] == [None, None] and rows[1]["probe/forgetting"][1] is None
    state = check_run_files(run_dir, rows, n_steps=2, updates=sum(updates), samples=sum(per_exp))
    assert state["config"]["data"]["dataset"] == "tinyimagenet"
    assert tuple(state["model"]["backbone.stem.0.weight"].shape) == (8, 3, 3, 3)  # tiny stem: 3x3 conv
    assert tuple(state["model"]["pre_feature.0.weight"].shape) == (32, 64)


def test_imagenet100_two_uneven_experiences(imagenet100_root, tmp_path):
    counts = {len(list(d.iterdir())) for d in (imagenet100_root / "imagenet100" / "train").iterdir()}
    assert counts == {3}  # images per class in the fixture
    run_dir = tmp_path / "run_in100"
    batch = 50
    split = [60, 40]
    rows = run_main(run_dir, "data.dataset=imagenet100", f"data.root={imagenet100_root}", "data.image_size=32",
                    f"stream.classes_per_experience={json.dumps(split)}", "model.stem=imagenet", "augment.size=32",
                    f"train.batch_size={batch}")
    per_exp = [c * 3 for c in split]  # 180, 120 images
    updates = [math.ceil(n / batch) for n in per_exp]  # 4 + 3
    assert len(rows) == 2
    assert [r["experience"] for r in rows] == [0, 1]
    assert [r["samples_seen"] for r in rows] == [per_exp[0], sum(per_exp)]
    assert [r["updates"] for r in rows] == [updates[0], sum(updates)]
    check_rows(rows, 2)
    state = check_run_files(run_dir, rows, n_steps=2, updates=sum(updates), samples=sum(per_exp))
    assert state["config"]["stream"]["classes_per_experience"] == split
    assert tuple(state["model"]["backbone.stem.0.weight"].shape) == (8, 3, 7, 7)  # ImageNet stem: 7x7 conv


# ------------------------------------------------------------------------------------ online on real CIFAR-10

PER_CLASS = 12
ONLINE_K = 10
SMOKE_N_EXPERIENCES = 3  # configs/smoke.yaml
SMOKE_BATCH = 20


def _cifar_root() -> str:
    root = os.environ.get("STREAMING_SSL_DATA", "")
    if not root or not (pathlib.Path(root) / "cifar10.npz").is_file():
        pytest.skip("$STREAMING_SSL_DATA/cifar10.npz not present")
    return root


def online_plan() -> tuple[list[int], list[int]]:
    """(mini-experience sizes, their parent) of the online stream, from the arithmetic of the split alone."""
    base, extra = divmod(10, SMOKE_N_EXPERIENCES)
    classes = [base + 1] * extra + [base] * (SMOKE_N_EXPERIENCES - extra)  # 4, 3, 3 classes
    sizes, parent = [], []
    for p, n_classes in enumerate(classes):
        n = n_classes * PER_CLASS  # 48, 36, 36 images
        mini = [ONLINE_K] * (n // ONLINE_K) + ([n % ONLINE_K] if n % ONLINE_K else [])
        sizes += mini
        parent += [p] * len(mini)
    return sizes, parent


@pytest.mark.parametrize("every", [4, 5, 0])
def test_online_cifar10_evaluation_cadence(tmp_path, every):
    _cifar_root()
    sizes, parent = online_plan()
    n = len(sizes)
    assert n == 13 and sum(sizes) == 10 * PER_CLASS
    if every:
        due = [d for d in range(1, n + 1) if d % every == 0 or d == n]  # after d mini-experiences
    else:
        due = [d for d in range(1, n + 1) if d == n or parent[d] != parent[d - 1]]  # parent boundaries
        assert len(due) == SMOKE_N_EXPERIENCES
    run_dir = tmp_path / f"online_every{every}"
    rows = run_main(run_dir, f"data.train_per_class={PER_CLASS}", "data.test_per_class=10", "stream.mode=online",
                    f"stream.online_experience_size={ONLINE_K}", f"stream.eval_every={every}")
    assert len(rows) == len(due)
    assert [r["experience"] for r in rows] == [d - 1 for d in due]
    assert [r["parent_experience"] for r in rows] == [parent[d - 1] for d in due]
    assert [r["samples_seen"] for r in rows] == [sum(sizes[:d]) for d in due]
    updates = [math.ceil(s / SMOKE_BATCH) for s in sizes]
    assert [r["updates"] for r in rows] == [sum(updates[:d]) for d in due]
    check_rows(rows, SMOKE_N_EXPERIENCES)  # columns are the parent experiences, not the mini-experiences
    check_run_files(run_dir, rows, n_steps=n, updates=sum(updates), samples=sum(sizes))
