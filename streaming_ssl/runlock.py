"""One writer per run directory: an exclusive, non-blocking flock on RUN/.lock held while a run trains.

    with RunLock(run_dir):          # raises RunLocked (one line naming the holder) if another process has it
        train(...)

or lock = RunLock(run_dir).acquire() ... lock.release().

- The lock is `fcntl.flock(LOCK_EX | LOCK_NB)` on the file `RUN/.lock` (LOCK_NAME). The kernel drops it
  when the holding process ends, however it ends (SIGKILL included), so a lock left by a dead process
  never blocks: the next acquire takes it and overwrites the stale record.
- After taking the lock the holder writes a record into the file: JSON {"pid", "host", "started"
  (ISO time), "started_unix"}. A refused process never writes, so the holder's record stays intact.
  `holder(run_dir)` reads that record without locking (for messages and for tools).
- acquire creates the run directory (with parents) if it does not exist. The lock file is never deleted
  (deleting a lock file races with a process that has just opened it); release empties the record.
  So a fresh run directory may hold `.lock` (and, after a SIGKILL inside a write, temporary files):
  callers deciding whether a run directory is "empty" must ignore those; `run_files(run_dir)` lists the
  entries that count.
- flock locks belong to the open file, so a second RunLock on the same directory in the same process
  is refused too, and processes forked while the lock is held (DataLoader workers) share it until they
  exit. The descriptor is not inherited across exec.
- Under torchrun (DDP) only rank 0 should take the lock, before it writes anything into the run
  directory, and hold it for the life of the training process; other ranks do not lock. Choosing the
  rank is the caller's business.
- Readers (evaluate.py on a live run) do not lock: writes are atomic renames (streaming_ssl/atomic.py).
- flock is advisory and per host on some network file systems; on Linux NFS it is emulated with
  POSIX byte-range locks and works across clients.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from streaming_ssl.atomic import is_temp_name

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class RunLocked(RuntimeError):
    """Another live process holds the run directory's lock; the message names it and says what to do."""


def _read_record(lock_path: Path) -> dict | None:
    try:
        data = lock_path.read_bytes()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    try:
        record = json.loads(data) if data.strip() else None
    except ValueError:  # also UnicodeDecodeError
        return None
    return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder(run_dir: str | Path) -> dict | None:
    """The record of the process that last took the lock of run_dir, read without locking, or None.

    A dict {"pid": int, "host": str, "started": ISO time, "started_unix": float, "alive": bool | None}, where
    "alive" says whether that PID still exists (None when the record is from another host). None when there
    is no lock file, the lock was released cleanly, or the record is unreadable. A record of a dead process
    (killed) is stale: it does not block acquire.
    """
    record = _read_record(Path(run_dir) / LOCK_NAME)
    if record is None:
        return None
    same_host = record.get("host") == socket.gethostname()
    record["alive"] = _pid_alive(record["pid"]) if same_host else None
    return record


def run_files(run_dir: str | Path) -> list[Path]:
    """Entries of run_dir that make it a non-empty run directory: all but LOCK_NAME and leftover temporary
    files (atomic.TEMP_GLOB); [] when run_dir does not exist."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if p.name != LOCK_NAME and not is_temp_name(p.name))


def _refusal(run_dir: Path) -> str:
    record = holder(run_dir)
    if record is None:
        return (f"run {run_dir} is being written by another process (its record in {run_dir / LOCK_NAME} is not "
                "written yet); stop it or wait; nothing was changed")
    pid, host = record["pid"], record.get("host", "?")
    since = str(record.get("started", "?"))[:19].replace("T", " ")
    hint = f"stop it (kill {pid}) or wait"
    if record["alive"] is False:
        hint = (f"PID {pid} has exited but a process it forked (e.g. a DataLoader worker) still holds the lock: "
                "stop that process or wait")
    return f"run {run_dir} is being written by PID {pid} on {host} since {since}; {hint}; nothing was changed"


class RunLock:
    """Exclusive lock of one run directory (see the module docstring). Not reentrant."""

    def __init__(self, run_dir: str | Path, wait: float = 0.0) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.wait = max(float(wait), 0.0)  # seconds acquire waits for a holder to let go (0: refused at once)
        self._fd: int | None = None

    @property
    def locked(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock or raise RunLocked: at once, or after `wait` seconds of another process holding it (a
        requeued job whose predecessor is still saving); creates run_dir if needed. Returns self."""
        if self._fd is not None:
            raise RuntimeError(f"RunLock of {self.run_dir} is already held by this object; release it first")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline, told = time.monotonic() + self.wait, False
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        waited = f" (after waiting {self.wait:.0f} s)" if self.wait else ""
                        raise RunLocked(_refusal(self.run_dir) + waited) from None
                    if not told:  # say what it waits for, once
                        told = True
                        log.warning("waiting up to %.0f s for the lock of %s: %s", self.wait, self.run_dir,
                                    _refusal(self.run_dir).split("; ")[0])
                    time.sleep(min(0.5, left))
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        try:
            self._write_record()
        except BaseException:
            self.release()
            raise
        log.debug("took the lock of %s", self.run_dir)
        return self

    def _write_record(self) -> None:
        now = time.time()
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.fromtimestamp(now).isoformat(timespec="seconds"), "started_unix": now}
        data = (json.dumps(record) + "\n").encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def release(self) -> None:
        """Empty the record and drop the lock; a no-op if not held. The lock file itself stays."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
