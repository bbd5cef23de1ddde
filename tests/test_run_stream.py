"""End to end through run_stream.py on a slice of the real CIFAR-10 (smoke recipe)."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import streaming_ssl.augment as augment_module
import streaming_ssl.cli.evaluate as evaluate
import streaming_ssl.cli.train as run_stream
from streaming_ssl import build
from streaming_ssl import checkpoint as ckpt
from streaming_ssl import provenance
from streaming_ssl.config import ConfigError, load_config
from streaming_ssl.device import cpu_kind
from streaming_ssl.objective import emp_ssl_loss
from streaming_ssl.probe import WEIGHT_DECAY_GRID

DATA = os.environ.get("STREAMING_SSL_DATA")
pytestmark = pytest.mark.skipif(not DATA or not (Path(DATA) / "cifar10.npz").is_file(),
                                reason="needs the real CIFAR-10: set STREAMING_SSL_DATA to the folder of cifar10.npz")


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """The real cifar10.npz plus a small CIFAR-100 in torchvision's pickled layout (for transfer)."""
    root = tmp_path_factory.mktemp("data")
    os.symlink((Path(DATA) / "cifar10.npz").resolve(), root / "cifar10.npz")
    folder = root / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 300), ("test", 200)):
        labels = (np.arange(n) % 100).tolist()
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        with open(folder / split, "wb") as fh:
            pickle.dump({b"data": data, b"fine_labels": labels, b"coarse_labels": [0] * n}, fh)
    with open(folder / "meta", "wb") as fh:
        pickle.dump({b"fine_label_names": [f"class{i}".encode() for i in range(100)]}, fh)
    return root


@pytest.fixture(scope="module")
def split_run(tmp_path_factory, data_root) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "split"
    rc = run_stream.main(["--config", "configs/smoke.yaml", f"run.out_dir={run_dir}", f"data.root={data_root}",
                          "eval.transfer=[cifar100]"])
    assert rc == 0
    return run_dir


