"""Atomic checkpoints of everything a run needs to continue exactly, loadable with weights_only=True.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only: model and optimizer state
dicts, the stream position, every RNG state (python, numpy, torch CPU/CUDA, the augmentation
generator), the evaluator's history, the number of metrics.jsonl rows written, and the resolved
config. It is written to a uniquely named temporary file (streaming_ssl/atomic.py), fsynced, then renamed
over the target, so a crash while saving never leaves a broken checkpoint under the final name, and a
reader without the run lock (evaluate on a live run) sees whole checkpoints only: use `load_latest`, which
also survives the rotation deleting the file it chose.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import re
import time
from pathlib import Path

import numpy as np
import torch

from streaming_ssl.atomic import atomic_symlink, atomic_write

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PAUSE_ENV = "STREAMING_SSL_TEST_CKPT_PAUSE"
PAUSE_MARKER_ENV = "STREAMING_SSL_TEST_CKPT_MARKER"
PAUSE_RELEASE_ENV = "STREAMING_SSL_TEST_CKPT_RELEASE"
_NAME = re.compile(r"ckpt_(\d{9})\.pt")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, or does not match the run; the message says what to do."""


def nonfinite_names(tree, prefix: str = "") -> list[str]:
    """The dotted names of the floating-point tensors in `tree` (nested dicts, lists, tuples) holding a NaN or an
    infinity, in `tree`'s order. One host read per device, however many tensors: a check before a save does not
    wait on the device once per tensor."""
    named: list[tuple[str, torch.Tensor]] = []

    def walk(node, name: str) -> None:
        if isinstance(node, torch.Tensor):
            if node.is_floating_point() or node.is_complex():
                named.append((name, node))
        elif isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{name}.{key}" if name else str(key))
        elif isinstance(node, (list, tuple)):
            for i, value in enumerate(node):
                walk(value, f"{name}.{i}" if name else str(i))

    walk(tree, prefix)
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, t) in enumerate(named):
        by_device.setdefault(t.device, []).append(i)
    finite = [True] * len(named)
    for rows in by_device.values():
        for i, ok in zip(rows, torch.stack([torch.isfinite(named[i][1]).all() for i in rows]).tolist()):
            finite[i] = ok
    return [name for (name, _), ok in zip(named, finite) if not ok]


# what torch.load(weights_only=True) rebuilds without an allow-list: besides tensors and containers of them
_SAFE_LEAVES = (int, float, bool, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size,
                torch.layout, torch.memory_format)


def unloadable_names(tree, prefix: str = "") -> list[str]:
    """'name (type)' of every value in `tree` that torch.load(weights_only=True) would refuse, in tree order: what
    is not a tensor, a Python number, string, bytes or None, a torch dtype/device/Size, or a dict (str or int
    keys), list or tuple of these; e.g. a numpy scalar or array, a set, or an object of a user's class."""
    found: list[str] = []

    def walk(node, name: str) -> None:
        if isinstance(node, torch.Tensor) or type(node) in _SAFE_LEAVES:
            return
        if type(node) in (dict, collections.OrderedDict):
            for key, value in node.items():
                if type(key) not in (str, int):
                    found.append(f"{name}[{key!r}] (a key of type {type(key).__module__}.{type(key).__qualname__})")
                else:
                    walk(value, f"{name}.{key}" if name else str(key))
        elif type(node) in (list, tuple):
            for i, value in enumerate(node):
                walk(value, f"{name}[{i}]")
        else:
            found.append(f"{name} ({type(node).__module__}.{type(node).__qualname__})")

    walk(tree, prefix)
    return found


def rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) RNG states as weights_only-safe values."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():  # the devices both machines have
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def atomic_save(obj: dict, path: str | Path) -> None:
    """torch.save to a unique temporary file, fsync, rename over path, fsync the folder.

    The temporary file is `.<name>.<pid>.<8 hex>.tmp` beside path (`atomic.TEMP_GLOB`), removed on any
    exception; on any error the target is unchanged.

    Test hooks (for chaos tests that SIGKILL a run inside a checkpoint write; unset in normal use):
      STREAMING_SSL_TEST_CKPT_MARKER=<file>: after the temporary file is written and fsynced, append the
        line "writing <path>" to <file> (so the killer knows the process is inside a write);
      STREAMING_SSL_TEST_CKPT_PAUSE=<seconds>: then sleep that long before the rename;
      STREAMING_SSL_TEST_CKPT_RELEASE=<file> (with the marker): end that pause as soon as <file> holds at least
        as many lines as the marker file (the test released this write), or a line "all" (and every later one).
    """
    atomic_write(path, lambda fh: torch.save(obj, fh), before_rename=lambda _tmp: _test_pause(Path(path)))


def _test_pause(path: Path) -> None:
    """The STREAMING_SSL_TEST_CKPT_MARKER / _PAUSE / _RELEASE hooks of atomic_save."""
    marker = os.environ.get(PAUSE_MARKER_ENV)
    pause = os.environ.get(PAUSE_ENV)
    release = os.environ.get(PAUSE_RELEASE_ENV)
    if release and not marker:
        raise ValueError(f"{PAUSE_RELEASE_ENV} needs {PAUSE_MARKER_ENV}: set both or unset {PAUSE_RELEASE_ENV}")
    write = 0
    if marker:
        with open(marker, "a") as fh:
            fh.write(f"writing {path}\n")
        write = len(_lines(marker))
    if pause:
        try:
            seconds = float(pause)
        except ValueError:
            raise ValueError(f"{PAUSE_ENV}={pause!r} is not a number of seconds; set it to e.g. 5 or unset it") from None
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if release and (len(released := _lines(release)) >= write or "all" in released):
                break
            time.sleep(min(left, 0.02) if release else left)


def _lines(path: str) -> list[str]:
    try:
        with open(path) as fh:
            return fh.read().splitlines()
    except FileNotFoundError:
        return []


def _read(path: Path) -> dict:
    """Load and check one checkpoint; FileNotFoundError if it is not there, CheckpointError if it is damaged."""
    fh = open(path, "rb")  # once open, the data stays readable even if a writer deletes the file
    try:
        state = torch.load(fh, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated zips and bad pickles
        import zipfile  # only on this error path

        fh.seek(0)
        head = fh.read(4)
        foreign = head != b"PK\x03\x04" and head[:1] != b"\x80"  # torch.save writes a zip; torch < 1.6 a pickle
        if head == b"PK\x03\x04":  # torch's zip holds a data.pkl (an .npz does not); one cut short has no directory
            try:
                with zipfile.ZipFile(fh) as archive:
                    foreign = not any(n == "data.pkl" or n.endswith("/data.pkl") for n in archive.namelist())
            except (zipfile.BadZipFile, OSError, ValueError):
                pass
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if refused and not foreign:  # whole, but holding an object the safe loader does not rebuild
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds a {refused.group(1)} object, which loading with weights_only=True "
                "refuses (it could run code); this version of streaming-ssl saves no such object, so a plugin's "
                "state_dict() or a newer/other program put it there: store tensors, Python numbers, strings, "
                "lists and dicts only") from err
        detail = f"{type(err).__name__}: {str(err)[:200]}"
        if foreign and not (_NAME.fullmatch(path.name) or path.name == "ckpt.pt"):  # ours by name: damaged
            raise CheckpointError(f"{str(path)!r} is not a PyTorch checkpoint (not a file torch.save wrote; {detail}); "
                                  "pass a run directory holding ckpt_*.pt checkpoints, or one of its ckpt_*.pt "
                                  "files") from err
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated or corrupted ({detail}); use an earlier "
                              "ckpt_*.pt of the same run") from err
    finally:
        fh.close()
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION or "model" not in state:
        raise CheckpointError(f"{str(path)!r} is not a streaming-ssl checkpoint (format {FORMAT_VERSION})")
    return state


