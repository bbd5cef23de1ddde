"""Kill it anywhere (issue 19): a tiny real stream SIGKILLed at least 8 times, resumed after each kill, ends
bitwise equal to an uninterrupted run, with every evaluation in metrics.jsonl exactly once (and every update in
train.jsonl).

The kill points follow a seeded schedule of four kinds, each at least twice:
  update      a random delay after the session announced training ("INFO run ... on cpu"),
  checkpoint  inside the k-th checkpoint write of the session: STREAMING_SSL_TEST_CKPT_MARKER says the
              temporary file is written, STREAMING_SSL_TEST_CKPT_PAUSE holds the process before the rename,
  evaluation  as soon as the session starts extracting features for an evaluation (its tqdm bar),
  boundary    right after a new metrics.jsonl row (before that experience's checkpoint), or right after
              the checkpoint that follows it.
The points reached are printed (pytest -s) and put in every assertion message.

Each session is the real training CLI (streaming_ssl.cli.train.main, i.e. run_stream.py without its
allocator re-exec) in its own process, forked from the session's helper process that imported torch and
avalanche once (tests/zygote.py): a cold start costs ~15 s on a loaded 2-core machine, a fork ~0 s, and the
SIGKILL, the flock release by the kernel and the files left behind are those of a real process.
test_resume.py and test_runlock_cli.py cover the same CLI started as `python run_stream.py`.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from streaming_ssl import checkpoint as ckpt
from streaming_ssl.atomic import list_temp_files
from streaming_ssl.runlock import holder
from tests.zygote import Zygote

DATA = os.environ.get("STREAMING_SSL_DATA")
pytestmark = pytest.mark.skipif(not DATA or not (Path(DATA) / "cifar10.npz").is_file(),
                                reason="needs the real CIFAR-10: set STREAMING_SSL_DATA to the folder of cifar10.npz")
REPO = Path(__file__).resolve().parents[1]
BASE = ["data.train_per_class=40", "data.test_per_class=5", "stream.n_experiences=5", "train.batch_size=10",
        "eval.probe_epochs=2", "eval.knn_k=3", "model.width=0.125", "train.deterministic=true", "train.threads=1",
        "run.tensorboard=false", "run.plot=false", "run.keep_last=3", "train.log_every=1"]
MODES = {
    "class_incremental": ["run.checkpoint_every=3"],
    "online": ["stream.mode=online", "stream.online_experience_size=10", "stream.eval_every=4",
               "run.checkpoint_every=2"],
}
KILLS = 8
SESSION_S = 180  # the longest a session may take to reach its kill point or to finish (loaded machine)
PAUSE_S = 1.0  # how long a checkpoint write waits before its rename in sessions killed inside a write


def _argv(run_dir: Path, mode: str) -> list[str]:
    return ["--config", str(REPO / "configs/smoke.yaml"), f"run.out_dir={run_dir}",
            f"data.root={Path(DATA).resolve()}", *BASE, *MODES[mode]]


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")} for line in lines]


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


@dataclass
class Kill:
    kind: str
    detail: str
    landed: str = ""
    inside_write: bool = False
    inside_eval: bool = False

    def __str__(self) -> str:
        return f"{self.kind} ({self.detail}): {self.landed}"


def _schedule(seed: int) -> list[Kill]:
    rng = random.Random(seed)
    kinds = ["update", "checkpoint", "evaluation", "boundary"] * (KILLS // 4)
    rng.shuffle(kinds)
    kills = []
    for kind in kinds:
        if kind == "update":
            kills.append(Kill(kind, f"{rng.uniform(0.1, 1.0):.2f} s after training starts"))
        elif kind == "checkpoint":
            kills.append(Kill(kind, f"inside checkpoint write {rng.choice([1, 2])} of the session"))
        elif kind == "evaluation":
            kills.append(Kill(kind, "at the start of the session's first feature extraction"))
        else:
            kills.append(Kill(kind, rng.choice(["right after a new metrics row",
                                                "right after the checkpoint following a new metrics row"])))
    return kills


class Session:
    """One forked training process and what it leaves in its log, the run's files and the marker file."""

    def __init__(self, zygote: Zygote, argv: list[str], run_dir: Path, log: Path, marker: Path | None) -> None:
        self.zygote, self.run_dir, self.log, self.marker = zygote, run_dir, log, marker
        env = {ckpt.PAUSE_ENV: str(PAUSE_S), ckpt.PAUSE_MARKER_ENV: str(marker)} if marker else {}
        self.pid = zygote.start(argv, log, env)
        self.status: int | None = None

    def until(self, what: str, cond, poll: float = 0.005):
        """Poll cond() until it returns something truthy (returned); None if the process ended first."""
        deadline = time.time() + SESSION_S
        while time.time() < deadline:
            found = cond()
            if found:
                return found
            if not self.zygote.running(self.pid):
                return None
            time.sleep(poll)
        raise AssertionError(f"no '{what}' within {SESSION_S} s:\n{_text(self.log)[-3000:]}")

    def kill(self) -> None:
        self.zygote.kill(self.pid)

    def wait(self) -> int:
        self.status = self.zygote.wait(self.pid, SESSION_S)
        return self.status


