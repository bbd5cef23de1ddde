"""Atomic checkpoints of everything a run needs to continue exactly, loadable with weights_only=True.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts only: model and optimizer state
dicts, the stream position, every RNG state (python, numpy, torch CPU/CUDA, the augmentation
generator), the evaluator's history, the number of metrics.jsonl rows written, and the resolved
config. It is written to a temporary file, fsynced, then renamed over the target, so a crash while
saving never leaves a broken checkpoint under the final name.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

FORMAT_VERSION = 1
_NAME = re.compile(r"ckpt_(\d{9})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, or does not match the run; the message says what to do."""


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
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: dict, path: str | Path) -> None:
    """torch.save to path.tmp, fsync, rename over path, fsync the folder. On any error nothing changes."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def load(path: str | Path) -> dict:
    """Load a checkpoint with weights_only=True; a clear CheckpointError if it is missing or damaged."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; pass a ckpt_*.pt file or a run directory")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated zips and bad pickles
        raise CheckpointError(f"checkpoint {str(path)!r} is truncated or corrupted ({type(err).__name__}: "
                              f"{str(err)[:200]}); use an earlier ckpt_*.pt of the same run") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION or "model" not in state:
        raise CheckpointError(f"{str(path)!r} is not a streaming-ssl checkpoint (format {FORMAT_VERSION})")
    return state


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """ckpt_*.pt files of a run, oldest first."""
    run_dir = Path(run_dir)
    return sorted((p for p in run_dir.glob("ckpt_*.pt") if _NAME.search(p.name)), key=lambda p: p.name)


def latest(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def resolve(path: str | Path) -> Path:
    """A checkpoint file, or the latest checkpoint of a run directory."""
    path = Path(path)
    if path.is_dir():
        found = latest(path)
        if found is None:
            raise CheckpointError(f"run directory {str(path)!r} holds no ckpt_*.pt checkpoint")
        return found
    return path


def save_rotating(obj: dict, run_dir: str | Path, step: int, keep_last: int) -> Path:
    """Save as ckpt_<step>.pt (atomically), point ckpt.pt at it, delete all but the newest keep_last."""
    run_dir = Path(run_dir)
    path = run_dir / f"ckpt_{step:09d}.pt"
    atomic_save(obj, path)
    link = run_dir / "ckpt.pt"
    tmp_link = run_dir / "ckpt.pt.tmp"
    tmp_link.unlink(missing_ok=True)
    os.symlink(path.name, tmp_link)
    os.replace(tmp_link, link)
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