def load(path: str | Path) -> dict:
    """Load a checkpoint with weights_only=True; a clear CheckpointError if it is missing or damaged."""
    path = Path(path)
    if path.is_dir():  # only a Python caller gets here: the command lines load through load_latest
        raise CheckpointError(f"{str(path)!r} is a directory, not a checkpoint file; pass a ckpt_*.pt file (to load "
                              "the newest checkpoint of a run directory use load_latest)")
    try:
        return _read(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; check the path: give a ckpt_*.pt file (a "
                              "run directory holding them: evaluate.py --checkpoint, load_latest)") from None


def load_latest(path: str | Path, attempts: int = 5) -> tuple[Path, dict]:
    """(file, state) of a checkpoint file, or of the newest checkpoint of a run directory.

    Safe on a live run without its lock: checkpoints appear by atomic rename, and when the chosen file is
    deleted by the writer's rotation between listing and opening, the directory is listed again and the
    newest checkpoint not yet found gone is taken (up to `attempts` tries). A damaged newest checkpoint
    raises CheckpointError (it is not skipped silently).
    """
    path = Path(path)
    if not path.is_dir():
        return path, load(path)
    gone: set[Path] = set()
    for _ in range(attempts):
        candidates = [p for p in list_checkpoints(path) if p not in gone]
        if not candidates:
            break
        found = candidates[-1]
        try:
            return found, _read(found)
        except FileNotFoundError:
            log.info("checkpoint %s was rotated away while opening it; taking the next newest", found)
            gone.add(found)
    raise CheckpointError(f"run directory {str(path)!r} holds no ckpt_*.pt checkpoint (or its checkpoints were "
                          f"deleted while reading, {attempts} times); check the path or retry")


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """ckpt_<9 digits>.pt files of a run, oldest first (ckpt.pt, temporary and other files are ignored)."""
    run_dir = Path(run_dir)
    return sorted((p for p in run_dir.glob("ckpt_*.pt") if _NAME.fullmatch(p.name)), key=lambda p: p.name)


def latest(run_dir: str | Path) -> Path | None:
    """The newest ckpt_*.pt of a run directory, or None. To load it on a live run, use load_latest."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def step_of(path: str | Path) -> int:
    """The update a ckpt_<9 digits>.pt was saved after."""
    match = _NAME.fullmatch(Path(path).name)
    if match is None:
        raise CheckpointError(f"{str(path)!r} is not named ckpt_<9 digits>.pt")
    return int(match.group(1))


def resolve(path: str | Path) -> Path:
    """A checkpoint file, or the latest checkpoint of a run directory (load_latest also survives rotation)."""
    path = Path(path)
    if path.is_dir():
        found = latest(path)
        if found is None:
            raise CheckpointError(f"run directory {str(path)!r} holds no ckpt_*.pt checkpoint; pass a run directory "
                                  "that has saved one (see run.checkpoint_every), or a ckpt_*.pt file")
        return found
    return path


def save_rotating(obj: dict, run_dir: str | Path, step: int, keep_last: int) -> Path:
    """Save as ckpt_<step>.pt (atomically), point ckpt.pt at it, delete all but the newest keep_last."""
    run_dir = Path(run_dir)
    path = run_dir / f"ckpt_{step:09d}.pt"
    atomic_save(obj, path)
    atomic_symlink(path.name, run_dir / "ckpt.pt")
    for old in list_checkpoints(run_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def check_model_matches(state: dict, model: torch.nn.Module, where: str) -> None:
    """CheckpointError naming the first mismatching tensor when a checkpoint is of another architecture/width."""
    own = model.state_dict()
    theirs = state["model"]
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    shapes = [(k, tuple(theirs[k].shape), tuple(v.shape)) for k, v in own.items() if k in theirs and theirs[k].shape != v.shape]
    if missing or unexpected or shapes:
        detail = (f"first shape mismatch {shapes[0][0]}: checkpoint {shapes[0][1]} vs model {shapes[0][2]}" if shapes
                  else f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        raise CheckpointError(f"checkpoint {where} does not fit this model ({detail}); it was trained with another "
                              "architecture, width or head size: use the model settings it was saved with "
                              "(they are in its config)")


# the names the package exports (streaming_ssl.load_checkpoint, streaming_ssl.load_latest_checkpoint)
load_checkpoint = load
load_latest_checkpoint = load_latest
