"""Atomic writes with unique temporary names, rotation, and readers of a live run (load_latest)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from streaming_ssl import checkpoint as ckpt
from streaming_ssl.atomic import (TEMP_GLOB, atomic_write, atomic_write_bytes, atomic_write_text, is_temp_name,
                                  list_temp_files, temp_path)
from tests.conftest import child_env


def _state(step: int) -> dict:
    return {"format": ckpt.FORMAT_VERSION, "model": {"w": torch.full((4,), float(step))}, "step": step}


def test_temp_names_are_unique_per_write_and_carry_the_pid(tmp_path: Path) -> None:
    names = {temp_path(tmp_path / "ckpt_000000001.pt").name for _ in range(50)}
    assert len(names) == 50
    for name in names:
        assert name.startswith(".ckpt_000000001.pt.") and f".{os.getpid()}." in name and name.endswith(".tmp")
        assert is_temp_name(name)
        (tmp_path / name).touch()
    assert {p.name for p in tmp_path.glob(TEMP_GLOB)} == names
    assert {p.name for p in list_temp_files(tmp_path)} == names
    assert not is_temp_name("ckpt_000000001.pt") and not is_temp_name(".lock") and not is_temp_name("a.tmp")


def test_atomic_write_text_and_bytes_replace_the_target_and_leave_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "summary.json"
    atomic_write_text(target, '{"a": 1}\n')
    assert target.read_text() == '{"a": 1}\n'
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert list_temp_files(tmp_path) == []


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_an_interrupted_write_removes_its_temp_file_and_keeps_the_old_target(tmp_path: Path, error) -> None:
    target = tmp_path / "results.json"
    target.write_text("old")

    def half_then_fail(fh) -> None:
        fh.write(b"new and half")
        raise error("stopped mid-write")

    with pytest.raises(error):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old"
    assert list_temp_files(tmp_path) == []


def test_atomic_save_of_an_unpicklable_object_changes_nothing(tmp_path: Path) -> None:
    ckpt.atomic_save(_state(1), tmp_path / "ckpt_000000001.pt")
    with pytest.raises(Exception):  # noqa: B017 - pickle raises AttributeError/PicklingError depending on version
        ckpt.atomic_save({"format": 1, "model": {}, "fn": lambda: 0}, tmp_path / "ckpt_000000001.pt")
    assert ckpt.load(tmp_path / "ckpt_000000001.pt")["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_000000001.pt"]


def test_save_rotating_keeps_the_newest_points_ckpt_pt_at_it_and_ignores_temp_files(tmp_path: Path) -> None:
    leftover = temp_path(tmp_path / "ckpt_000000099.pt")
    leftover.write_bytes(b"killed mid-write")
    (tmp_path / "old_ckpt_000000050.pt").write_bytes(b"not ours")
    for step in (3, 6, 9, 12):
        ckpt.save_rotating(_state(step), tmp_path, step, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt_000000009.pt", "ckpt_000000012.pt"]
    assert os.readlink(tmp_path / "ckpt.pt") == "ckpt_000000012.pt"
    assert ckpt.latest(tmp_path).name == "ckpt_000000012.pt"
    assert list_temp_files(tmp_path) == [leftover]  # only the one we planted: rotation leaves none
    path, state = ckpt.load_latest(tmp_path)
    assert path.name == "ckpt_000000012.pt" and state["step"] == 12
    assert ckpt.load_latest(tmp_path / "ckpt_000000009.pt")[1]["step"] == 9


def test_load_latest_takes_the_next_newest_when_the_listed_newest_is_gone(tmp_path: Path) -> None:
    ckpt.save_rotating(_state(3), tmp_path, 3, keep_last=5)
    ckpt.save_rotating(_state(6), tmp_path, 6, keep_last=5)
    # a name that is listed but cannot be opened, as when rotation deletes it between listing and opening
    os.symlink("ckpt_000000007.pt", tmp_path / "ckpt_000000009.pt")
    assert ckpt.latest(tmp_path).name == "ckpt_000000009.pt"
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load(ckpt.resolve(tmp_path))
    path, state = ckpt.load_latest(tmp_path)
    assert path.name == "ckpt_000000006.pt" and state["step"] == 6


def test_load_latest_errors_clearly_on_a_run_without_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(ckpt.CheckpointError, match="holds no ckpt_"):
        ckpt.load_latest(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="load_latest"):
        ckpt.load(tmp_path)


def test_load_latest_on_a_live_run_with_rotation_never_fails(tmp_path: Path) -> None:
    ckpt.save_rotating(_state(0), tmp_path, 0, keep_last=1)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        step = 1
        try:
            while not stop.is_set():
                ckpt.save_rotating(_state(step), tmp_path, step, keep_last=1)
                step += 1
        except BaseException as err:  # surfaced by the assertion below
            errors.append(err)

    thread = threading.Thread(target=writer)
    thread.start()
    seen = []
    try:
        deadline = time.time() + 1.5
        while time.time() < deadline:
            path, state = ckpt.load_latest(tmp_path, attempts=50)
            assert state["step"] == int(path.stem.split("_")[1])
            assert torch.equal(state["model"]["w"], torch.full((4,), float(state["step"])))
            seen.append(state["step"])
    finally:
        stop.set()
        thread.join()
    assert not errors
    assert seen == sorted(seen) and len(set(seen)) > 1
    assert list_temp_files(tmp_path) == []


def test_test_hooks_let_a_killer_sigkill_inside_a_checkpoint_write(tmp_path: Path) -> None:
    ckpt.save_rotating(_state(3), tmp_path, 3, keep_last=5)
    marker = tmp_path.parent / f"{tmp_path.name}.marker"
    code = ("import sys, torch; from streaming_ssl import checkpoint as c; "
            "c.save_rotating({'format': 1, 'model': {'w': torch.ones(3)}}, sys.argv[1], 6, keep_last=5)")
    env = child_env(**{ckpt.PAUSE_ENV: "60", ckpt.PAUSE_MARKER_ENV: str(marker)})
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (marker.exists() and marker.read_text().endswith("\n")):
            assert proc.poll() is None, "the writer ended before it paused"
            time.sleep(0.02)
        assert marker.read_text() == f"writing {tmp_path / 'ckpt_000000006.pt'}\n"
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    leftovers = list_temp_files(tmp_path)
    assert len(leftovers) == 1 and leftovers[0].name.startswith(f".ckpt_000000006.pt.{proc.pid}.")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt_000000003.pt"]
    assert ckpt.load_latest(tmp_path)[1]["step"] == 3
    assert os.readlink(tmp_path / "ckpt.pt") == "ckpt_000000003.pt"


def test_a_bad_pause_value_is_named_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ckpt.PAUSE_ENV, "soon")
    with pytest.raises(ValueError, match=ckpt.PAUSE_ENV):
        ckpt.atomic_save(_state(1), tmp_path / "ckpt_000000001.pt")
    assert list(tmp_path.iterdir()) == []


def test_a_released_write_ends_its_pause_and_each_write_waits_for_its_own_release(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker, release = tmp_path / "marker", tmp_path / "release"
    monkeypatch.setenv(ckpt.PAUSE_ENV, "60")
    monkeypatch.setenv(ckpt.PAUSE_MARKER_ENV, str(marker))
    monkeypatch.setenv(ckpt.PAUSE_RELEASE_ENV, str(release))
    release.write_text("released 1\n")  # the first write is released before it starts: no 60 s pause
    t0 = time.monotonic()
    ckpt.atomic_save(_state(1), tmp_path / "ckpt_000000001.pt")
    assert time.monotonic() - t0 < 30
    assert ckpt.load(tmp_path / "ckpt_000000001.pt")["step"] == 1
    # the second write waits (its temporary file written, the target not yet there) until a second line comes
    writer = threading.Thread(target=ckpt.atomic_save, args=(_state(2), tmp_path / "ckpt_000000002.pt"))
    writer.start()
    try:
        deadline = time.time() + 60
        while len(marker.read_text().splitlines()) < 2 and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert writer.is_alive() and not (tmp_path / "ckpt_000000002.pt").exists()
        assert len(list_temp_files(tmp_path)) == 1
    finally:
        with release.open("a") as fh:
            fh.write("released 2\n")
        writer.join(timeout=60)
    assert not writer.is_alive() and ckpt.load(tmp_path / "ckpt_000000002.pt")["step"] == 2
    with release.open("a") as fh:  # "all": this and every later write go on without a pause
        fh.write("all\n")
    t0 = time.monotonic()
    for step in (3, 4, 5):
        ckpt.atomic_save(_state(step), tmp_path / f"ckpt_00000000{step}.pt")
    assert time.monotonic() - t0 < 30
    assert list_temp_files(tmp_path) == []


def test_a_release_file_without_a_marker_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ckpt.PAUSE_RELEASE_ENV, str(tmp_path / "release"))
    with pytest.raises(ValueError, match=ckpt.PAUSE_MARKER_ENV):
        ckpt.atomic_save(_state(1), tmp_path / "ckpt_000000001.pt")
    assert list(tmp_path.iterdir()) == []


def test_nonfinite_names_finds_each_bad_float_tensor_in_order_and_ignores_the_rest() -> None:
    nan, inf = float("nan"), float("inf")
    tree = {"model": {"a.weight": torch.ones(3), "b.weight": torch.tensor([1.0, nan]), "n": torch.tensor(7)},
            "optimizer": {0: {"momentum_buffer": torch.tensor([-inf]).to(torch.bfloat16)}, 1: {"step": 3}},
            "plugins": {"replay": {"images": torch.zeros(2, 3, dtype=torch.uint8), "feats": [torch.zeros(2),
                                                                                              torch.full((2,), nan)]}},
            "note": "text", "scale": nan}  # a Python float is not a tensor: not the check's business
    assert ckpt.nonfinite_names(tree) == ["model.b.weight", "optimizer.0.momentum_buffer", "plugins.replay.feats.1"]
    assert ckpt.nonfinite_names({"w": torch.ones(2), "empty": torch.empty(0)}) == []
    assert ckpt.nonfinite_names({}) == []
    assert ckpt.nonfinite_names([torch.zeros(1), torch.tensor([inf])], prefix="x") == ["x.1"]


def test_unloadable_names_lists_what_weights_only_loading_refuses() -> None:
    import collections

    import numpy as np

    class Mine:
        pass

    ok = {"t": torch.ones(2), "n": 3, "x": 0.5, "s": "a", "b": b"z", "none": None, "d": torch.float32,
          "dev": torch.device("cpu"), "size": torch.Size([2]), 7: [1, (2.0, {"k": torch.zeros(1)})],
          "od": collections.OrderedDict(a=1)}
    assert ckpt.unloadable_names(ok) == []
    bad = {"a": np.float64(1.0), "b": [1, np.zeros(2)], "c": {"d": {1, 2}}, "e": Mine(), (1, 2): 0}
    assert ckpt.unloadable_names(bad, "plugins") == [
        "plugins.a (numpy.float64)", "plugins.b[1] (numpy.ndarray)", "plugins.c.d (builtins.set)",
        f"plugins.e ({__name__}.test_unloadable_names_lists_what_weights_only_loading_refuses.<locals>.Mine)",
        "plugins[(1, 2)] (a key of type builtins.tuple)"]
    for value in ok.values():  # each kind the check passes really loads with weights_only=True
        buf = io.BytesIO()
        torch.save({"v": value}, buf)
        buf.seek(0)
        torch.load(buf, weights_only=True)


def test_a_checkpoint_holding_an_object_weights_only_refuses_says_so(tmp_path: Path) -> None:
    """Not "truncated or corrupted" (an earlier checkpoint of the same run would not help): the refused type."""
    import numpy as np

    path = tmp_path / "ckpt_000000003.pt"
    torch.save({**_state(3), "plugins": {"mine": {"note": np.float64(1.0)}}}, path)
    with pytest.raises(ckpt.CheckpointError, match=r"holds a numpy\S*scalar object, which loading with "
                                                   r"weights_only=True refuses.*plugin's state_dict\(\)") as err:
        ckpt.load(path)
    assert "truncated" not in str(err.value)


def test_a_missing_checkpoint_names_the_path_and_what_to_pass(tmp_path: Path) -> None:
    """What evaluate.py --checkpoint / --resume users see: the path and the fix, no Python function names."""
    missing = tmp_path / "runs" / "nonexist"
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_latest(missing)
    message = str(err.value)
    assert f"checkpoint {str(missing)!r} does not exist" in message
    assert "give a ckpt_*.pt file (a run directory holding them: evaluate.py --checkpoint, load_latest)" in message
    with pytest.raises(ckpt.CheckpointError, match=r"holds no ckpt_\*\.pt checkpoint; pass a run directory that has "
                                                   r"saved one \(see run\.checkpoint_every\), or a ckpt_\*\.pt file"):
        ckpt.resolve(tmp_path)


def _write_npz(path: Path) -> None:
    """An .npz: a zip archive like torch.save's, but without its data.pkl."""
    import numpy as np

    np.savez(path, x=np.zeros(3))


