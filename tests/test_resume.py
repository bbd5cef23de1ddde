"""Exact resume: a run SIGKILLed in the middle of an experience and resumed equals an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from streaming_ssl import checkpoint as ckpt

DATA = os.environ.get("STREAMING_SSL_DATA")
pytestmark = pytest.mark.skipif(not DATA or not (Path(DATA) / "cifar10.npz").is_file(),
                                reason="needs the real CIFAR-10: set STREAMING_SSL_DATA to the folder of cifar10.npz")
REPO = Path(__file__).resolve().parents[1]
ARGS = ["train.deterministic=true", "run.checkpoint_every=3", "run.keep_last=50", "run.tensorboard=false",
        "eval.probe_epochs=5", "train.threads=1"]


def _cmd(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "run_stream.py"), "--config", str(REPO / "configs/smoke.yaml"),
            f"run.out_dir={run_dir}", f"data.root={Path(DATA).resolve()}", *ARGS, *extra]


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def test_sigkill_mid_experience_then_resume_is_exact(zygote, tmp_path: Path) -> None:
    """The killed run and its resume are one command, `python run_stream.py --config ... --auto-resume`, as a job
    that a scheduler requeues runs it: it starts the run, then continues it."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    # the uninterrupted run to compare with is forked with the imports done (tests/zygote.py) and runs alongside
    ref = zygote.start(_cmd(full)[2:], tmp_path / "full.log")
    proc = subprocess.Popen(_cmd(killed, "--auto-resume"), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and not (killed / "ckpt_000000003.pt").exists():
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert zygote.wait(ref, 240) == 0, (tmp_path / "full.log").read_text(errors="replace")[-3000:]
    state = ckpt.load(ckpt.latest(killed))
    pos = state["position"]
    assert pos["global_step"] < 20, "killed too late: the run had finished"

    res = subprocess.run(_cmd(killed, "--auto-resume"), cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"--auto-resume: continuing the run in {killed}" in res.stderr
    assert f"resumed at update {pos['global_step']}" in res.stderr

    assert _rows(killed) == _rows(full)
    a = ckpt.load(ckpt.latest(full))
    b = ckpt.load(ckpt.latest(killed))
    assert a["position"] == b["position"]
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_resume_refuses_a_different_config_or_device(zygote, tmp_path: Path) -> None:
    """--resume with other settings, or on another kind of device than the checkpoint's augmentation generator
    (CPU and CUDA generators have different states), is refused with the fix, and the run's files stay."""
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    # the run and the refused resume: training processes forked with the imports done (tests/zygote.py)
    rc = zygote.run(_cmd(run_dir, "stream.n_experiences=2", "data.train_per_class=10", "data.test_per_class=5")[2:],
                    log, 240)
    assert rc == 0, log.read_text(errors="replace")[-3000:]

    def stamps() -> dict:  # the run's files; .lock is the single-writer lock's record (taken, then released)
        return {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir() if p.name != ".lock"}

    before = stamps()
    refused = tmp_path / "refused.log"
    assert zygote.run(["--resume", str(run_dir), "optim.lr=0.1"], refused, 240) == 2
    err = refused.read_text(errors="replace")
    assert "different config" in err and "optim.lr" in err
    assert stamps() == before

    def contents() -> dict:  # resume writes config.yaml again (the same) and logs what it refused in train.log
        return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name not in (".lock",
                                                                                                   "train.log")}

    # the latest checkpoint as a CUDA run writes it (a 16-byte Philox state), with and without the device named
    latest = ckpt.latest(run_dir)
    state = ckpt.load(latest)
    assert state["aug_device"] == "cpu" and state["aug_generator"][0].numel() > 16
    for named, expected in (("cuda", "trained on cuda and resumes on cpu"),
                            (None, "trained on another device and resumes on cpu")):
        state["aug_generator"] = [torch.zeros(16, dtype=torch.uint8)]
        state.pop("aug_device", None)
        if named:
            state["aug_device"] = named
        ckpt.atomic_save(state, latest)
        before = contents()
        assert zygote.run(["--resume", str(run_dir)], refused, 240) == 2
        err = refused.read_text(errors="replace")
        assert expected in err and "CUDA_VISIBLE_DEVICES= python run_stream.py --resume" in err, err[-2000:]
        assert contents() == before


# PyTorch's out-of-memory error, raised at the third training update's backward as the allocator would raise it
OOM_AT_THIRD_BACKWARD = """
import torch
_backward, _calls = torch.Tensor.backward, [0]
def backward(self, *args, **kwargs):
    _calls[0] += 1
    if _calls[0] == 3:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB (raised by the test)")
    return _backward(self, *args, **kwargs)
torch.Tensor.backward = backward
"""


def test_out_of_memory_names_the_fix_keeps_the_checkpoint_and_resumes_with_it(zygote, tmp_path: Path) -> None:
    """Out of memory in a training update: exit 2 with a message that says where, names the memory savers and the
    --resume command; the checkpoint before it is intact and nothing after it is written; resumed with the savers
    (a change --resume accepts: memory only), the run ends exactly as an uninterrupted run without them."""
    full, run_dir = tmp_path / "full", tmp_path / "run"
    tiny = ["stream.n_experiences=2", "data.train_per_class=10", "data.test_per_class=5", "run.checkpoint_every=2"]
    ref = zygote.start(_cmd(full, *tiny)[2:], tmp_path / "full.log")
    log = tmp_path / "oom.log"
    assert zygote.wait(zygote.start(_cmd(run_dir, *tiny)[2:], log, prelude=OOM_AT_THIRD_BACKWARD), 240) == 2
    err = log.read_text(errors="replace")
    assert "OutOfMemory: out of memory on cpu in training update 2 (experience 0): CUDA out of memory. Tried to " \
           "allocate 1.50 GiB" in err, err[-3000:]
    assert "train.batch_size=20 x augment.n_patches=4 = 80 patches. The memory savers" in err
    assert "the checkpoint of update 2 is intact" in err
    savers = ["model.recompute_stages=2", "model.recompute_bn_relu=true"]
    assert f"python run_stream.py --resume {run_dir} {' '.join(savers)}" in err
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["ckpt_000000002.pt"]
    assert not (run_dir / "metrics.jsonl").exists() or not _rows(run_dir)

    resumed = tmp_path / "resumed.log"
    assert zygote.run(["--resume", str(run_dir), *savers], resumed, 240) == 0, resumed.read_text()[-3000:]
    out = resumed.read_text(errors="replace")
    assert "resumed at update 2" in out and "resuming with model.recompute_stages: run has 0, now 2" in out
    assert "model:\n" in (run_dir / "config.yaml").read_text() and "recompute_stages: 2" in \
        (run_dir / "config.yaml").read_text()  # a later --resume keeps them
    assert zygote.wait(ref, 240) == 0, (tmp_path / "full.log").read_text(errors="replace")[-3000:]
    assert _rows(run_dir) == _rows(full)
    a, b = ckpt.load(ckpt.latest(full)), ckpt.load(ckpt.latest(run_dir))
    assert a["position"] == b["position"] and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_killed_inside_a_checkpoint_write_after_a_row_resumes_without_a_duplicate_row(zygote, tmp_path: Path) -> None:
    """A run SIGKILLed inside the checkpoint write after its first evaluation (which wrote its metrics.jsonl row)
    holds that row and the checkpoint saved before the evaluation; --resume drops the row, evaluates again, and
    every evaluation is in metrics.jsonl exactly once, as in an uninterrupted run."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    marker, release = tmp_path / "marker", tmp_path / "release"
    release.write_text("the first write\n")  # the first write (before the evaluation) goes through; the second waits
    tiny = ["stream.n_experiences=2", "data.train_per_class=10", "data.test_per_class=5", "run.checkpoint_every=0",
            "run.tensorboard=true"]
    ref = zygote.start(_cmd(full, *tiny)[2:], tmp_path / "full.log")
    pid = zygote.start(_cmd(killed, *tiny)[2:], tmp_path / "killed.log",
                       env={ckpt.PAUSE_MARKER_ENV: str(marker), ckpt.PAUSE_ENV: "120",
                            ckpt.PAUSE_RELEASE_ENV: str(release)})
    deadline = time.time() + 240
    try:
        while time.time() < deadline and not (marker.exists() and len(marker.read_text().splitlines()) == 2):
            assert zygote.running(pid), (tmp_path / "killed.log").read_text(errors="replace")[-3000:]
            time.sleep(0.01)
    finally:
        zygote.kill(pid)
    assert zygote.wait(pid, 60) == -signal.SIGKILL
    (saved,) = ckpt.list_checkpoints(killed)
    state = ckpt.load(saved)
    assert state["position"]["stream_step"] == 0 and state["metrics_rows"] == 0  # saved before the evaluation
    assert len(_rows(killed)) == 1  # the row of experience 0

    log = tmp_path / "resume.log"
    assert zygote.run(["--resume", str(killed)], log, 240) == 0, log.read_text(errors="replace")[-3000:]
    assert f"resumed at update {state['position']['global_step']}" in log.read_text(errors="replace")
    assert zygote.wait(ref, 240) == 0, (tmp_path / "full.log").read_text(errors="replace")[-3000:]
    assert [r["experience"] for r in _rows(killed)] == [0, 1]
    assert _rows(killed) == _rows(full)
    # TensorBoard too: the killed run's evaluation of experience 0 is hidden (purged), its new one shown once
    assert _tensorboard(killed, "probe/acc_all") == _tensorboard(full, "probe/acc_all")
    assert [step for step, _ in _tensorboard(killed, "probe/acc_all")] == [1, 2]


def _tensorboard(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a tag in the run's tb/ as TensorBoard shows it (steps a resumed run purged left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return [(s.step, s.value) for s in events.Scalars(tag)]


@pytest.mark.parametrize("extra, expected", [
    (["--resume", "RUN"], "--auto-resume goes with --config alone"),
    (["--overwrite"], "--auto-resume goes with --config alone"),
])
def test_auto_resume_refuses_resume_and_overwrite(tmp_path: Path, caplog, extra, expected) -> None:
    from streaming_ssl.cli.train import main

    run_dir = tmp_path / "run"
    argv = ["--config", str(REPO / "configs/smoke.yaml"), f"run.out_dir={run_dir}", "--auto-resume",
            *[str(run_dir) if a == "RUN" else a for a in extra]]
    if "--resume" in extra:  # a run directory to resume, so that only the flags are wrong
        run_dir.mkdir()
        (run_dir / "config.yaml").write_text((REPO / "configs/smoke.yaml").read_text())
    with caplog.at_level("ERROR"):
        assert main(argv) == 2
    assert expected in caplog.text
    assert not (run_dir / "ckpt.pt").exists()


def test_resume_with_the_config_accepts_the_run_directory_however_it_is_written(tmp_path: Path) -> None:
    """`--config C --resume RUN/` (a trailing slash, as shell completion writes it) or the same directory by another
    path names the same run: resumed, not refused as a different config. A run directory moved or copied elsewhere
    resumes where it now is (its config.yaml names the old place); an override naming yet another is refused."""
    from streaming_ssl.cli.train import parse_args, resolve_config
    from streaming_ssl.config import ConfigError, load_config, save_config
    from streaming_ssl.runner import prepare_run_dir

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(load_config(REPO / "configs/smoke.yaml", [f"run.out_dir={run_dir}"]), run_dir / "config.yaml")
    for written in (f"{run_dir}/", f"{tmp_path}/./run", f"{run_dir}//"):
        cfg = resolve_config(parse_args(["--config", str(REPO / "configs/smoke.yaml"), "--resume", written]))
        assert prepare_run_dir(cfg, resume=True) == (run_dir, None)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.yaml").write_text((run_dir / "config.yaml").read_text())  # names run_dir, not other
    cfg = resolve_config(parse_args(["--resume", str(other)]))
    assert Path(cfg.run.out_dir) == other and prepare_run_dir(cfg, resume=True) == (other, None)
    with pytest.raises(ConfigError, match="but the config's run.out_dir is"):
        resolve_config(parse_args(["--resume", str(other), f"run.out_dir={tmp_path / 'third'}"]))


def test_a_run_saved_before_blur_kernel_existed_resumes_with_the_blur_it_trained_with(tmp_path: Path) -> None:
    """Runs saved before augment.blur_kernel existed blurred with torchvision's 10% kernel (3 taps at 32 px); the
    default now spans +-3 sigma (13). Resumed, such a run keeps its kernel (0: the 10% rule), so that it continues as
    it trained; a run saved since keeps its own value, and an override that changes the blur is refused."""
    import yaml

    from streaming_ssl.build import TrainingData, build_augment
    from streaming_ssl.cli.train import parse_args, resolve_config
    from streaming_ssl.config import load_config, save_config
    from streaming_ssl.runner import RunError, prepare_run_dir

    data = TrainingData("cifar10", 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 10)
    old, new = tmp_path / "old", tmp_path / "new"
    for run_dir in (old, new):
        run_dir.mkdir()
        save_config(load_config(REPO / "configs/smoke.yaml", [f"run.out_dir={run_dir}"]), run_dir / "config.yaml")
    raw = yaml.safe_load((old / "config.yaml").read_text())
    del raw["augment"]["blur_kernel"]  # as written before the key existed
    (old / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

    for argv in (["--resume", str(old)], ["--config", str(REPO / "configs/smoke.yaml"), "--resume", str(old)]):
        cfg = resolve_config(parse_args(argv))
        assert cfg.augment.blur_kernel is None
        assert prepare_run_dir(cfg, resume=True) == (old, None)
        assert cfg.augment.blur_kernel == 0 and build_augment(cfg, data).blur_kernel_size == 3
    cfg = resolve_config(parse_args(["--resume", str(new)]))
    prepare_run_dir(cfg, resume=True)
    assert cfg.augment.blur_kernel is None and build_augment(cfg, data).blur_kernel_size == 13
    with pytest.raises(RunError, match="augment.blur_kernel"):
        prepare_run_dir(resolve_config(parse_args(["--resume", str(old), "augment.blur_kernel=13"])), resume=True)


def test_resume_refuses_training_data_changed_since_the_run_was_saved(tmp_path: Path, caplog) -> None:
    """A source rewritten at the same path (here one label changed) would make the resumed run train on another
    stream, silently; it is refused before anything is written. The same data resumes."""
    import numpy as np

    from streaming_ssl.cli import train as run_stream

    with np.load(Path(DATA) / "cifar10.npz") as z:
        keep = {k: z[k][:200] if k.startswith(("x_", "y_")) else z[k] for k in z.files}
    source = tmp_path / "src.npz"
    np.savez(source, **keep)
    run_dir = tmp_path / "run"
    args = [f"run.out_dir={run_dir}", f"data.dataset=npz:{source}", "data.train_per_class=4", "data.test_per_class=2",
            "stream.n_experiences=2", "eval.probe_epochs=1", "run.tensorboard=false", "run.plot=false"]
    assert run_stream.main(["--config", str(REPO / "configs/smoke.yaml"), *args]) == 0
    assert run_stream.main(["--resume", str(run_dir)]) == 0  # the same data: accepted (a complete run)
    # every file but the lock (which records its holder) stays as it was
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir() if p.name != ".lock"}
    first = int(np.flatnonzero(keep["y_train"] == 0)[0])  # an image the 4-per-class slice trains on
    keep["y_train"][first] = 1
    np.savez(source, **keep)
    with caplog.at_level("ERROR"):
        assert run_stream.main(["--resume", str(run_dir)]) == 2
    assert f"its training data npz:{source} changed since the run was saved (40 training images then, 40 now" in \
        caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir() if p.name != ".lock"} == before


def test_resume_refuses_a_checkpoint_holding_a_method_the_resumed_run_lacks(tmp_path: Path, monkeypatch,
                                                                            caplog, dies_after) -> None:
    """A run stopped with a replay buffer, resumed by a build without it (a plugin list from Python, a user's
    method whose import is missing): the buffer's saved state must not be dropped in silence, or the run trains on
    without the method it had. The reverse, a method the checkpoint has no state for, is refused too."""
    import streaming_ssl.cl as cl
    from streaming_ssl.cli import train as run_stream

    run_dir = tmp_path / "run"
    args = ["--config", str(REPO / "configs/smoke.yaml"), f"run.out_dir={run_dir}", f"data.root={Path(DATA).resolve()}",
            "data.train_per_class=10", "data.test_per_class=2", "eval.probe_epochs=1", "run.tensorboard=false",
            "run.plot=false", "run.checkpoint_every=1", "train.threads=1"]
    dies_after(2, run_stream.main, [*args, "cl.replay.policy=reservoir", "cl.replay.size=8", "cl.replay.batch=4"])
    assert "cl.replay" in ckpt.load(ckpt.latest(run_dir))["plugins"]
    real_build = cl.build_cl_plugins
    monkeypatch.setattr(cl, "build_cl_plugins", lambda *a, **kw: [])
    with caplog.at_level("ERROR"):
        assert run_stream.main(["--resume", str(run_dir)]) == 2
    assert "the checkpoint holds the state of 'cl.replay', a plugin this run lacks" in caplog.text
    assert ckpt.load(ckpt.latest(run_dir))["position"]["global_step"] == 2  # nothing saved over it
    monkeypatch.setattr(cl, "build_cl_plugins", real_build)
    assert run_stream.main(["--resume", str(run_dir)]) == 0  # the run's own plugins: it resumes

    plain = tmp_path / "plain"
    dies_after(2, run_stream.main, [*args[:3], f"run.out_dir={plain}", *args[4:]])

    def with_replay(cfg, **kw):
        cfg.cl.replay.policy, cfg.cl.replay.size, cfg.cl.replay.batch = "reservoir", 8, 4
        return real_build(cfg, **kw)

    monkeypatch.setattr(cl, "build_cl_plugins", with_replay)
    caplog.clear()
    with caplog.at_level("ERROR"):
        assert run_stream.main(["--resume", str(plain)]) == 2
    assert "the checkpoint holds no state for 'cl.replay'" in caplog.text


SLOW_FIRST_EVALUATION = """
import os, pathlib, time
from streaming_ssl.evaluation import StreamEvaluator
real, calls = StreamEvaluator.evaluate, []
def evaluate(self, model, n_seen):
    calls.append(n_seen)
    if len(calls) == 1:  # as long as a large evaluation: far longer than a scheduler's grace period
        pathlib.Path(os.environ["TEST_EVAL_MARKER"]).write_text("evaluating")
        end = time.monotonic() + 600
        while time.monotonic() < end:
            time.sleep(0.01)
    return real(self, model, n_seen)
StreamEvaluator.evaluate = evaluate
"""


def test_a_stop_during_an_evaluation_cuts_it_short_and_the_resumed_run_evaluates_again(zygote, tmp_path) -> None:
    """A scheduler's SIGKILL follows its SIGTERM after a grace period (30 s for SLURM and torchrun), and an
    evaluation can take longer. The state is saved right before each evaluation, so a stop during one ends the run
    at once (no checkpoint at all existed before, with checkpoint_every 0); the resumed run evaluates again and
    ends as an uninterrupted one, rows and weights."""
    full, stopped, marker = tmp_path / "full", tmp_path / "stopped", tmp_path / "evaluating"
    ref = zygote.start(_cmd(full, "run.checkpoint_every=0")[2:], tmp_path / "full.log")
    pid = zygote.start(_cmd(stopped, "run.checkpoint_every=0")[2:], tmp_path / "stopped.log",
                       env={"TEST_EVAL_MARKER": str(marker)}, prelude=SLOW_FIRST_EVALUATION)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and not marker.exists():
            assert zygote.running(pid), (tmp_path / "stopped.log").read_text(errors="replace")[-3000:]
            time.sleep(0.01)
        os.kill(pid, signal.SIGTERM)
        rc = zygote.wait(pid, 120)  # the evaluation it interrupts would sleep 600 s
    finally:
        zygote.kill(pid)
    said = (tmp_path / "stopped.log").read_text(errors="replace")
    assert rc == 130, said[-3000:]
    assert "stopped by signal at update 8; the evaluation was cut short and runs again; continue with: python " \
           f"run_stream.py --resume {stopped}" in said
    state = ckpt.load(ckpt.latest(stopped))  # experience 0 (8 updates) trained, not yet evaluated
    assert state["position"] == {"global_step": 8, "stream_step": 0, "epoch_in_exp": 0, "batch_in_epoch": 8,
                                 "samples_seen": 160}
    rows = stopped / "metrics.jsonl"
    assert state["metrics_rows"] == 0 and (not rows.exists() or rows.read_text() == "")
    assert zygote.wait(ref, 240) == 0, (tmp_path / "full.log").read_text(errors="replace")[-3000:]
    assert zygote.run(["--resume", str(stopped)], tmp_path / "resumed.log", 240) == 0
    assert _rows(stopped) == _rows(full)
    a, b = ckpt.load(ckpt.latest(full)), ckpt.load(ckpt.latest(stopped))
    assert a["position"] == b["position"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_repeated_stop_signal_does_not_cut_the_checkpoint_write_short(zygote, tmp_path) -> None:
    """srun signals every process of a job step and torchrun forwards its own SIGTERM, so a rank may get two; and
    SLURM's --signal habit sends SIGUSR1. SIGUSR1 stops like SIGTERM; the second signal, arriving while the
    checkpoint is being written, is ignored: the write completes and the run exits 130 (not killed, not left
    without that checkpoint). A SIGHUP the process was started ignoring (nohup) stays ignored."""
    run, marker, release = tmp_path / "run", tmp_path / "writing", tmp_path / "release"
    env = {ckpt.PAUSE_MARKER_ENV: str(marker), ckpt.PAUSE_ENV: "600", ckpt.PAUSE_RELEASE_ENV: str(release)}
    # started as `nohup` starts it: SIGHUP ignored, which the run must leave so (it goes on when a terminal closes)
    pid = zygote.start(_cmd(run)[2:], tmp_path / "run.log", env=env,
                       prelude="import signal\nsignal.signal(signal.SIGHUP, signal.SIG_IGN)\n")
    deadline = time.time() + 240
    try:
        while time.time() < deadline and not marker.exists():  # inside the write of ckpt_000000003.pt
            assert zygote.running(pid), (tmp_path / "run.log").read_text(errors="replace")[-3000:]
            time.sleep(0.01)
        os.kill(pid, signal.SIGHUP)  # ignored
        time.sleep(0.3)
        os.kill(pid, signal.SIGUSR1)
        time.sleep(0.3)
        os.kill(pid, signal.SIGTERM)
        time.sleep(0.3)
        release.write_text("all\n")
        rc = zygote.wait(pid, 120)
    finally:
        zygote.kill(pid)
    said = (tmp_path / "run.log").read_text(errors="replace")
    assert rc == 130, said[-3000:]
    assert f"signal {int(signal.SIGTERM)}: already stopping (signal {int(signal.SIGUSR1)}); ignored" in said
    assert f"signal {int(signal.SIGHUP)}:" not in said
    assert ckpt.load(run / "ckpt_000000003.pt")["position"]["global_step"] == 3
    assert not list(run.glob("*.tmp*"))


def test_a_copied_run_directory_resumes_where_it_now_is(tmp_path: Path, caplog, dies_after) -> None:
    """cp -r RUN COPY, then --resume COPY: the copy continues (its own lock, its own files) and ends as the
    original does; before, its config.yaml naming RUN refused it, and the suggested command failed again."""
    import shutil

    from streaming_ssl.cli import train as run_stream

    run_dir, copy = tmp_path / "run", tmp_path / "copy"
    dies_after(3, run_stream.main, ["--config", str(REPO / "configs/smoke.yaml"), f"run.out_dir={run_dir}",
                                    f"data.root={Path(DATA).resolve()}", "data.train_per_class=10",
                                    "data.test_per_class=2", "stream.n_experiences=2", "eval.probe_epochs=1",
                                    "run.tensorboard=false", "run.plot=false", "train.threads=1",
                                    "train.deterministic=true"])
    shutil.copytree(run_dir, copy)
    with caplog.at_level("INFO"):
        assert run_stream.main(["--resume", str(copy)]) == 0
    assert f"the run was saved in {run_dir} and continues in {copy}" in caplog.text
    assert run_stream.main(["--resume", str(run_dir)]) == 0  # the original, untouched by the copy's resume
    assert _rows(copy) == _rows(run_dir) and len(_rows(copy)) == 2
    a, b = ckpt.load(ckpt.latest(run_dir)), ckpt.load(ckpt.latest(copy))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_training_curves_of_a_resumed_run_equal_an_uninterrupted_runs(tmp_path: Path, monkeypatch,
                                                                        dies_after) -> None:
    """A run that dies after its train.jsonl got rows past the checkpoint (flushed every 2 rows here) resumes with
    those rows dropped and logged again: train.jsonl and TensorBoard's train/* equal an uninterrupted run's, each
    update once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from streaming_ssl.cli import train as run_stream
    from streaming_ssl.plugins import TrainLog

    monkeypatch.setattr(TrainLog, "flush_rows", 2)

    def args(run_dir: Path) -> list[str]:
        return ["--config", str(REPO / "configs/smoke.yaml"), f"run.out_dir={run_dir}",
                f"data.root={Path(DATA).resolve()}", "data.train_per_class=10", "data.test_per_class=2",
                "stream.n_experiences=2", "eval.probe_epochs=1", "eval.knn_k=0", "run.plot=false",
                "train.threads=1", "train.deterministic=true", "train.log_every=1", "run.checkpoint_every=0"]

    def curves(run_dir: Path) -> tuple[list[dict], dict]:
        rows = [json.loads(line) for line in (run_dir / "train.jsonl").read_text().splitlines()]
        events = EventAccumulator(str(run_dir / "tb" / "train"))
        events.Reload()
        return rows, {k: [(s.step, s.value) for s in events.Scalars(f"train/{k}")] for k in ("loss", "tcr", "lr")}

    full, killed = tmp_path / "full", tmp_path / "killed"
    assert run_stream.main(args(full)) == 0
    dies_after(5, run_stream.main, args(killed))  # updates 1-3 are experience 0 (checkpointed), 4-5 are not
    state = ckpt.load(ckpt.latest(killed))
    assert state["position"]["global_step"] == 3 and state["plugins"]["train_log"] == {"rows": 3}
    assert [json.loads(line)["update"] for line in (killed / "train.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert run_stream.main(["--resume", str(killed)]) == 0
    rows, tb = curves(killed)
    assert [r["update"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert (rows, tb) == curves(full)


def test_a_run_saved_with_a_class_split_its_stream_ignored_still_resumes(tmp_path: Path, dies_after) -> None:
    """A data-incremental run whose config.yaml holds a class split (accepted and ignored before it was refused)
    resumes, and ends as the run without it."""
    import yaml

    from streaming_ssl.cli import train as run_stream

    def args(run_dir: Path) -> list[str]:
        return ["--config", str(REPO / "configs/smoke.yaml"), f"run.out_dir={run_dir}",
                f"data.root={Path(DATA).resolve()}", "data.train_per_class=10", "data.test_per_class=2",
                "stream.mode=data_incremental", "stream.n_experiences=2", "eval.probe_epochs=1", "eval.knn_k=0",
                "run.tensorboard=false", "run.plot=false", "train.threads=1", "train.deterministic=true"]

    old, plain = tmp_path / "old", tmp_path / "plain"
    dies_after(3, run_stream.main, args(old))
    saved = yaml.safe_load((old / "config.yaml").read_text())
    saved["stream"]["classes_per_experience"] = [5, 5]  # as an older version wrote it
    (old / "config.yaml").write_text(yaml.safe_dump(saved))
    assert run_stream.main(["--resume", str(old)]) == 0
    assert run_stream.main(args(plain)) == 0
    assert _rows(old) == _rows(plain) and len(_rows(old)) == 2


def test_a_requeued_job_waits_for_its_predecessor_to_let_go_of_the_run(tmp_path: Path, caplog, dies_after) -> None:
    """--auto-resume --wait-lock: while another process still holds the run (a predecessor still saving, here a
    process holding the lock for 3 s) the job waits, then continues the run from its checkpoint; without
    --wait-lock it exits 2 at once and changes nothing."""
    from streaming_ssl.cli import train as run_stream
    from tests.conftest import lock_held_elsewhere

    run_dir = tmp_path / "run"
    argv = ["--config", str(REPO / "configs/smoke.yaml"), f"run.out_dir={run_dir}", f"data.root={Path(DATA).resolve()}",
            "data.train_per_class=10", "data.test_per_class=2", "stream.n_experiences=2", "eval.probe_epochs=1",
            "eval.knn_k=0", "run.tensorboard=false", "run.plot=false", "train.threads=1", "--auto-resume"]
    dies_after(3, run_stream.main, argv)
    with lock_held_elsewhere(run_dir, 3) as holder, caplog.at_level("INFO"):
        assert run_stream.main(argv) == 2  # refused at once
        assert "RunLocked" in caplog.text and len(ckpt.list_checkpoints(run_dir)) == 1
        assert run_stream.main([*argv, "--wait-lock", "120"]) == 0
        assert holder.wait(10) == 0  # it had ended: the run went on after it
    assert f"waiting up to 120 s for the lock of {run_dir}" in caplog.text
    assert "resumed at update 3" in caplog.text and len(_rows(run_dir)) == 2


def test_auto_resume_decides_once_the_predecessor_has_let_go(tmp_path: Path, caplog, dies_after) -> None:
    """--auto-resume --wait-lock decides whether a run is there only once it holds the lock: here the predecessor
    holds a run directory that has no config.yaml yet, and writes its run (a checkpoint at update 3) before it lets
    go. The job continues that run. Before, it decided "no run yet" before waiting, then refused the directory as
    not empty (exit 2)."""
    import shutil

    from streaming_ssl.cli import train as run_stream
    from tests.conftest import lock_held_elsewhere

    run_dir, saved = tmp_path / "run", tmp_path / "saved"
    argv = ["--config", str(REPO / "configs/smoke.yaml"), f"run.out_dir={run_dir}", f"data.root={Path(DATA).resolve()}",
            "data.train_per_class=10", "data.test_per_class=2", "stream.n_experiences=2", "eval.probe_epochs=1",
            "eval.knn_k=0", "run.tensorboard=false", "run.plot=false", "train.threads=1", "--auto-resume"]
    dies_after(3, run_stream.main, argv)
    shutil.move(run_dir, saved)
    run_dir.mkdir()
    then = ("for name in sorted(os.listdir(sys.argv[2])):\n"
            "    if name != '.lock':\n        shutil.move(os.path.join(sys.argv[2], name), sys.argv[1])")
    with lock_held_elsewhere(run_dir, 3, then, saved) as holder, caplog.at_level("INFO"):
        assert run_stream.main([*argv, "--wait-lock", "120"]) == 0
        assert holder.wait(10) == 0
    assert f"--auto-resume: continuing the run in {run_dir}" in caplog.text
    assert "resumed at update 3" in caplog.text and len(_rows(run_dir)) == 2


def test_auto_resume_holds_a_new_run_directory_from_the_start(tmp_path: Path, monkeypatch) -> None:
    """--auto-resume on a run directory that does not exist yet makes it and takes its lock before building the
    run, so that another job cannot start a run there meanwhile (before, the directory appeared only once data,
    stream and model were built: a second job could take it, and the first was then refused as not empty)."""
    from streaming_ssl import build
    from streaming_ssl.cli import train as run_stream
    from streaming_ssl.runlock import RunLock, RunLocked

    run_dir = tmp_path / "new" / "run"
    seen = []
    load = build.load_train_data

    def load_while_checking(cfg):  # while the run is being built: can another writer take the directory?
        try:
            RunLock(run_dir).acquire().release()
            seen.append("taken by another writer")
        except RunLocked:
            seen.append("locked")
        return load(cfg)

    monkeypatch.setattr(build, "load_train_data", load_while_checking)
    argv = ["--config", str(REPO / "configs/smoke.yaml"), f"run.out_dir={run_dir}", f"data.root={Path(DATA).resolve()}",
            "data.train_per_class=10", "data.test_per_class=2", "stream.n_experiences=2", "eval.probe_epochs=1",
            "eval.knn_k=0", "run.tensorboard=false", "run.plot=false", "train.threads=1", "--auto-resume"]
    assert run_stream.main(argv) == 0
    assert seen == ["locked"] and len(_rows(run_dir)) == 2
