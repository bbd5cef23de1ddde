"""Every bad input gives one clear error naming the problem and the fix, and damages nothing saved.

Each case runs the real CLI (run_stream.main or evaluate.main) and checks the exit code 2, the
message, and that the finished run used by several cases is byte-for-byte unchanged afterwards.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import streaming_ssl.cli.evaluate as evaluate
import streaming_ssl.cli.train as run_stream
from streaming_ssl import checkpoint as ckpt

DATA = os.environ.get("STREAMING_SSL_DATA")
pytestmark = pytest.mark.skipif(not DATA or not (Path(DATA) / "cifar10.npz").is_file(),
                                reason="needs the real CIFAR-10: set STREAMING_SSL_DATA to the folder of cifar10.npz")
REPO = Path(__file__).resolve().parents[1]
TINY = ["data.train_per_class=10", "data.test_per_class=5", "stream.n_experiences=2", "eval.probe_epochs=2",
        "run.tensorboard=false", "eval.knn_k=3"]


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture(scope="module")
def good_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("good") / "run"
    assert run_stream.main(["--config", "configs/smoke.yaml", f"run.out_dir={run_dir}",
                            f"data.root={Path(DATA).resolve()}", *TINY]) == 0
    return run_dir


def _npz_root(tmp: Path, **changes) -> Path:
    root = tmp / "npzroot"
    root.mkdir()
    real = np.load(Path(DATA) / "cifar10.npz")
    arrays = {k: real[k][:200] if k != "class_names" else real[k] for k in real.files}
    arrays.update(changes)
    np.savez(root / "cifar10.npz", **arrays)
    return root


def _truncated_npz(tmp: Path) -> Path:
    root = tmp / "trunc"
    root.mkdir()
    (root / "cifar10.npz").write_bytes((Path(DATA) / "cifar10.npz").open("rb").read(1_000_000))
    return root


def _nan_npz(tmp: Path) -> Path:
    x = np.full((200, 32, 32, 3), 0.5, dtype=np.float32)
    x[3, 4, 5, 0] = np.nan
    return _npz_root(tmp, x_train=x)


def _bad_cifar_batch(tmp: Path) -> Path:
    folder = tmp / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": np.zeros((10, 1000), np.uint8), b"labels": [0] * 10}, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, fh)
    return tmp


def _tiny_without_val(tmp: Path) -> Path:
    base = tmp / "tiny-imagenet-200"
    (base / "train" / "n01").mkdir(parents=True)
    (base / "wnids.txt").write_text("n01\n")
    (base / "val" / "images").mkdir(parents=True)
    return tmp


def _imagenet_missing_classes(tmp: Path) -> Path:
    for split in ("train", "val"):
        (tmp / "imagenet" / split / "n01440764").mkdir(parents=True)
    return tmp


def _label_free_cifar100(tmp: Path) -> Path:
    root = tmp / "c100"
    root.mkdir()
    os.symlink((Path(DATA) / "cifar10.npz").resolve(), root / "cifar10.npz")
    x = np.zeros((100, 32, 32, 3), np.uint8)
    np.savez(root / "cifar100.npz", x_train=x, x_test=x, class_names=np.array([f"c{i}" for i in range(100)]))
    return root


def _runs(tmp: Path, *overrides: str, root: Path | None = None) -> int:
    return run_stream.main(["--config", "configs/smoke.yaml", f"run.out_dir={tmp / 'out'}",
                            f"data.root={(root or Path(DATA)).resolve()}", *TINY, *overrides])


def _evaluates(tmp: Path, good: Path, *args: str) -> int:
    """evaluate.py on the good run, caching features in tmp/out: a probe that ran (the in-domain one comes first)
    would have created that folder, so the case's check that it does not exist says nothing was probed."""
    return evaluate.main(["--checkpoint", str(good), "--train-per-class", "5", "--test-per-class", "2",
                          "--probe-epochs", "1", "--features-cache", str(tmp / "out"), *args])