def test_split_stream_writes_every_output(split_run: Path) -> None:
    rows = _rows(split_run)
    assert [r["experience"] for r in rows] == [0, 1, 2]
    assert [r["samples_seen"] for r in rows] == [160, 280, 400]  # 40 images x classes 4/3/3, each seen once
    assert rows[-1]["updates"] == 8 + 6 + 6  # ceil(160/20) + ceil(120/20) + ceil(120/20)
    matrix = [r["probe/acc_matrix_row"] for r in rows]
    assert len(matrix) == 3 and all(len(row) == 3 and all(0 <= a <= 1 for a in row) for row in matrix)
    # forgetting of experience j after t: max over earlier rows minus now, defined for j < t only
    for t, r in enumerate(rows):
        f = r["probe/forgetting"]
        for j in range(3):
            if j < t:
                best = max(matrix[s][j] for s in range(j, t))
                assert f[j] == pytest.approx(best - matrix[t][j], abs=1e-6)
            else:
                assert f[j] is None
        # backward transfer: mean over j < t of A[t, j] - A[j, j]; none after the first experience
        bwt = sum(matrix[t][j] - matrix[j][j] for j in range(t)) / t if t else None
        assert r["probe/bwt"] == (None if bwt is None else pytest.approx(bwt, abs=1e-6))
    assert all(0 <= r["transfer/cifar100"] <= 1 for r in rows)
    assert all(0 <= r["knn/acc_all"] <= 1 for r in rows)
    assert rows[0]["probe/acc_seen"] is not None and rows[-1]["probe/acc_seen"] == rows[-1]["probe/acc_all"]
    png = (split_run / "accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert list((split_run / "tb").glob("events.out.tfevents.*"))
    assert (split_run / "config.yaml").is_file() and load_config(split_run / "config.yaml").stream.n_experiences == 3
    assert ckpt.latest(split_run) is not None and (split_run / "ckpt.pt").resolve() == ckpt.latest(split_run).resolve()


def test_training_curves_are_logged_every_log_every_updates(split_run: Path) -> None:
    """train.jsonl: one row per train.log_every (5) updates, each the values of that very update (the loss is the
    objective of its coding rate and invariance, the learning rate the schedule's at that update); TensorBoard's
    train/* (tb/train) hold the same values at the same steps; train_curves.png draws them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from streaming_ssl.evaluation import boundary_updates
    from streaming_ssl.lars import cosine_lr

    cfg = load_config(split_run / "config.yaml")
    rows = [json.loads(line) for line in (split_run / "train.jsonl").read_text().splitlines()]
    assert [r["update"] for r in rows] == [5, 10, 15, 20]
    assert [r["experience"] for r in rows] == [0, 1, 2, 2]  # updates 1-8, 9-14, 15-20
    assert [r["samples_seen"] for r in rows] == [100, 200, 300, 400]
    for r in rows:
        assert {"loss", "tcr", "inv", "lr"} <= set(r)
        assert r["loss"] == pytest.approx(-r["tcr"] - cfg.objective.lam * r["inv"], rel=1e-5, abs=1e-4)
        o = cfg.optim
        assert r["lr"] == pytest.approx(cosine_lr(r["update"] - 1, 20, o.lr, warmup_steps=o.warmup_steps,
                                                  final_lr=o.final_lr))
    assert len({r["loss"] for r in rows}) == 4  # four updates' own values, not one repeated
    events = EventAccumulator(str(split_run / "tb" / "train"))
    events.Reload()
    for key in ("loss", "tcr", "inv", "lr"):
        scalars = events.Scalars(f"train/{key}")
        assert [s.step for s in scalars] == [5, 10, 15, 20]
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in rows], rel=1e-6)
    png = (split_run / "train_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # where an online stream's plot draws its parents' boundaries: the experiences of 160 and 120 images end after
    # updates 8 and 14, which the logged rows (every 5 updates) place exactly; an end past the rows is left out
    assert boundary_updates(rows, [160, 280, 500]) == [8, 14]


def test_log_txt_prints_each_evaluation_under_its_experience(split_run: Path) -> None:
    """Avalanche's TextLogger printed ProbeMetric's row under the next experience's header, and the last row never."""
    blocks = (split_run / "log.txt").read_text().split("-- Starting training on experience ")[1:]
    assert [int(b.split()[0]) for b in blocks] == [0, 1, 2]
    for t, block in enumerate(blocks):
        assert f"-- Evaluation after training experience {t} --" in block, block
        assert re.findall(r"\texperience = (\d+)", block) == [str(t)], block
        assert "probe/acc_matrix_row = [" in block


def test_train_log_names_each_experiences_classes(split_run: Path) -> None:
    """A[t, j] needs the classes of experience j: train.log lists them (the smoke split: 4, 3 and 3 classes)."""
    lines = re.findall(r"experience (\d): classes \[([\d, ]+)\] \(([^)]*)\)", (split_run / "train.log").read_text())
    classes = [[int(c) for c in ids.split(", ")] for _, ids, _ in lines]
    assert [int(j) for j, _, _ in lines] == [0, 1, 2] and [len(c) for c in classes] == [4, 3, 3]
    assert sorted(c for cs in classes for c in cs) == list(range(10))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert [n.split(", ") for _, _, n in lines] == [[names[c] for c in cs] for cs in classes]


def test_experience_classes_lines_of_data_incremental_and_large_experiences() -> None:
    from streaming_ssl.runner import experience_classes_lines

    assert experience_classes_lines([[2, 0, 1], [0, 1, 2]], ["a", "b", "c"]) == [
        "experiences (accuracy-matrix columns): 2, each of all 3 classes"]
    names = [f"c{i}" for i in range(42)]
    assert experience_classes_lines([list(range(21)), list(range(21, 42))], names)[1:] == [
        f"  experience 0: classes {list(range(21))}", f"  experience 1: classes {list(range(21, 42))}"]
    assert experience_classes_lines([[1], [0]], ["x", "y"])[1:] == ["  experience 0: classes [1] (y)",
                                                                   "  experience 1: classes [0] (x)"]


def test_resuming_a_complete_run_says_so_and_changes_no_result(split_run: Path, tmp_path: Path, caplog) -> None:
    run = tmp_path / "copy"
    shutil.copytree(split_run, run, symlinks=True)
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace(str(split_run), str(run)))
    rows, ckpts = _rows(run), sorted(p.name for p in run.glob("ckpt_*.pt"))
    with caplog.at_level("INFO"):
        assert run_stream.main(["--resume", str(run)]) == 0
    assert "the run is complete (all 3 experiences trained): nothing to train" in caplog.text
    assert _rows(run) == rows and sorted(p.name for p in run.glob("ckpt_*.pt")) == ckpts
    assert json.loads((run / "summary.json").read_text()) == rows[-1]
    # a start that trains nothing is no start of the run's training: run_info.jsonl keeps its one row
    assert (run / "run_info.jsonl").read_text() == (split_run / "run_info.jsonl").read_text()


