"""Atomic file writes with unique temporary names: a reader sees the old file or the new one, never half of one.

Every write goes to a temporary file in the target's folder named

    .<target name>.<pid>.<8 hex digits>.tmp        (glob: TEMP_GLOB = ".*.tmp")

so two processes (or two threads) writing the same target never share a temporary file. The data is
flushed and fsynced, the temporary file is renamed over the target (os.replace, atomic on POSIX), and
the folder is fsynced so the rename survives a power cut. On any exception, KeyboardInterrupt included,
the temporary file is removed and the target is left as it was. Only SIGKILL or a power cut can leave a
temporary file behind; `list_temp_files` finds them (readers such as `checkpoint.list_checkpoints`
never match them, and they are safe to delete when no writer is running).
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TEMP_GLOB = ".*.tmp"
_TEMP_NAME = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.tmp$")


def temp_path(path: str | Path) -> Path:
    """A fresh temporary name beside path: `.<name>.<pid>.<8 hex digits>.tmp`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def is_temp_name(name: str) -> bool:
    """True for names made by `temp_path` (used to skip leftovers of a killed writer)."""
    return bool(_TEMP_NAME.match(name))


def list_temp_files(folder: str | Path) -> list[Path]:
    """Temporary files left in folder (not recursive) by writers that were killed mid-write, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(TEMP_GLOB) if is_temp_name(p.name))


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files in folder whose writer (the PID in the name) no longer runs on this host.

    Call only while holding the run lock (runlock.py): a live writer's temp file is kept."""
    removed = []
    for path in list_temp_files(folder):
        pid = int(path.name.rsplit(".", 3)[1])
        try:
            os.kill(pid, 0)
            continue  # alive: its write is in progress
        except ProcessLookupError:
            pass
        except PermissionError:  # alive, another user's
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def fsync_dir(folder: str | Path) -> None:
    """fsync a folder so a rename inside it is durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None],
                 before_rename: Callable[[Path], None] | None = None) -> None:
    """Call write(fh) on a fresh temporary file, fsync it, rename it over path, fsync the folder.

    before_rename(tmp_path), if given, runs after the data is on disk and before the rename (a test hook).
    On any exception the temporary file is removed, the target is unchanged, and the exception propagates.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "xb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if before_rename is not None:
            before_rename(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write bytes to path atomically (see the module docstring)."""
    atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Write text to path atomically (see the module docstring); for results JSON, summary.json and the like."""
    atomic_write_bytes(path, text.encode(encoding))


def keep_lines(path: str | Path, n: int) -> int:
    """Keep the first `n` lines of a text file (rows written after a checkpoint that counted `n` are dropped),
    atomically and only if it holds more; returns the lines it holds now (0 when it does not exist)."""
    path = Path(path)
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    if len(lines) > n:
        atomic_write_text(path, "".join(lines[:n]))
    return min(n, len(lines))


def atomic_symlink(target: str, link: str | Path) -> None:
    """Point the symlink `link` at `target` atomically (a temporary link renamed over it)."""
    link = Path(link)
    tmp = temp_path(link)
    try:
        os.symlink(target, tmp)
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(link.parent)