@pytest.mark.parametrize("name, write", [
    ("arrays.npz", _write_npz),
    ("notes.txt", lambda p: p.write_text("not a checkpoint\n")),
    ("weights.pt", lambda p: p.write_bytes(b"")),
])
def test_a_file_that_never_was_a_checkpoint_says_so(tmp_path: Path, name: str, write) -> None:
    write(tmp_path / name)
    with pytest.raises(ckpt.CheckpointError, match=r"is not a PyTorch checkpoint \(not a file torch\.save wrote; .*\); "
                                                   r"pass a run directory holding ckpt_\*\.pt checkpoints, or one of "
                                                   r"its ckpt_\*\.pt files") as err:
        ckpt.load_latest(tmp_path / name)
    assert "truncated" not in str(err.value)


@pytest.mark.parametrize("content", [b"", bytes(4096), b"not a checkpoint\n"])
def test_a_damaged_file_under_a_checkpoint_name_is_damaged_not_foreign(tmp_path: Path, content: bytes) -> None:
    """An empty or zero-filled ckpt_*.pt (a crash, a copy cut short) in a run directory: the user gave the run
    directory already; the advice is an earlier checkpoint, not another kind of file."""
    ckpt.atomic_save(_state(1), tmp_path / "ckpt_000000001.pt")
    (tmp_path / "ckpt_000000002.pt").write_bytes(content)
    with pytest.raises(ckpt.CheckpointError, match=r"ckpt_000000002\.pt' is truncated or corrupted .*; use an earlier "
                                                   r"ckpt_\*\.pt of the same run"):
        ckpt.load(tmp_path / "ckpt_000000002.pt")


def test_a_checkpoint_cut_short_is_truncated_not_foreign(tmp_path: Path) -> None:
    ckpt.atomic_save(_state(1), tmp_path / "ckpt_000000001.pt")
    whole = (tmp_path / "ckpt_000000001.pt").read_bytes()
    (tmp_path / "ckpt_000000002.pt").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ckpt.CheckpointError, match=r"ckpt_000000002\.pt' is truncated or corrupted .*; use an earlier "
                                                   r"ckpt_\*\.pt of the same run"):
        ckpt.load_latest(tmp_path)