def _two_named_digits(tmp: Path) -> tuple[str, str]:
    """folder:A/digits and npz:B/digits.npz, two small valid sources (2 classes) with the same short name."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = tmp / "a" / "digits"
    for split in ("train", "test"):
        for c in ("c0", "c1"):
            (folder / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / split / c / f"{i}.png")
    npz = tmp / "b" / "digits.npz"
    npz.parent.mkdir()
    y = np.array([0, 1, 0, 1])
    np.savez(npz, x_train=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), y_train=y,
             x_test=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), y_test=y)
    return f"folder:{folder}", f"npz:{npz}"


def _result_field_folder(tmp: Path) -> str:
    """folder:T/updates: its probe would be reported as 'updates', a field of evaluate.py's result."""
    for split in ("train", "test"):
        (tmp / "updates" / split / "c0").mkdir(parents=True)
    return f"folder:{tmp / 'updates'}"


CASES = {
    "unknown key": (lambda t, g: _runs(t, "train.batchsize=8"), r"unknown config key 'train.batchsize'.*Did you mean 'train.batch_size'"),
    "unknown section": (lambda t, g: _runs(t, "trian.seed=1"), r"unknown config key 'trian'.*Did you mean 'train'"),
    "wrong type": (lambda t, g: _runs(t, "train.batch_size=many"), r"train.batch_size: expected int, got 'many'"),
    "bool expected": (lambda t, g: _runs(t, "train.channels_last=3"), r"train.channels_last: expected bool"),
    "patches < 2": (lambda t, g: _runs(t, "augment.n_patches=1"), r"augment.n_patches: must be >= 2"),
    "batch < 2": (lambda t, g: _runs(t, "train.batch_size=1"), r"train.batch_size: must be >= 2"),
    "eps2 <= 0": (lambda t, g: _runs(t, "objective.eps2=0"), r"objective.eps2: must be > 0"),
    "negative lr": (lambda t, g: _runs(t, "optim.lr=-0.1"), r"optim.lr: must be >= 0"),
    "probability > 1": (lambda t, g: _runs(t, "augment.flip_p=1.5"), r"augment.flip_p: is a probability"),
    "unknown dataset": (lambda t, g: _runs(t, "data.dataset=cifar1O"), r"data.dataset: unknown value 'cifar1O'.*Did you mean 'cifar10'"),
    "unknown arch": (lambda t, g: _runs(t, "model.arch=resnet50"), r"model.arch: unknown value 'resnet50'.*Valid: resnet18"),
    "unknown transfer": (lambda t, g: _runs(t, "eval.transfer=[svhn]"), r"eval.transfer\[0\]: unknown value 'svhn'"),
    "negative eval.bn_recalibrate": (lambda t, g: _runs(t, "eval.bn_recalibrate=-3"),
                                     r"eval.bn_recalibrate: must be a number of images >= 0.*-3"),
    "epochs in a stream": (lambda t, g: _runs(t, "stream.epochs=3"), r"epochs must be 1 in mode 'class_incremental'"),
    "split not covering classes": (lambda t, g: _runs(t, "stream.classes_per_experience=[3,3]"),
                                   r"sums to 6, but the dataset has 10 classes"),
    "explicit classes missing some": (lambda t, g: _runs(t, "stream.experience_classes=[[0,1],[2,3]]"),
                                      r"must list every class.*missing \[4, 5, 6, 7, 8, 9\]"),
    "missing config file": (lambda t, g: run_stream.main(["--config", str(t / "nope.yaml")]), r"config file .*nope.yaml' not found"),
    "missing data root": (lambda t, g: _runs(t, root=t / "nowhere"), r"nowhere"),
    "truncated npz": (lambda t, g: _runs(t, root=_truncated_npz(t)), r"truncated or corrupted"),
    "NaN in input data": (lambda t, g: _runs(t, root=_nan_npz(t)), r"NaN"),
    "CIFAR batch of wrong shape": (lambda t, g: _runs(t, root=_bad_cifar_batch(t)), r"data_batch_1.*\(10, 1000\)|3072"),
    "Tiny ImageNet without val annotations": (lambda t, g: _runs(t, "data.dataset=tinyimagenet", root=_tiny_without_val(t)),
                                              r"val_annotations.txt"),
    "ImageNet-100 missing classes": (lambda t, g: _runs(t, "data.dataset=imagenet100", root=_imagenet_missing_classes(t)),
                                     r"99 of the 100 ImageNet-100 classes|missing"),
    "transfer dataset without labels": (lambda t, g: _runs(t, "eval.transfer=[cifar100]", root=_label_free_cifar100(t)),
                                        r"y_train"),
    "run dir not empty": (lambda t, g: run_stream.main(["--config", "configs/smoke.yaml", f"run.out_dir={g}"]),
                          r"is not empty; pass --resume"),
    "overwrite, then the data is missing": (lambda t, g: run_stream.main(["--config", "configs/smoke.yaml", "--overwrite",
                                                                         f"run.out_dir={g}", f"data.root={t / 'nowhere'}"]),
                                           r"nowhere"),
    "resume with another config": (lambda t, g: run_stream.main(["--resume", str(g), "optim.lr=0.1"]),
                                   r"different config.*optim.lr.*--resume \S+, no overrides; with --auto-resume: the "
                                   r"run.s own config and overrides"),
    "resume a folder that is no run": (lambda t, g: run_stream.main(["--resume", str(t)]), r"no config.yaml"),
    "run.out_dir is a file": (lambda t, g: _runs(t, f"run.out_dir={g / 'config.yaml'}"),
                              r"run.out_dir '\S*config.yaml' cannot be a run directory: '\S*config.yaml' is a file"),
    "run.out_dir inside a file": (lambda t, g: _runs(t, f"run.out_dir={g / 'config.yaml' / 'run'}"),
                                  r"run.out_dir '\S*config.yaml/run' cannot be .*: '\S*config.yaml' is a file, not a "
                                  r"folder; choose another run.out_dir"),
    "resume and overwrite at once": (lambda t, g: run_stream.main(["--resume", str(g), "--overwrite"]),
                                     r"continues that run and --overwrite deletes it: pass one of them"),
    "truncated checkpoint": (lambda t, g: evaluate.main(["--checkpoint", str(_truncated_ckpt(t, g))]),
                             r"truncated or corrupted.*earlier ckpt_"),
    "not a checkpoint": (lambda t, g: evaluate.main(["--checkpoint", str(_foreign_ckpt(t))]), r"not a streaming-ssl checkpoint"),
    "negative BatchNorm re-estimation": (lambda t, g: evaluate.main(["--checkpoint", str(g), "--bn-recalibrate", "-5"]),
                                         r"--bn-recalibrate takes a number of images >= 0.*-5"),
    "checkpoint of another width": (lambda t, g: run_stream.main(["--resume", str(_other_width_run(t, g))]),
                                    r"does not fit this model \(first shape mismatch"),
    "two transfer datasets of one name": (lambda t, g: _runs(t, f"eval.transfer=[{','.join(_two_named_digits(t))}]"),
                                          r"eval.transfer\[1\]: 'npz:\S*digits.npz' and 'folder:\S*digits' would "
                                          r"both be reported as transfer/digits.*rename one folder or .npz file"),
    # evaluate.py checks every argument before it probes anything (_evaluates: no features were extracted)
    "evaluate: nothing to probe": (lambda t, g: _evaluates(t, g, "--no-in-domain"),
                                   r"--no-in-domain without --transfer leaves nothing to probe: add --transfer"),
    "evaluate: unknown --transfer": (lambda t, g: _evaluates(t, g, "--transfer", "svhn"),
                                     r"--transfer: unknown value 'svhn'. Valid: cifar10"),
    "evaluate: missing --transfer folder": (lambda t, g: _evaluates(t, g, "--transfer", f"folder:{t / 'svhn'}"),
                                            r"--transfer folder:\S*svhn: \S*svhn does not exist; give the path of an "
                                            r"image folder"),
    "evaluate: missing --transfer npz": (lambda t, g: _evaluates(t, g, "--transfer", f"npz:{t / 'digits.npz'}"),
                                         r"--transfer npz:\S*digits.npz: \S*digits.npz does not exist; give the path "
                                         r"of an .npz file"),
    "evaluate: unknown --dataset": (lambda t, g: _evaluates(t, g, "--dataset", "cifar1O"),
                                    r"--dataset: unknown value 'cifar1O'. Did you mean 'cifar10'"),
    "evaluate: --out in a missing folder": (lambda t, g: _evaluates(t, g, "--out", str(t / "nowhere" / "r.json")),
                                            r"--out \S*r.json: the folder \S*nowhere does not exist; create it"),
    "evaluate: two transfer datasets of one name": (lambda t, g: _evaluates(t, g, "--transfer", *_two_named_digits(t)),
                                                    r"--transfer folder:\S*digits and --transfer npz:\S*digits.npz "
                                                    r"would both be reported as 'digits'.*rename one folder"),
    "evaluate: transfer named like a result field": (
        lambda t, g: _evaluates(t, g, "--transfer", _result_field_folder(t)),
        r"reported as 'updates', a field of the result.*rename the folder"),
    "evaluate: transfer probed in-domain already": (lambda t, g: _evaluates(t, g, "--transfer", "CIFAR-10"),
                                                    r"data.dataset cifar10 and --transfer CIFAR-10 would both be "
                                                    r"reported as 'cifar10'.*drop it from --transfer"),
    "evaluate: no training image": (lambda t, g: _evaluates(t, g, "--train-per-class", "0"),
                                    r"--train-per-class takes a number of images per class >= 1.*got 0"),
    "evaluate: negative test images": (lambda t, g: _evaluates(t, g, "--test-per-class", "-3"),
                                       r"--test-per-class takes a number of images per class >= 1.*got -3"),
    "evaluate: no probe epoch": (lambda t, g: _evaluates(t, g, "--probe-epochs", "0"),
                                 r"--probe-epochs takes a number of epochs >= 1.*eval.probe_epochs\), got 0"),
    "evaluate: negative patches": (lambda t, g: _evaluates(t, g, "--patches", "-1"),
                                   r"--patches takes a number of patches >= 0 \(0: whole-image features.*got -1"),
}
if not torch.cuda.is_available():
    CASES["CUDA asked for, none visible"] = (lambda t, g: _runs(t, "train.device=cuda"),
                                             r"train.device is 'cuda' but no CUDA device is visible; use train.device=cpu")
    CASES["evaluate: --device cuda, none visible"] = (lambda t, g: _evaluates(t, g, "--device", "cuda"),
                                                      r"--device is 'cuda' but no CUDA device is visible; use --device "
                                                      r"cpu or --device auto")


