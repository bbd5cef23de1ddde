"""Where, and with what, a run trained: RUN/run_info.jsonl, one row for each start of the run (the first and each
resume).

A run's config.yaml says what it learns, not where. Yet accuracy and speed compare only between runs of one machine
kind and precision, and one config does not fix the precision: `train.precision: auto` trains in bf16 on a CPU with
AVX512-BF16 and in float32 on an AVX2 one. A resume may also land on another machine. Each row holds:

- `started` (UTC, ISO 8601), `start_update` (0, or the update of the checkpoint that a resume continues from),
  `host`, `argv`, `cwd`, `python` (the interpreter) and `launcher` ("torchrun" under torch elastic, else None), rank
  0's;
- `machine` (the device kind as figures must name it: `device.cpu_kind()` on a CPU; on CUDA the GPU's name,
  compute capability and memory), `precision` (what training computes in: bf16, fp16 or fp32), `device`,
  `world_size`, and `machines` (each distinct machine among the ranks with its number of ranks);
- `versions` (Python, torch and its CUDA, torchvision, avalanche-lib, numpy, streaming-ssl) and `code` (the git
  commit of the checkout streaming_ssl runs from, and whether that checkout had uncommitted changes to tracked
  files; None outside a git checkout);
- `data`: the dataset as configured, the data folder it was read from, and the number and digest of the training
  images and labels (the checkpoint's: a resume on other data is refused).

A damaged file is salvaged by `salvage_rows`: the runner sets it aside and writes its readable rows again, the new
row counting the lines it lost (`lines_lost`).

`lineage` keeps the rows whose training the run still holds (a resume from an older checkpoint drops the rows of
the starts after it); `machine_labels` names the machines a run's figures come from (NOT_RECORDED first where part
of the kept training has no row: it began before the first one, as in a run started before this file existed, or
a damaged line was lost); `machine_changes` and `code_changes` say where that training changed machine kind or
precision, and code or library versions. The runner warns of both at a start, compare.py lists the labels under
its table, and evaluate.py puts them beside a checkpoint's probes.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
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
              machines: list[str] | None = None, data: dict | None = None) -> dict:
    """The row of one start of a run. `machines`: every rank's device_kind, in rank order (None: this process's);
    `data`: what identifies the training data (runner.data_record)."""
    machines = machines or [device_kind(device)]
    return {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "start_update": int(start_update), "host": platform.node(), "argv": list(sys.argv), "cwd": os.getcwd(),
            "python": sys.executable, "launcher": "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else None,
            "machine": machines[0], "precision": precision_name(amp_dtype), "device": str(device),
            "world_size": len(machines), "machines": dict(Counter(machines)), "versions": versions(),
            "code": code_version(), "data": data}


def read_rows(run_dir: str | Path) -> list[dict]:
    """The rows of RUN/run_info.jsonl, oldest first; [] where there is none (a run saved before it existed).
    ProvenanceError names the first line that is not a row."""
    rows, problems = _parse(Path(run_dir) / FILE_NAME)
    if problems:
        raise ProvenanceError(problems[0])
    return rows


def salvage_rows(run_dir: str | Path) -> tuple[list[dict], list[str]]:
    """The rows of a damaged RUN/run_info.jsonl that can still be read, and what is wrong with each line that
    cannot (bytes that are not UTF-8 spoil only their own line)."""
    return _parse(Path(run_dir) / FILE_NAME)


def _parse(path: Path) -> tuple[list[dict], list[str]]:
    if not path.is_file():
        return [], []
    rows, problems = [], []
    for n, raw in enumerate(path.read_bytes().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            problems.append(f"{path} line {n} is not UTF-8 text ({err})")
            continue
        except json.JSONDecodeError as err:
            problems.append(f"{path} line {n} is not JSON ({err})")
            continue
        if not _is_row(row):
            problems.append(f"{path} line {n} is not a row of this file (an integer start_update, machine and "
                            "precision as text, machines as a mapping of text to counts)")
            continue
        rows.append(row)
    return rows, problems


def _is_row(row) -> bool:
    if not isinstance(row, dict):
        return False
    start, machines = row.get("start_update"), row.get("machines", {})
    return (isinstance(start, int) and not isinstance(start, bool) and start >= 0
            and isinstance(row.get("machine"), str) and isinstance(row.get("precision"), str)
            and isinstance(machines, dict) and all(isinstance(k, str) and isinstance(v, int)
                                                   for k, v in machines.items()))


def append_row(run_dir: str | Path, row: dict, *, rows: list[dict] | None = None) -> list[dict]:
    """Add `row` to RUN/run_info.jsonl (rewritten whole and atomically: never half a row) after its rows, or after
    `rows` (those salvaged from a damaged file); returns every row."""
    from streaming_ssl.atomic import atomic_write_text

    rows = [*(read_rows(run_dir) if rows is None else rows), row]
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
    """'precision on machine' of one row, 'precision on N x machine' for N ranks (each rank normalises its own share
    of the batch without SyncBatchNorm: not the training of one process), every kind with its count where the ranks
    differ. A CPU kind loses cpu_kind's ': bf16' (what `auto` would pick there): the row's precision is what ran."""
    machines = row.get("machines") or {row["machine"]: 1}
    kinds = "; ".join(f"{n} x {_kind(m)}" if n > 1 or len(machines) > 1 else _kind(m) for m, n in machines.items())
    return f"{row['precision']} on {kinds}"


def _kind(machine: str) -> str:
    return re.sub(r": (bf16|fp32)$", "", machine)


def machine_labels(rows: list[dict], before_update: int | None = None) -> list[str]:
    """The distinct labels of the training a run holds (lineage), in the order it met them; NOT_RECORDED first
    where part of it has no row (it began before the first row, or a damaged line was lost). `before_update`: only
    the training before that update (a checkpoint's, or a run's last: a start that trained nothing is left out);
    [] where there is no row at all."""
    if not rows:
        return []
    kept = lineage(rows)
    if before_update is not None:
        kept = [r for r in kept if r["start_update"] < before_update]
    if not kept or kept[0]["start_update"] > 0 or any(r.get("lines_lost") for r in kept):
        return list(dict.fromkeys([NOT_RECORDED] + [label(r) for r in kept]))
    return list(dict.fromkeys(label(r) for r in kept))


def _commit(r: dict) -> str | None:
    """A row's git commit (12 digits, ' with uncommitted changes' where its tracked files had some), or None.
    Rows are checked for what `label` needs only: the rest is read with care (an older or hand-edited row)."""
    c = r.get("code")
    if not isinstance(c, dict) or not isinstance(c.get("commit"), str):
        return None
    return c["commit"][:12] + (" with uncommitted changes" if c.get("dirty") else "")


def _versions(r: dict) -> dict:
    return r["versions"] if isinstance(r.get("versions"), dict) else {}


CODE_VERSIONS = ("torch", "avalanche-lib")  # the versions whose change may change what a run computes


def code_label(row: dict) -> str | None:
    """'commit 0123456789ab, torch 2.14.1, avalanche-lib 0.6.0' of one row (what it records of these); None where it
    records none (no git checkout, and a row without versions)."""
    parts = [f"commit {c}"] if (c := _commit(row)) else []
    parts += [f"{name} {v}" for name in CODE_VERSIONS if (v := _versions(row).get(name))]
    return ", ".join(parts) or None


def code_labels(rows: list[dict], before_update: int | None = None) -> list[str]:
    """The distinct code_labels of the training a run holds (lineage; before `before_update`, as machine_labels),
    in the order it met them; a row recording none is left out."""
    kept = [r for r in lineage(rows) if before_update is None or r["start_update"] < before_update]
    return list(dict.fromkeys(c for r in kept if (c := code_label(r))))


def code_changes(rows: list[dict]) -> list[str]:
    """'from update u: what -> what' for each start of the kept training (lineage) whose code (git commit, or
    uncommitted changes) or torch / avalanche-lib version differs from the start before it."""
    code, versions_of = _commit, _versions
    out = []
    kept = lineage(rows)
    for a, b in zip(kept, kept[1:]):
        diffs = [f"code {code(a)} -> {code(b)}"] if code(a) != code(b) else []
        va, vb = versions_of(a), versions_of(b)
        diffs += [f"{name} {va.get(name)} -> {vb.get(name)}" for name in CODE_VERSIONS
                  if va and vb and va.get(name) != vb.get(name)]
        if diffs:
            out.append(f"from update {b['start_update']}: " + ", ".join(diffs))
    return out


def machine_changes(rows: list[dict]) -> list[str]:
    """'from update u: A -> B' for each start of the kept training (lineage) whose machine kind or precision
    differs from the start before it."""
    kept = lineage(rows)
    return [f"from update {b['start_update']}: {label(a)} -> {label(b)}" for a, b in zip(kept, kept[1:])
            if label(a) != label(b)]