def _strike(session: Session, kill: Kill) -> bool:
    """Wait for the kill point of `kill` in this session and SIGKILL it there; False if the run ended first."""
    log, run_dir = session.log, session.run_dir
    if kill.kind == "update":
        if not session.until("training start", lambda: " on cpu (" in _text(log)):
            return False
        time.sleep(float(kill.detail.split()[0]))
    elif kill.kind == "checkpoint":
        k = int(kill.detail.split()[3])
        if not session.until(f"checkpoint write {k}", lambda: len(_text(session.marker).splitlines()) >= k):
            return False
    elif kill.kind == "evaluation":
        if not session.until("feature extraction", lambda: "features " in _text(log)):
            return False
    else:
        found = session.until("evaluation logged", lambda: re.search(r"after experience (\d+)", _text(log)))
        if not found:
            return False
        exp = int(found.group(1))
        if not session.until("metrics row", lambda: _last_experience(run_dir) == exp):
            return False
        if "checkpoint" in kill.detail:
            before = set(ckpt.list_checkpoints(run_dir))
            if not session.until("next checkpoint", lambda: set(ckpt.list_checkpoints(run_dir)) - before):
                return False
    session.kill()
    return True


def _land(kill: Kill, session: Session, run_dir: Path, temps_before: set[Path]) -> None:
    """Where the killed process was, from what it left: its log, rows, checkpoints, temporary files."""
    events = re.findall(r"resumed at update \d+|features [\w/]+|after experience \d+", _text(session.log))
    temps = list_temp_files(run_dir)
    latest = ckpt.latest(run_dir)
    step = ckpt.load(latest)["position"]["global_step"] if latest else None
    kill.inside_write = bool(set(temps) - temps_before)  # the session's own write was cut short
    kill.inside_eval = bool(events) and events[-1].startswith("features")
    inside = "inside a checkpoint write (its temporary file is left); " if kill.inside_write else ""
    kill.landed = (f"{inside}last logged: {events[-1] if events else 'nothing'}; after it: {len(_rows(run_dir))} "
                   f"rows, latest checkpoint at update {step}, {len(temps)} temporary file(s)")


def _last_experience(run_dir: Path) -> int | None:
    try:
        rows = _rows(run_dir)
    except ValueError:  # a row being appended
        return None
    return rows[-1]["experience"] if rows else None