def _truncated_ckpt(tmp: Path, good: Path) -> Path:
    src = ckpt.latest(good)
    out = tmp / src.name
    out.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return out


def _foreign_ckpt(tmp: Path) -> Path:
    out = tmp / "weights.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, out)
    return out


def _other_width_run(tmp: Path, good: Path) -> Path:
    """A copy of the good run whose config says width 0.25 while its checkpoints hold width 0.125."""
    copy = tmp / "copy"
    shutil.copytree(good, copy, symlinks=True)
    text = (copy / "config.yaml").read_text().replace("width: 0.125", "width: 0.25")
    (copy / "config.yaml").write_text(text.replace(str(good), str(copy)))
    return copy


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_clear_error(name: str, tmp_path: Path, good_run: Path, caplog) -> None:
    before = _digest(good_run)
    action, pattern = CASES[name]
    with caplog.at_level("ERROR"):
        rc = action(tmp_path, good_run)
    assert rc == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1, errors
    import re

    assert re.search(pattern, errors[0], re.S), errors[0]
    assert _digest(good_run) == before
    assert not (tmp_path / "out").exists()  # nothing is created before the inputs are known to be good


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path, caplog) -> None:
    run_dir = tmp_path / "out"
    with caplog.at_level("ERROR"):
        # the schedule starts at lr 0 (a good first checkpoint), then explodes
        rc = _runs(tmp_path, "optim.lr=0", "optim.final_lr=1e30", "optim.clip=false", "optim.eta=1e30",
                   "run.checkpoint_every=1")
    assert rc == 2
    msg = " ".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert "non-finite" in msg and "at update" in msg and "last checkpoint is intact" in msg
    last = ckpt.load(ckpt.latest(run_dir))  # loads fine: weights_only, complete
    assert last["position"]["global_step"] >= 1
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_a_non_finite_optimizer_state_is_never_saved(tmp_path: Path, monkeypatch, caplog) -> None:
    """The weights are still finite after the update that breaks the momentum: the check before a save covers the
    optimizer's state too (and the plugins'), so the checkpoint a resume would start from is the last good one."""
    from streaming_ssl.lars import LARS

    real_step, steps = LARS.step, {"n": 0}

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        steps["n"] += 1
        if steps["n"] == 2:  # one momentum buffer goes NaN; the parameters it would move next are still finite
            next(iter(self.state.values()))["momentum_buffer"].fill_(float("nan"))
        return out

    monkeypatch.setattr(LARS, "step", step)
    with caplog.at_level("ERROR"):
        rc = _runs(tmp_path, "run.checkpoint_every=1")
    assert rc == 2
    msg = " ".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert "training state became non-finite at update 2 (first: optimizer." in msg, msg
    assert "last checkpoint is intact" in msg
    last = ckpt.load(ckpt.latest(tmp_path / "out"))
    assert last["position"]["global_step"] == 1
    assert not ckpt.nonfinite_names({"model": last["model"], "optimizer": last["optimizer"]["state"]})