def test_last_probe_beats_random_init(split_run: Path, data_root: Path, capsys) -> None:
    last = _rows(split_run)[-1]["probe/acc_all"]
    assert evaluate.main(["--checkpoint", str(split_run), "--data-root", str(data_root), "--train-per-class", "40",
                          "--test-per-class", "20", "--random-init"]) == 0
    floor = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["cifar10"]["linear"]
    assert last > floor + 0.03, (last, floor)
    # evaluate.py on the trained checkpoint reproduces the run's own last probe
    assert evaluate.main(["--checkpoint", str(split_run), "--data-root", str(data_root), "--train-per-class", "40",
                          "--test-per-class", "20"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["cifar10"]["linear"] == pytest.approx(last, abs=1e-6)
    # where the probe ran and where the run trained (run_info.jsonl's one start, on this machine too)
    (start,) = provenance.read_rows(split_run)
    assert result["trained_on"] == [provenance.label(start)] == [result["probed_on"]]
    assert start["machine"] == cpu_kind() and start["start_update"] == 0 and start["world_size"] == 1


def test_evaluate_extracts_features_in_the_memory_layout_the_run_used(split_run: Path, data_root: Path,
                                                                       monkeypatch, capsys) -> None:
    """The run's evaluations extract features channels_last (train.channels_last); under bf16 the layout changes
    the features (by up to 0.06 on a full-size run, 60.16% logged against 60.29% from evaluate.py), so
    evaluate.py extracts as the run did."""
    import streaming_ssl.probe_run as probe_run
    from streaming_ssl.config import config_from_dict

    real, layouts = probe_run.extract_features, []

    def extract(*args, **kwargs):
        layouts.append(kwargs["channels_last"])
        return real(*args, **kwargs)

    monkeypatch.setattr(probe_run, "extract_features", extract)
    assert evaluate.main(["--checkpoint", str(split_run), "--data-root", str(data_root), "--train-per-class", "4",
                          "--test-per-class", "2"]) == 0
    cfg = config_from_dict(ckpt.load(ckpt.latest(split_run))["config"])
    assert layouts and set(layouts) == {build.uses_channels_last(cfg, torch.device("cpu"))} == {True}


def test_evaluate_batch_size_and_out_of_memory(split_run: Path, data_root: Path, tmp_path: Path, monkeypatch,
                                               caplog, capsys) -> None:
    """--batch-size sets the feature-extraction batch (every convolution's input holds at most that many images);
    out of memory while probing (PyTorch's error, raised at the first convolution) exits 2 with the --batch-size
    to use, and writes nothing."""
    base = ["--checkpoint", str(split_run), "--data-root", str(data_root), "--train-per-class", "10",
            "--test-per-class", "5", "--probe-epochs", "2"]
    conv2d, sizes = torch.nn.functional.conv2d, []

    def counting(x, *args, **kwargs):
        sizes.append(x.shape[0])
        return conv2d(x, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv2d", counting)
    assert evaluate.main(base + ["--batch-size", "7"]) == 0
    assert max(sizes) == 7 and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["cifar10"]
    assert evaluate.main(base + ["--batch-size", "0"]) == 2

    def greedy(x, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB (raised by the test)")

    monkeypatch.setattr(torch.nn.functional, "conv2d", greedy)
    out = tmp_path / "result.json"
    with caplog.at_level("ERROR"):
        assert evaluate.main(base + ["--patches", "4", "--out", str(out)]) == 2
    err = caplog.records[-1].getMessage()
    assert err.startswith(f"ProbeOutOfMemory: out of memory on cpu while probing {ckpt.latest(split_run)}: CUDA "
                          "out of memory. Tried to allocate 3.00 GiB")
    assert "holds 256 images x 4 patches at once" in err and "--batch-size 64 (with --patches" in err
    assert not out.exists()


def test_evaluate_features_cache_and_selected_probe(split_run: Path, data_root: Path, tmp_path: Path,
                                                   capsys) -> None:
    """--features-cache reuses features only for the same key; --probe-select adds a held-out-chosen probe."""
    cache = tmp_path / "features"
    base = ["--checkpoint", str(split_run), "--data-root", str(data_root), "--train-per-class", "40",
            "--test-per-class", "20", "--features-cache", str(cache), "--patches", "2"]
    assert evaluate.main(base + ["--probe-select"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["cifar10"]
    files = sorted(cache.glob("*.pt"))
    assert [f.name.split("_")[:3] for f in files] == [["cifar10", "test", "p2"], ["cifar10", "train", "p2"]]
    sel = first["linear_selected"]
    assert 0 <= sel["accuracy"] <= 1 and len(sel["held_out_accuracy"]) == len(WEIGHT_DECAY_GRID)
    assert sel["held_out_accuracy"][str(sel["weight_decay"])] == max(sel["held_out_accuracy"].values())
    # cached: the same numbers, and the files are read, not rewritten
    stamps = [f.stat().st_mtime_ns for f in files]
    assert evaluate.main(base) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["cifar10"]
    assert again["linear"] == first["linear"] and [f.stat().st_mtime_ns for f in files] == stamps
    # another key (random init) gets its own files; a file whose stored key differs is recomputed, not trusted
    assert evaluate.main(base + ["--random-init"]) == 0
    capsys.readouterr()
    assert len(list(cache.glob("*.pt"))) == 4
    saved = torch.load(files[1], weights_only=True)
    torch.save({"key": saved["key"].replace('"patches": 2', '"patches": 3'), "features": saved["features"] * 0},
               files[1])
    assert evaluate.main(base) == 0
    redo = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["cifar10"]
    assert redo["linear"] == first["linear"]


def test_evaluate_features_cache_follows_the_weights(split_run: Path, data_root: Path, tmp_path: Path,
                                                    capsys) -> None:
    """A checkpoint rewritten in place (a run redone with --overwrite writes the same ckpt_*.pt names at the same
    update counts) gets features of its new weights, not the cached ones of the old."""
    ckpt_file = tmp_path / "ckpt.pt"
    state = torch.load(sorted(split_run.glob("ckpt_*.pt"))[-1], weights_only=True)
    torch.save(state, ckpt_file)
    cache = tmp_path / "features"
    args = ["--checkpoint", str(ckpt_file), "--data-root", str(data_root), "--train-per-class", "20",
            "--test-per-class", "10", "--probe-epochs", "2", "--features-cache", str(cache)]
    assert evaluate.main(args) == 0
    old = sorted(cache.iterdir())
    state["model"] = {k: v * 0.5 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, ckpt_file)
    assert evaluate.main(args) == 0
    capsys.readouterr()
    new = sorted(set(cache.iterdir()) - set(old))
    assert len(new) == 2, "the rewritten checkpoint reused the cached features of its old weights"
    assert not torch.equal(torch.load(new[0], weights_only=True)["features"],
                           torch.load([f for f in old if f.name.split("_")[1] == new[0].name.split("_")[1]][0],
                                      weights_only=True)["features"])


def test_evaluate_features_cache_follows_the_data(split_run: Path, data_root: Path, tmp_path: Path, capsys) -> None:
    """An npz rewritten in place (same name, shapes and counts, other pixels) gets features of its new pixels, not
    the cached ones of the old; unchanged data is read from the cache. Entries are named from the short name."""
    npz, cache, y = tmp_path / "digits.npz", tmp_path / "features", np.arange(24) % 3

    def write(seed: int) -> None:
        rng = np.random.default_rng(seed)
        np.savez(npz, x_train=rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8), y_train=y,
                 x_test=rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8), y_test=y[:12])

    def probe(folder: Path) -> dict:
        assert evaluate.main(["--checkpoint", str(split_run), "--data-root", str(data_root), "--no-in-domain",
                              "--transfer", f"npz:{npz}", "--probe-epochs", "2", "--features-cache", str(folder)]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    def features(folder: Path, split: str, among: list[Path] | None = None) -> torch.Tensor:
        (path,) = [f for f in (among or folder.iterdir()) if f.name.startswith(f"digits_{split}_")]
        return torch.load(path, weights_only=True)["features"]

    write(0)
    probe(cache)
    old = sorted(cache.iterdir())
    stamps = [f.stat().st_mtime_ns for f in old]
    probe(cache)  # the same data: read, not rewritten
    assert sorted(cache.iterdir()) == old and [f.stat().st_mtime_ns for f in old] == stamps
    write(1)
    assert probe(cache)["digits"]["train_images"] == 24
    new = sorted(set(cache.iterdir()) - set(old))
    assert len(new) == 2, "the rewritten npz reused the cached features of its old pixels"
    probe(tmp_path / "fresh")  # the new pixels' features, computed without any cached entry
    for split in ("train", "test"):
        assert torch.equal(features(cache, split, new), features(tmp_path / "fresh", split))
        assert not torch.allclose(features(cache, split, new), features(cache, split, old))
    assert all(f.parent == cache and f.name.split("_")[0] == "digits" for f in cache.iterdir())


def test_transfer_probes_need_no_training_data(split_run: Path, data_root: Path, tmp_path: Path, capsys,
                                              caplog) -> None:
    """The checkpoint keeps the training data's image size and normalisation: a transfer-only probe runs where the
    training data is not (the same result as where it is), and the model normalises as in training even when the
    training data now differs; a checkpoint without them (written before they were saved) still needs the data."""
    rng = np.random.default_rng(4)
    npz, y = tmp_path / "digits.npz", np.arange(24) % 3
    np.savez(npz, x_train=rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8), y_train=y,
             x_test=rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8), y_test=y[:12])
    nothing = tmp_path / "no_data"
    nothing.mkdir()
    ckpt_file = tmp_path / "ckpt.pt"
    state = torch.load(sorted(split_run.glob("ckpt_*.pt"))[-1], weights_only=True)
    trained = build.TrainingData.of(build.load_splits(load_config(None, [f"data.root={data_root}"])))
    assert build.TrainingData.from_state(state["data"]) == trained and trained.name == "cifar10"

    def transfer(checkpoint: Path, root: Path) -> tuple[int, dict | None]:
        rc = evaluate.main(["--checkpoint", str(checkpoint), "--data-root", str(root), "--no-in-domain",
                            "--transfer", f"npz:{npz}", "--probe-epochs", "2"])
        out = capsys.readouterr().out.strip().splitlines()
        return rc, ({k: v for k, v in json.loads(out[-1])["digits"].items() if k != "seconds"} if rc == 0 else None)

    rc, alone = transfer(split_run, nothing)
    assert rc == 0 and alone["train_images"] == 24
    assert transfer(split_run, data_root) == (0, alone)  # with the training data at hand: the same features
    torch.save({k: v for k, v in state.items() if k != "data"}, ckpt_file)  # a checkpoint from before
    assert transfer(ckpt_file, nothing)[0] == 2 and "cifar10" in capsys.readouterr().err + caplog.text
    from streaming_ssl.probe_run import load_checkpoint_model

    state["data"] = {**state["data"], "mean": [0.25, 0.5, 0.75]}  # as if the data had changed since the run
    torch.save(state, ckpt_file)
    with caplog.at_level("WARNING", logger="streaming_ssl.probe_run"):
        run = load_checkpoint_model(ckpt_file, data_root=str(data_root), device="cpu")
    assert run.augment.mean.flatten().tolist() == [0.25, 0.5, 0.75] and run.train_splits is not None
    assert "is not what the run trained on" in caplog.text
    if not torch.cuda.is_available():  # from Python the error names the argument, not evaluate.py's flag
        with pytest.raises(ConfigError, match=r"^device is 'cuda' but no CUDA device is visible; use device=cpu"):
            load_checkpoint_model(ckpt_file, data_root=str(data_root), device="cuda")


def test_evaluate_bn_recalibrate(split_run: Path, data_root: Path, tmp_path: Path, capsys) -> None:
    """--bn-recalibrate probes with re-estimated statistics, caches those features apart, and leaves the
    checkpoint on disk as it was."""
    cache = tmp_path / "features"
    path = ckpt.latest(split_run)
    before = path.read_bytes()
    base = ["--checkpoint", str(split_run), "--data-root", str(data_root), "--train-per-class", "40",
            "--test-per-class", "20", "--features-cache", str(cache), "--transfer", "cifar100"]
    assert evaluate.main(base) == 0
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluate.main(base + ["--bn-recalibrate", "64"]) == 0
    out = capsys.readouterr().out
    recal = json.loads(out.strip().splitlines()[-1])
    assert "BatchNorm re-estimated on 64 images" in out and recal["bn_recalibrate"] == 64
    assert len(list(cache.glob("*.pt"))) == 8  # 2 datasets x train/test, with and without re-estimation
    for name in ("cifar10", "cifar100"):
        assert 0 <= recal[name]["linear"] <= 1
    # the features differ from the stored statistics' (the stream's last batches were augmented patches)
    feats = {}
    for f in cache.glob("cifar10_train_*.pt"):
        saved = torch.load(f, weights_only=True)
        feats["bn_recalibrate" in saved["key"]] = saved["features"]
    assert not torch.allclose(feats[True], feats[False])
    assert path.read_bytes() == before and plain["cifar10"]["linear"] == pytest.approx(
        _rows(split_run)[-1]["probe/acc_all"], abs=1e-6)


def test_same_seed_same_metrics(split_run: Path, data_root: Path, tmp_path: Path) -> None:
    rc = run_stream.main(["--config", "configs/smoke.yaml", f"run.out_dir={tmp_path / 'again'}",
                          f"data.root={data_root}", "eval.transfer=[cifar100]"])
    assert rc == 0
    assert _without_time(_rows(tmp_path / "again")) == _without_time(_rows(split_run))
    a = ckpt.load(ckpt.latest(split_run))["model"]
    b = ckpt.load(ckpt.latest(tmp_path / "again"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_recompute_bn_relu_trains_the_same_stream(split_run: Path, data_root: Path, tmp_path: Path) -> None:
    """model.recompute_bn_relu=true reaches the model through the config and changes memory only: the same metrics
    and the same weights, bit for bit."""
    run_dir = tmp_path / "lean"
    rc = run_stream.main(["--config", "configs/smoke.yaml", f"run.out_dir={run_dir}", f"data.root={data_root}",
                          "eval.transfer=[cifar100]", "model.recompute_bn_relu=true"])
    assert rc == 0
    cfg = load_config(run_dir / "config.yaml")
    assert cfg.model.recompute_bn_relu
    blocks = [b for stage in build.build_model(cfg, "cifar").backbone.stages for b in stage]
    assert blocks and all(b.recompute_bn_relu for b in blocks)
    assert _without_time(_rows(run_dir)) == _without_time(_rows(split_run))
    a = ckpt.load(ckpt.latest(split_run))["model"]
    b = ckpt.load(ckpt.latest(run_dir))["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_compiled_training_runs_the_stream(split_run: Path, data_root: Path, tmp_path: Path) -> None:
    """train.compile=true and augment.compile=true train the stream through torch.compile (graphs are captured) and
    checkpoint the plain model. The backend is aot_eager (dynamo and AOT autograd capture the very graphs inductor
    would get, in seconds instead of a minute of code generation on a cold CPU machine); inductor's numerics are
    checked in test_models.py and test_augment.py (20 updates amplify rounding, so runs are not compared)."""
    import torch._dynamo

    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    run_dir = tmp_path / "compiled"
    rc = run_stream.main(["--config", "configs/smoke.yaml", f"run.out_dir={run_dir}", f"data.root={data_root}",
                          "train.compile=true", "augment.compile=true", "train.compile_backend=aot_eager"])
    assert rc == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs
    # the augmentation ran compiled: dynamo holds a compiled entry for its frame (none after the reset above)
    assert torch._dynamo.eval_frame._debug_get_cache_entry_list(augment_module._patches_from_uniforms)
    log_text = (run_dir / "train.log").read_text()
    assert "train.compile: the training forward is compiled (aot_eager)" in log_text
    assert "augment.compile: the augmentation is compiled (aot_eager)" in log_text
    e, c = _rows(split_run), _rows(run_dir)
    assert [r["updates"] for r in c] == [r["updates"] for r in e]
    assert all(0 <= r["probe/acc_all"] <= 1 for r in c)
    # the checkpoint is the plain model's (no torch.compile wrapper keys) and loads into an eager model
    state = ckpt.load(ckpt.latest(run_dir))["model"]
    assert not any("_orig_mod" in k for k in state)
    build.build_model(load_config(run_dir / "config.yaml"), "cifar").load_state_dict(state)


def test_refuses_non_empty_run_dir(split_run: Path, data_root: Path) -> None:
    before = sorted(p.name for p in split_run.iterdir())
    assert run_stream.main(["--config", "configs/smoke.yaml", f"run.out_dir={split_run}", f"data.root={data_root}"]) == 2
    assert sorted(p.name for p in split_run.iterdir()) == before


def test_offline_run_lowers_the_loss(tmp_path: Path, data_root: Path) -> None:
    run_dir = tmp_path / "offline"
    rc = run_stream.main(["--config", "configs/smoke.yaml", f"run.out_dir={run_dir}", f"data.root={data_root}",
                          "stream.mode=offline", "stream.epochs=3", "eval.knn_k=0", "run.tensorboard=false"])
    assert rc == 0
    rows = _rows(run_dir)
    assert len(rows) == 1 and rows[0]["updates"] == 3 * 20 and rows[0]["samples_seen"] == 3 * 400
    cfg = load_config(run_dir / "config.yaml")
    splits = build.load_splits(cfg)
    train = build.per_class_subset(splits.train, cfg.data.train_per_class)
    augment = build.build_augment(cfg, splits)

    def mean_loss(model) -> float:
        model.train()
        gen = torch.Generator().manual_seed(123)
        losses = []
        with torch.no_grad():
            for b in range(4):
                x = augment(train.images[b * 100:(b + 1) * 100], gen)
                losses.append(float(emp_ssl_loss(model(x)[1], cfg.augment.n_patches)[0]))
        return sum(losses) / len(losses)

    torch.manual_seed(cfg.train.seed)
    init = build.build_model(cfg, "cifar")
    trained = build.build_model(cfg, "cifar")
    trained.load_state_dict(ckpt.load(ckpt.latest(run_dir))["model"])
    assert mean_loss(trained) < mean_loss(init) - 1.0


def test_float16_run_counts_its_skipped_updates_and_resumes_exactly(data_root: Path, tmp_path: Path,
                                                                     dies_after) -> None:
    """train.precision=fp16 trains with dynamic loss scaling: the checkpoints carry the scale and its growth count, so
    a run that fails after its first checkpoint and is resumed ends as the uninterrupted one does (rows, weights and
    scaler state), and the rows count the updates the scaling skipped."""
    from streaming_ssl.strategy import FLOAT16_INIT_SCALE

    args = ["--config", "configs/smoke.yaml", f"data.root={data_root}", "train.precision=fp16",
            "data.train_per_class=10", "data.test_per_class=5", "eval.probe_epochs=2", "run.checkpoint_every=2",
            "run.keep_last=50", "run.tensorboard=false", "run.plot=false", "train.deterministic=true"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_stream.main([*args, f"run.out_dir={full}"]) == 0
    saved = {int(p.stem.split("_")[1]): ckpt.load(p) for p in full.glob("ckpt_*.pt")}
    assert sorted(saved) == [2, 4, 6] and all(s["grad_scaler"] for s in saved.values())
    # the resume point's scaler is not a fresh one, and nothing resets it before the next checkpoint: a resume that
    # forgot it would go on with another growth count
    at2, at4 = saved[2]["grad_scaler"], saved[4]["grad_scaler"]
    assert (at2["scale"], at2["_growth_tracker"]) != (FLOAT16_INIT_SCALE, 0)
    assert at4["scale"] == at2["scale"] and at4["_growth_tracker"] == at2["_growth_tracker"] + 2
    rows = _rows(full)
    # each skip halved the scale, and under 2000 updates it never grew back: the count is the number of halvings
    halvings = math.log2(FLOAT16_INIT_SCALE / saved[6]["grad_scaler"]["scale"])
    assert rows[-1]["compute/skipped_updates"] == saved[6]["counters"]["skipped_updates"] == halvings

    dies_after(3, run_stream.main, [*args, f"run.out_dir={part}"])
    assert ckpt.load(ckpt.latest(part))["position"]["global_step"] == 2
    assert run_stream.main([*args, "--resume", str(part)]) == 0
    assert _without_time(_rows(part)) == _without_time(rows)
    a, b = ckpt.load(ckpt.latest(full)), ckpt.load(ckpt.latest(part))
    assert a["grad_scaler"] == b["grad_scaler"] and a["counters"] == b["counters"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # probed on a CPU (evaluate.py), the fp16 run's features are computed in precision auto: float16 is emulated there
    from streaming_ssl.device import resolve_precision
    from streaming_ssl.probe_run import load_checkpoint_model

    run = load_checkpoint_model(full, data_root=str(data_root), device="cpu")
    assert run.amp_dtype == resolve_precision("auto", torch.device("cpu")) and run.amp_dtype != torch.float16
