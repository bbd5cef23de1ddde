"""Compute and memory counters of a run, so that every accuracy comes with its cost.

All counts are cumulative over the run and global (summed over DDP ranks, computed from the global
batch sizes, so they need no communication): the same numbers whatever the number of processes.

- ``stream_images``: training images taken from the stream.
- ``buffer_images``: images read from a replay buffer (appended to the batch, or mixed into it).
- ``patches_forward`` / ``patches_backward``: augmented patches the trained encoder ran forward on /
  back-propagated through (equal for EMP-SSL: every patch enters the objective).
- ``frozen_forwards``: patches a frozen model (distillation) ran forward on, under inference mode.
- ``extra_forwards``: images forwarded only to choose what a buffer keeps (MinRed features).
- ``skipped_updates``: updates whose step float16's loss scaling skipped because a gradient overflowed (their
  images were seen, and counted above, but not learned from); always 0 in bf16 and float32. The strategy adds
  each update's overflow flag as a device tensor (``add_skipped``), read on the host only by ``flush()``, which
  ``as_row`` and ``state_dict`` call: counting costs no host sync per update.
- ``buffer_bytes``: bytes of images the buffer holds now (a gauge, not a sum).
- a method's own counters, ``add(name, n)``: cumulative like the others, saved and restored with them and
  reported as ``compute/<name>``; global like them (add the count over all ranks, e.g. from
  ``cl.common.global_update_images``, not one rank's share).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class ComputeCounters:
    """Cumulative compute of a run; plugins add to it, checkpoints save it, evaluation rows report it."""

    # cumulative, global (all ranks)
    stream_images: int = 0
    buffer_images: int = 0
    patches_forward: int = 0
    patches_backward: int = 0
    frozen_forwards: int = 0
    extra_forwards: int = 0
    skipped_updates: int = 0
    # a gauge: what the buffer holds now
    buffer_bytes: int = 0
    # a method's own cumulative counters (add)
    extra: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._pending_skipped: Any = None  # device flags of skipped updates not yet read (not a field: not saved)

    def add_skipped(self, flag: Any) -> None:
        """Count an update as skipped if `flag` (a 0-dim tensor, any device, or a number) is non-zero, without
        reading it: it is summed where it lives until `flush()`."""
        flag = (flag != 0) * 1  # an int tensor (or int): a sum of bool tensors would be a logical or
        self._pending_skipped = flag if self._pending_skipped is None else self._pending_skipped + flag

    def flush(self) -> None:
        """Read the pending skip flags into `skipped_updates` (on CUDA: one host sync, if any is pending)."""
        if self._pending_skipped is not None:
            pending, self._pending_skipped = self._pending_skipped, None
            self.skipped_updates += int(pending)

    def add(self, name: str, n: int = 1) -> None:
        """Add `n` to the counter `name`: one of ours, or a method's own (created at 0). Python numbers only (a
        device tensor would need a host sync per call)."""
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"a counter name is a non-empty string without '/', got {name!r}")
        if not isinstance(n, int) or isinstance(n, bool):
            raise TypeError(f"counter {name!r}: add a Python int, got {type(n).__name__} (a device tensor would "
                            "wait for the device at every update; count on the host, from the sizes you know)")
        if name in self._builtin():
            setattr(self, name, getattr(self, name) + n)
        else:
            self.extra[name] = self.extra.get(name, 0) + n

    def _builtin(self) -> dict[str, int]:
        return {f.name: int(getattr(self, f.name)) for f in fields(self) if f.name != "extra"}

    def add_update(self, *, images: int, n_patches: int) -> None:
        """One update of the trained encoder over `images` images (stream + appended buffer) x `n_patches`."""
        self.patches_forward += images * n_patches
        self.patches_backward += images * n_patches

    def as_row(self) -> dict[str, int]:
        """The counters as evaluation-row keys `compute/<name>`."""
        self.flush()
        return {f"compute/{k}": v for k, v in {**self._builtin(), **self.extra}.items()}

    def state_dict(self) -> dict:
        self.flush()
        return {**self._builtin(), "extra": dict(self.extra)}

    def load_state_dict(self, state: dict) -> None:
        self._pending_skipped = None
        for name in self._builtin():
            setattr(self, name, int(state.get(name, 0)))
        self.extra = {str(k): int(v) for k, v in (state.get("extra") or {}).items()}