def test_a_plugin_state_a_checkpoint_cannot_load_is_refused_when_saved(tmp_path: Path, monkeypatch, caplog) -> None:
    """A plugin whose state_dict() holds a numpy scalar: torch.save writes it, but torch.load(weights_only=True)
    refuses it, so every later checkpoint would be unloadable by --resume and evaluate.py. It is refused at the
    save that would hold it, naming the value and its type; the checkpoint before stays loadable."""
    import numpy as np

    from streaming_ssl.cl.replay import ReplayBufferPlugin

    real_state_dict, calls = ReplayBufferPlugin.state_dict, {"n": 0}

    def state_dict(self):
        calls["n"] += 1
        return {**real_state_dict(self), **({"note": np.float64(0.5)} if calls["n"] >= 2 else {})}

    monkeypatch.setattr(ReplayBufferPlugin, "state_dict", state_dict)
    with caplog.at_level("ERROR"):
        rc = _runs(tmp_path, "run.checkpoint_every=1", "cl.replay.policy=reservoir", "cl.replay.size=8",
                   "cl.replay.batch=4")
    assert rc == 2
    msg = " ".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert "plugins.cl.replay.note (numpy.float64)" in msg and "cannot load safely" in msg, msg
    assert "last checkpoint is intact" in msg
    last = ckpt.load(ckpt.latest(tmp_path / "out"))  # weights_only: the one before loads
    assert last["position"]["global_step"] == 1 and "note" not in last["plugins"]["cl.replay"]