def _chaos(zygote: Zygote, tmp_path: Path, mode: str, seed: int) -> None:
    full, run_dir = tmp_path / "full", tmp_path / "chaos"
    reference = zygote.start(_argv(full, mode), tmp_path / "full.log")  # uninterrupted, runs alongside
    kills = _schedule(seed)
    hit: list[Kill] = []

    def report() -> str:
        return f"{mode}, seed {seed}, kill points hit:\n" + "\n".join(f"  {i + 1}. {k}" for i, k in enumerate(hit))

    try:
        for i, kill in enumerate(kills):
            argv = ["--resume", str(run_dir)] if i else _argv(run_dir, mode)
            if i and not (run_dir / "config.yaml").exists():  # killed before the run directory was made
                argv = _argv(run_dir, mode)
            marker = tmp_path / f"marker{i}" if kill.kind == "checkpoint" else None
            temps_before = set(list_temp_files(run_dir))
            session = Session(zygote, argv, run_dir, tmp_path / f"session{i}.log", marker)
            struck = _strike(session, kill)
            status = session.wait()
            if not struck:
                assert status == 0, f"session {i} failed ({status}):\n{_text(session.log)[-3000:]}\n{report()}"
                pytest.fail(f"the run finished before kill {i + 1} ({kill}); make the stream longer\n{report()}")
            assert status == -signal.SIGKILL, f"session {i}: {status}\n{_text(session.log)[-3000:]}\n{report()}"
            _land(kill, session, run_dir, temps_before)
            hit.append(kill)
            print(f"[{mode}] kill {i + 1}: {kill}", flush=True)

        final = Session(zygote, ["--resume", str(run_dir)], run_dir, tmp_path / "final.log", None)
        assert final.wait() == 0, f"{_text(final.log)[-3000:]}\n{report()}"
        assert "resumed at update" in _text(final.log), report()
        assert zygote.wait(reference, SESSION_S) == 0, _text(tmp_path / "full.log")[-3000:]
    finally:
        print(report(), flush=True)

    assert {k.kind for k in hit} == {"update", "checkpoint", "evaluation", "boundary"} and len(hit) >= KILLS, report()
    assert all(k.inside_write for k in hit if k.kind == "checkpoint"), f"a write was not cut short\n{report()}"
    assert any(k.inside_eval for k in hit if k.kind == "evaluation"), f"no kill inside an evaluation\n{report()}"
    got, want = _rows(run_dir), _rows(full)
    assert [(r["experience"], r["updates"]) for r in got] == [(r["experience"], r["updates"]) for r in want], report()
    assert got == want, report()
    curves = [[json.loads(line) for line in (d / "train.jsonl").read_text().splitlines()] for d in (run_dir, full)]
    assert [r["update"] for r in curves[0]] == list(range(1, len(curves[1]) + 1)), report()  # each update once
    assert curves[0] == curves[1], report()

    a, b = ckpt.load(ckpt.latest(full)), ckpt.load(ckpt.latest(run_dir))
    assert a["position"] == b["position"], report()
    assert a["model"].keys() == b["model"].keys(), report()
    different = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not different, f"final weights differ from the uninterrupted run's: {different[:5]}\n{report()}"

    # every checkpoint loads; those of the same update as the uninterrupted run's hold the same weights
    reference_names = {p.name for p in ckpt.list_checkpoints(full)}
    for path in ckpt.list_checkpoints(run_dir):
        state = ckpt.load(path)
        if path.name in reference_names:
            other = ckpt.load(full / path.name)
            assert all(torch.equal(state["model"][k], other["model"][k]) for k in other["model"]), (path, report())
    assert (run_dir / "ckpt.pt").resolve() == ckpt.latest(run_dir), report()
    assert holder(run_dir) is None, report()
    # the writes cut short by SIGKILL left temporary files; the resumed runs must have deleted them
    assert list_temp_files(run_dir) == [], (f"temporary files of killed writers were left behind (a run taking the "
                                            f"lock must delete those of dead PIDs)\n{report()}")


@pytest.mark.parametrize("mode,seed", [("class_incremental", 19), ("online", 20)])
def test_sigkill_anywhere_then_resume_is_exact(zygote: Zygote, tmp_path: Path, mode: str, seed: int) -> None:
    _chaos(zygote, tmp_path, mode, seed)
