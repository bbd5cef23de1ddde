"""Where, and with what, a run trained: RUN/run_info.jsonl, one row for each start of the run (the first and each
resume).

A run's config.yaml says what it learns, not where. Yet accuracy and speed compare only between runs of one machine
kind and precision, and one config does not fix the precision: `train.precision: auto` trains in bf16 on a CPU with
AVX512-BF16 and in float32 on an AVX2 one. A resume may also land on another machine. Each row holds:

- `started` (UTC, ISO 8601), `start_update` (0, or the update of the checkpoint that a resume continues from),
  `host` and `argv` (rank 0's);
- `machine` (the device kind as figures must name it: `device.cpu_kind()` on a CPU; on CUDA the GPU's name,
  compute capability and memory), `precision` (what training computes in: bf16, fp16 or fp32), `device`,
  `world_size`, and `machines` (each distinct machine among the ranks with its number of ranks);
- `versions` (Python, torch and its CUDA, torchvision, avalanche-lib, numpy, streaming-ssl) and `code` (the git
  commit of the checkout streaming_ssl runs from, and whether that checkout had uncommitted changes to tracked
  files; None outside a git checkout).

`lineage` keeps the rows whose training the run still holds (a resume from an older checkpoint drops the rows of
the starts after it), `machine_changes` says where that training changed machine kind or precision, and
`machine_labels` names the machines a run's figures come from (NOT_RECORDED first where the kept training began
before its first row: a run started before this file existed, or one whose damaged file was set aside);
compare.py reports them under its table, evaluate.py beside a checkpoint's probes.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
import subprocess
import sys
from collections import Counter
from pathlib import Path

import torch

FILE_NAME = "run_info.jsonl"
NOT_RECORDED = "not recorded"
PACKAGES = ("torch", "torchvision", "avalanche-lib", "numpy", "streaming-ssl")


class ProvenanceError(ValueError):
    """A run_info.jsonl that cannot be read; the message names it."""


def device_kind(device: torch.device | str) -> str:
    """The device as figures must name it: the CPU's kind (device.cpu_kind), or the GPU's name, compute capability
    and memory."""
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} (compute capability {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
    if device.type == "cpu":
        from streaming_ssl.device import cpu_kind

        return cpu_kind()
    return device.type


def precision_name(amp_dtype: torch.dtype | None) -> str:
    """bf16, fp16 or fp32 (None: no autocast)."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, str(amp_dtype))


def versions() -> dict[str, str | None]:
    """Python's version and each of PACKAGES' (None where it is not installed), torch's CUDA (None: a CPU build)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["cuda"] = torch.version.cuda
    return out


def code_version(root: Path | None = None) -> dict | None:
    """{"commit", "dirty"} of the git checkout at `root` (by default the one streaming_ssl is imported from);
    None when it is not a git checkout, or git is missing or slow."""
    root = Path(__file__).resolve().parents[1] if root is None else Path(root)
    if not (root / ".git").exists():  # our own checkout only: not a repository the package happens to sit in
        return None
    git = ["git", "--no-optional-locks", "-C", str(root)]  # never rewrites the index under the user's git
    try:
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                check=True).stdout.strip()
        status = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def start_row(*, device: torch.device, amp_dtype: torch.dtype | None, start_update: int,
              machines: list[str] | None = None) -> dict:
    """The row of one start of a run. `machines`: every rank's device_kind, in rank order (None: this process's)."""
    machines = machines or [device_kind(device)]
    return {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "start_update": int(start_update), "host": platform.node(), "argv": list(sys.argv),
            "machine": machines[0], "precision": precision_name(amp_dtype), "device": str(device),
            "world_size": len(machines), "machines": dict(Counter(machines)), "versions": versions(),
            "code": code_version()}


def read_rows(run_dir: str | Path) -> list[dict]:
    """The rows of RUN/run_info.jsonl, oldest first; [] where there is none (a run saved before it existed)."""
    path = Path(run_dir) / FILE_NAME
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ProvenanceError(f"{path} is not UTF-8 text ({err})") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ProvenanceError(f"{path} line {n} is not JSON ({err})") from None
        if not _is_row(row):
            raise ProvenanceError(f"{path} line {n} is not a row of this file (an integer start_update, machine and "
                                  "precision as text, machines as a mapping of text to counts)")
        rows.append(row)
    return rows


def _is_row(row) -> bool:
    if not isinstance(row, dict):
        return False
    start, machines = row.get("start_update"), row.get("machines", {})
    return (isinstance(start, int) and not isinstance(start, bool) and start >= 0
            and isinstance(row.get("machine"), str) and isinstance(row.get("precision"), str)
            and isinstance(machines, dict) and all(isinstance(k, str) and isinstance(v, int)
                                                   for k, v in machines.items()))


def append_row(run_dir: str | Path, row: dict) -> list[dict]:
    """Add `row` to RUN/run_info.jsonl (rewritten whole and atomically: never half a row); returns every row."""
    from streaming_ssl.atomic import atomic_write_text

    rows = [*read_rows(run_dir), row]
    atomic_write_text(Path(run_dir) / FILE_NAME, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def lineage(rows: list[dict]) -> list[dict]:
    """The rows whose training the run still holds: a start from update u drops the earlier rows that started at
    u or later (their training was not kept: it was cut before a checkpoint, or the resume took an older one)."""
    kept: list[dict] = []
    for row in rows:
        kept = [r for r in kept if r["start_update"] < row["start_update"]] + [row]
    return kept


def label(row: dict) -> str:
    """'precision on machine' of one row; a multi-rank row with ranks of several kinds names each with its count."""
    machines = row.get("machines") or {row["machine"]: 1}
    kinds = row["machine"] if len(machines) == 1 else "; ".join(f"{n} x {m}" for m, n in machines.items())
    return f"{row['precision']} on {kinds}"


def machine_labels(rows: list[dict], before_update: int | None = None) -> list[str]:
    """The distinct labels of the training a run holds (lineage), in the order it met them; NOT_RECORDED first
    where that training began before its first row. `before_update`: only the training up to that update (a
    checkpoint's); [] where there is no row at all."""
    kept = lineage(rows)
    if before_update is not None:
        kept = [r for r in kept if r["start_update"] < before_update]
    if not kept:
        return []
    unrecorded = [NOT_RECORDED] if kept[0]["start_update"] > 0 else []
    return list(dict.fromkeys(unrecorded + [label(r) for r in kept]))


def machine_changes(rows: list[dict]) -> list[str]:
    """'from update u: A -> B' for each start of the kept training (lineage) whose machine kind or precision
    differs from the start before it."""
    kept = lineage(rows)
    return [f"from update {b['start_update']}: {label(a)} -> {label(b)}" for a, b in zip(kept, kept[1:])
            if label(a) != label(b)]