def test_each_metrics_row_is_on_disk_before_the_checkpoint_that_counts_it(tmp_path: Path, monkeypatch) -> None:
    """A checkpoint says how many metrics.jsonl rows it covers, and a resume keeps that many: a row still in the
    page cache when the machine died would be lost for good. Each row is fsynced before the next checkpoint."""
    real_fsync, events = os.fsync, []

    def fsync(fd):
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) if os.path.exists(f"/proc/self/fd/{fd}") else "?"
        events.append(name)
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert _runs(tmp_path) == 0
    rows = len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines())
    # each experience: a checkpoint before its evaluation, its row, then the checkpoint that counts the row
    # (each written to a temporary name, then renamed)
    kinds = ["row" if name == "metrics.jsonl" else "ckpt" for name in events
             if name == "metrics.jsonl" or name.lstrip(".").startswith("ckpt_")]
    assert rows == 2 and kinds == ["ckpt", "row", "ckpt"] * rows, events


def test_atomic_save_keeps_the_old_file_when_the_disk_is_full(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "ckpt_000000001.pt"
    ckpt.atomic_save({"format": ckpt.FORMAT_VERSION, "model": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()

    def full_disk(obj, fh, *a, **k):
        fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError):
        ckpt.atomic_save({"format": ckpt.FORMAT_VERSION, "model": {"w": torch.zeros(3)}}, path)
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_disk_full_during_a_run_names_the_fix(tmp_path: Path, monkeypatch, caplog) -> None:
    calls = {"n": 0}
    real = ckpt.atomic_save

    def fail_second(obj, path):
        calls["n"] += 1
        if calls["n"] >= 2:
            raise OSError(28, "No space left on device")
        real(obj, path)

    monkeypatch.setattr(ckpt, "atomic_save", fail_second)
    with caplog.at_level("ERROR"):
        rc = _runs(tmp_path, "run.checkpoint_every=1")
    assert rc == 2
    msg = " ".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert "No space left on device" in msg and "previous checkpoints are intact" in msg and "--resume" in msg
    assert ckpt.load(ckpt.latest(tmp_path / "out"))["position"]["global_step"] == 1


def test_a_checkpoint_cut_short_by_the_file_system_names_the_fix(tmp_path: Path) -> None:
    """A real short write (the process's file-size limit, as a full disk cuts a file short): torch.save's zip writer
    reports it as a RuntimeError ("unexpected pos"), not an OSError. The run still ends with exit 2 and the message
    with the fix, keeps the row it had written, and leaves no partial checkpoint or temporary file."""
    import resource

    run_dir = tmp_path / "out"

    def file_size_limit() -> None:  # the smoke model's checkpoint is about 1.8 MB; logs and rows stay far below
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))

    proc = subprocess.run([sys.executable, "run_stream.py", "--config", "configs/smoke.yaml", f"run.out_dir={run_dir}",
                           f"data.root={Path(DATA).resolve()}", *TINY], cwd=REPO, preexec_fn=file_size_limit,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert "CheckpointWriteError: could not write a checkpoint into" in err and "MB free there" in err, err
    assert "may write files of at most 1.0 MB (its file-size limit, ulimit -f)" in err, err
    assert err.endswith(f"python run_stream.py --resume {run_dir}")
    # the first write (before the first evaluation) failed: no checkpoint, no temporary file, no row
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "config.yaml", "log.txt", "run_info.jsonl",
                                                         "train.log"]


