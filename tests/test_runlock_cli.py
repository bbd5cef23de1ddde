"""One writer per run directory, through the real training CLI (issue 19).

A real `python run_stream.py` run holds RUN/.lock and is held still inside a checkpoint write by the test
hook STREAMING_SSL_TEST_CKPT_PAUSE (STREAMING_SSL_TEST_CKPT_MARKER says when it is there, and the test lets it
go on through STREAMING_SSL_TEST_CKPT_RELEASE as soon as its checks are done). While it waits:
a new run into RUN, `--resume RUN` and `--overwrite` into RUN each exit 2 with one error line naming the
holder's PID and host and "nothing was changed", and every file of RUN stays byte-for-byte the same;
`evaluate.py --checkpoint RUN` reads the previous complete checkpoint. The holder then finishes normally.
A second run SIGKILLed inside a checkpoint write leaves a stale lock record that does not block: `--resume`
takes the lock and finishes the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streaming_ssl import checkpoint as ckpt
from streaming_ssl.atomic import is_temp_name
from streaming_ssl.runlock import LOCK_NAME, holder

DATA = os.environ.get("STREAMING_SSL_DATA")
pytestmark = pytest.mark.skipif(not DATA or not (Path(DATA) / "cifar10.npz").is_file(),
                                reason="needs the real CIFAR-10: set STREAMING_SSL_DATA to the folder of cifar10.npz")
REPO = Path(__file__).resolve().parents[1]
TINY = ["data.train_per_class=10", "data.test_per_class=5", "stream.n_experiences=2", "eval.probe_epochs=2",
        "eval.knn_k=3", "run.tensorboard=false", "run.plot=false", "train.threads=1"]
PAUSE_S = 60  # the longest the holder waits inside a checkpoint write (released earlier): the checks must fit in it
STARTUP_S = 240  # a cold start (torch + avalanche imports, data) on a loaded 2-core machine


def _train_args(run_dir: Path) -> list[str]:
    return ["--config", str(REPO / "configs/smoke.yaml"), f"run.out_dir={run_dir}",
            f"data.root={Path(DATA).resolve()}", *TINY]


def _start(run_dir: Path, marker: Path, release: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, ckpt.PAUSE_ENV: str(PAUSE_S), ckpt.PAUSE_MARKER_ENV: str(marker),
           ckpt.PAUSE_RELEASE_ENV: str(release)}
    with log.open("w") as fh:
        return subprocess.Popen([sys.executable, str(REPO / "run_stream.py"), *_train_args(run_dir)], cwd=REPO,
                                env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _release(release: Path, write: int | str) -> None:
    """Let the run go on from its paused checkpoint write number `write` (and any before it), or "all"."""
    with release.open("a") as fh:
        if write == "all":
            fh.write("all\n")
        else:
            fh.write("".join(f"released {k}\n" for k in range(len(_marker_lines(release)) + 1, write + 1)))


def _marker_lines(marker: Path) -> list[str]:
    return marker.read_text().splitlines() if marker.exists() else []


def _wait_for_write(proc: subprocess.Popen, marker: Path, n: int, log: Path) -> Path:
    """Wait until the run is inside its n-th checkpoint write (paused there); returns the file being written."""
    deadline = time.time() + STARTUP_S
    while len(_marker_lines(marker)) < n:
        if proc.poll() is not None:
            pytest.fail(f"the run exited ({proc.returncode}) before its checkpoint write {n}:\n"
                        f"{log.read_text()[-3000:]}")
        if time.time() > deadline:
            pytest.fail(f"no checkpoint write {n} after {STARTUP_S} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)
    return Path(_marker_lines(marker)[n - 1].removeprefix("writing "))


def _digest(run_dir: Path) -> dict[str, str]:
    """Every entry of the run directory but the lock file and temporary files: file contents and link targets."""
    out = {}
    for p in sorted(run_dir.rglob("*")):
        if p.name == LOCK_NAME or is_temp_name(p.name):
            continue
        rel = str(p.relative_to(run_dir))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=60)


def _refused(caplog, action) -> str:
    """Run the CLI in this process; it must exit 2 with exactly one one-line error; returns that line."""
    caplog.clear()
    with caplog.at_level("ERROR"):
        rc = action()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert rc == 2, errors
    assert len(errors) == 1, errors
    assert "\n" not in errors[0], errors[0]
    return errors[0]


def _check_evaluate_reads_previous_checkpoint(run: Path, marker: Path, proc, evaluate, capsys) -> None:
    t0 = time.time()
    writing = Path(_marker_lines(marker)[-1].removeprefix("writing "))
    previous = ckpt.list_checkpoints(run)
    assert len(previous) == 1 and not writing.exists(), (previous, writing)
    before = _digest(run)
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(run), "--device", "cpu", "--probe-epochs", "1",
                          "--train-per-class", "5", "--test-per-class", "5"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert Path(result["checkpoint"]) == previous[0], result
    assert result["updates"] == ckpt.load(previous[0])["position"]["global_step"]
    assert _digest(run) == before
    assert time.time() - t0 < PAUSE_S, "evaluate took longer than the holder's pause: raise PAUSE_S"
    assert len(_marker_lines(marker)) == 3 and proc.poll() is None  # the holder was still paused throughout


def test_live_run_refuses_second_writers_and_a_killed_one_does_not_block(tmp_path: Path, caplog, capsys) -> None:
    run, victim = tmp_path / "run", tmp_path / "victim"
    marker, victim_marker = tmp_path / "marker", tmp_path / "victim_marker"
    release, victim_release = tmp_path / "release", tmp_path / "victim_release"
    log, victim_log = tmp_path / "run.log", tmp_path / "victim.log"
    _release(victim_release, 1)  # the victim pauses only inside its second write, where it is killed
    proc = _start(run, marker, release, log)
    victim_proc = _start(victim, victim_marker, victim_release, victim_log)  # in parallel: one cold start of waiting
    try:
        import streaming_ssl.cli.evaluate as evaluate
        import streaming_ssl.cli.train as run_stream
        import streaming_ssl.probe_run  # noqa: F401 - the heavy imports, done while the runs start
        from scenarios import streams  # noqa: F401

        # --- the holder is paused inside its first checkpoint write: three second writers are refused
        _wait_for_write(proc, marker, 1, log)
        t0 = time.time()
        record = holder(run)
        assert record is not None and record["pid"] == proc.pid and record["alive"] is True, record
        before = _digest(run)
        assert "config.yaml" in before and "train.log" in before, before  # (its first write precedes any row)
        lock_before = (run / LOCK_NAME).read_bytes()
        actions = {
            "new run": lambda: run_stream.main(_train_args(run)),
            "--resume": lambda: run_stream.main(["--resume", str(run)]),
            "--overwrite": lambda: run_stream.main(["--overwrite", *_train_args(run)]),
        }
        for name, action in actions.items():
            line = _refused(caplog, action)
            host = socket.gethostname()
            assert f"PID {proc.pid} on {host}" in line and "nothing was changed" in line, (name, line)
            assert _digest(run) == before, f"{name} changed the run directory"
            assert (run / LOCK_NAME).read_bytes() == lock_before, f"{name} changed the holder's lock record"
        assert time.time() - t0 < PAUSE_S, "the checks took longer than the holder's pause: raise PAUSE_S"
        assert len(_marker_lines(marker)) == 1 and proc.poll() is None  # the holder was still paused throughout
        _release(release, 2)  # its first checkpoint, written before the evaluation, then again after it

        # --- next, in whichever order they come: the holder paused inside its third write, the first of a new
        # file (evaluate reads the first, complete checkpoint and succeeds); the victim paused inside its second
        # write, the rewrite after its first evaluation (SIGKILLed: the one before the evaluation is kept)
        saved, evaluated, deadline = None, False, time.time() + STARTUP_S
        while saved is None or not evaluated:
            assert time.time() < deadline, "the runs did not reach the checkpoint writes the checks wait for"
            if saved is None and len(_marker_lines(victim_marker)) >= 2:
                assert victim_proc.poll() is None, victim_log.read_text()[-3000:]
                saved = ckpt.load(ckpt.latest(victim))["position"]["global_step"]
                victim_proc.send_signal(signal.SIGKILL)
                assert victim_proc.wait(timeout=60) == -signal.SIGKILL
            if not evaluated and len(_marker_lines(marker)) >= 3:
                _check_evaluate_reads_previous_checkpoint(run, marker, proc, evaluate, capsys)
                _release(release, "all")
                evaluated = True
            assert evaluated or proc.poll() is None, log.read_text()[-3000:]
            assert saved is not None or victim_proc.poll() is None, victim_log.read_text()[-3000:]
            time.sleep(0.02)

        # --- the holder finishes normally: both evaluations, its own lock released
        assert proc.wait(timeout=STARTUP_S) == 0, log.read_text()[-3000:]
        rows = (run / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(r)["experience"] for r in rows] == [0, 1]
        assert (run / "summary.json").is_file() and holder(run) is None

        # --- the killed run left a stale record; --resume takes over and finishes
        stale = holder(victim)
        assert stale is not None and stale["pid"] == victim_proc.pid and stale["alive"] is False, stale
        res = subprocess.run([sys.executable, str(REPO / "run_stream.py"), "--resume", str(victim)], cwd=REPO,
                             capture_output=True, text=True, timeout=STARTUP_S, stdin=subprocess.DEVNULL)
        assert res.returncode == 0, res.stderr[-3000:]
        assert f"resumed at update {saved}" in res.stderr, res.stderr[-3000:]
        rows = (victim / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(r)["experience"] for r in rows] == [0, 1]
        assert holder(victim) is None  # the resumed run took the lock, rewrote the record, released it
    finally:
        _stop(proc)
        _stop(victim_proc)


def test_a_new_run_is_refused_when_another_wrote_its_directory_after_the_check(tmp_path: Path) -> None:
    """A new run checks its (not yet existing) directory before building, and takes the lock only once the
    directory is created. Another run that wrote there meanwhile (and finished, or was killed) is not trained over:
    the new run is refused with the lock released, and the other run's files stay."""
    from streaming_ssl.config import load_config
    from streaming_ssl.runner import RunError, create_run_dir, prepare_run_dir
    from streaming_ssl.runlock import RunLock

    run_dir = tmp_path / "run"
    cfg = load_config(REPO / "configs/smoke.yaml", [f"run.out_dir={run_dir}"])
    assert prepare_run_dir(cfg) == (run_dir, None)  # nothing there yet
    run_dir.mkdir()  # the other run, done with the directory
    (run_dir / "config.yaml").write_text("the other run's config\n")
    (run_dir / "metrics.jsonl").write_text('{"experience": 0}\n')
    before = _digest(run_dir)
    lock = RunLock(run_dir)
    with pytest.raises(RunError, match="is not empty"):
        create_run_dir(cfg, run_dir, fresh=False, lock=lock)
    assert not lock.locked and holder(run_dir) is None
    assert _digest(run_dir) == before
