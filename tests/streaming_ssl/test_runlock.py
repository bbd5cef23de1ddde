"""One writer per run directory: real subprocesses hold the lock, are refused, and are SIGKILLed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streaming_ssl.atomic import temp_path
from streaming_ssl.runlock import LOCK_NAME, RunLock, RunLocked, holder, run_files
from tests.conftest import child_env

HOLD = """
import sys, time
from streaming_ssl.runlock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(float(sys.argv[2]) if len(sys.argv) > 2 else 120)
"""


def _start_holder(run_dir: Path, hold_s: float = 120) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), str(hold_s)], stdout=subprocess.PIPE,
                            text=True, env=child_env())
    line = proc.stdout.readline()
    if line.strip() != "locked":
        proc.kill()
        proc.wait()
        pytest.fail(f"the holder subprocess did not take the lock (said {line!r})")
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    proc.stdout.close()


def test_live_holder_refuses_with_one_line_naming_it_and_keeps_its_record(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _start_holder(run_dir)
    try:
        before = (run_dir / LOCK_NAME).read_bytes()
        with pytest.raises(RunLocked) as err:
            RunLock(run_dir).acquire()
        message = str(err.value)
        assert f"PID {proc.pid}" in message and socket.gethostname() in message
        assert f"kill {proc.pid}" in message and "nothing was changed" in message
        assert "\n" not in message
        assert (run_dir / LOCK_NAME).read_bytes() == before
        record = holder(run_dir)
        assert record["pid"] == proc.pid and record["host"] == socket.gethostname() and record["alive"] is True
        with pytest.raises(RunLocked):  # the context manager refuses the same way
            with RunLock(run_dir):
                pass
    finally:
        _stop(proc)


def test_lock_of_a_sigkilled_process_never_blocks(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _start_holder(run_dir)
    proc.send_signal(signal.SIGKILL)
    _stop(proc)
    assert proc.returncode == -signal.SIGKILL
    stale = holder(run_dir)
    assert stale["pid"] == proc.pid and stale["alive"] is False  # the record stays, but blocks nobody
    with RunLock(run_dir) as lock:
        assert lock.locked
        assert holder(run_dir)["pid"] == os.getpid()
    assert holder(run_dir) is None


def test_release_lets_the_next_acquire_succeed_and_the_same_process_is_refused_meanwhile(tmp_path: Path) -> None:
    first = RunLock(tmp_path).acquire()
    with pytest.raises(RunLocked, match=f"PID {os.getpid()}"):
        RunLock(tmp_path).acquire()
    first.release()
    first.release()  # a second release is a no-op
    assert not first.locked and holder(tmp_path) is None
    second = RunLock(tmp_path).acquire()
    assert second.locked and holder(tmp_path)["pid"] == os.getpid()
    second.release()
    assert first.acquire() is first  # the same object can lock again after release
    first.release()


def test_a_subprocess_can_take_the_lock_after_we_release_it(tmp_path: Path) -> None:
    with RunLock(tmp_path):
        pass
    proc = _start_holder(tmp_path)
    try:
        assert holder(tmp_path)["pid"] == proc.pid
    finally:
        _stop(proc)


def test_acquire_creates_the_run_directory_and_only_lock_and_temp_files_do_not_count(tmp_path: Path) -> None:
    run_dir = tmp_path / "a" / "b" / "run"
    assert run_files(run_dir) == []
    with RunLock(run_dir):
        assert (run_dir / LOCK_NAME).is_file()
        leftover = temp_path(run_dir / "ckpt_000000003.pt")
        leftover.write_bytes(b"half a checkpoint")
        assert run_files(run_dir) == []
        (run_dir / "config.yaml").write_text("a: 1\n")
        assert run_files(run_dir) == [run_dir / "config.yaml"]
    assert (run_dir / LOCK_NAME).exists()  # the lock file is never deleted


def test_garbage_in_the_lock_file_does_not_block_and_is_overwritten(tmp_path: Path) -> None:
    (tmp_path / LOCK_NAME).write_bytes(b"\x00\xffnot json at all" * 100)
    assert holder(tmp_path) is None
    with RunLock(tmp_path):
        record = holder(tmp_path)
        assert record["pid"] == os.getpid()
        assert abs(record["started_unix"] - time.time()) < 60


def test_wait_takes_the_lock_once_the_holder_ends_and_refuses_after_the_time_given(tmp_path: Path, caplog) -> None:
    """RunLock(wait=S): a holder that ends within S seconds is waited for (once named in the log), one that does
    not is refused after S seconds with the holder named; wait 0 refuses at once."""
    run_dir = tmp_path / "run"
    proc = _start_holder(run_dir, hold_s=2)
    try:
        start = time.monotonic()
        with pytest.raises(RunLocked, match=rf"PID {proc.pid} .*nothing was changed \(after waiting 0 s\)$"):
            RunLock(run_dir, wait=0.3).acquire()
        assert time.monotonic() - start >= 0.3
        with caplog.at_level("WARNING"):
            lock = RunLock(run_dir, wait=60).acquire()  # the holder exits after 2 s
        assert time.monotonic() - start < 30 and proc.wait(10) == 0
        assert f"waiting up to 60 s for the lock of {run_dir}: run {run_dir} is being written by PID {proc.pid}" in \
            caplog.text
        assert holder(run_dir)["pid"] == os.getpid()
        lock.release()
    finally:
        _stop(proc)