def test_ctrl_c_saves_and_exits_cleanly(zygote, tmp_path: Path) -> None:
    """SIGINT (Ctrl-C) to a training process (forked with the imports done, tests/zygote.py): it finishes the
    update, saves, names the --resume command and exits 130, leaving no temporary file."""
    run_dir, log = tmp_path / "out", tmp_path / "run.log"
    argv = ["--config", str(REPO / "configs/smoke.yaml"), f"run.out_dir={run_dir}", f"data.root={Path(DATA).resolve()}",
            "run.checkpoint_every=2", "run.tensorboard=false", "eval.probe_epochs=2"]
    pid = zygote.start(argv, log)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and not (run_dir / "ckpt_000000002.pt").exists():
            assert zygote.running(pid), log.read_text(errors="replace")[-2000:]
            time.sleep(0.01)
        os.kill(pid, signal.SIGINT)
        rc = zygote.wait(pid, 120)
    finally:
        zygote.kill(pid)
    err = log.read_text(errors="replace")
    assert rc == 130, err[-2000:]
    assert "continue with: python run_stream.py --resume" in err
    state = ckpt.load(ckpt.latest(run_dir))
    assert 2 <= state["position"]["global_step"] < 20
    assert not list(run_dir.glob("*.tmp"))


@pytest.mark.parametrize("cli", ["run_stream.py", "evaluate.py"])
def test_unknown_allocator_is_refused_by_the_cli(cli: str, tmp_path: Path, good_run: Path) -> None:
    """STREAMING_SSL_ALLOCATOR is read before any work: a bad value exits 2 naming the valid ones."""
    before = _digest(good_run)
    args = (["--config", "configs/smoke.yaml", f"run.out_dir={tmp_path / 'out'}", f"data.root={Path(DATA).resolve()}"]
            if cli == "run_stream.py" else ["--checkpoint", str(good_run), "--device", "cpu"])
    env = {**os.environ, "STREAMING_SSL_ALLOCATOR": "mimalloc"}
    env.pop("STREAMING_SSL_ALLOCATOR_APPLIED", None)
    proc = subprocess.run([sys.executable, cli, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "STREAMING_SSL_ALLOCATOR='mimalloc' is not an allocator; valid: auto, system, tuned, jemalloc, tcmalloc" \
        in proc.stderr
    assert not (tmp_path / "out").exists() and _digest(good_run) == before
