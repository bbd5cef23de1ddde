"""provenance.py: where and with what each start of a run trained (RUN/run_info.jsonl), and what compare and a
resume make of a run that moved between machine kinds or precisions."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from streaming_ssl import provenance
from streaming_ssl.device import cpu_kind

DATA = os.environ.get("STREAMING_SSL_DATA")
REPO = Path(__file__).resolve().parents[2]
OTHER = "Other CPU (family 6 model 1), 2 cores, AVX2: fp32"
OTHER_KIND = "Other CPU (family 6 model 1), 2 cores, AVX2"  # as labels name it: without auto's choice


def _row(start: int, machine: str = "A", precision: str = "bf16", **extra) -> dict:
    return {"start_update": start, "machine": machine, "precision": precision, **extra}


def test_lineage_keeps_the_starts_whose_training_the_run_holds() -> None:
    """A start from update u supersedes the earlier starts at u or later: one killed before its first checkpoint
    (a resume from the same update), or cut back by a resume from an older checkpoint."""
    rows = [_row(0, "A"), _row(40, "B"), _row(40, "C"), _row(80, "D"), _row(60, "E")]
    assert [r["machine"] for r in provenance.lineage(rows)] == ["A", "C", "E"]
    assert provenance.lineage([_row(0, "A"), _row(0, "B")]) == [_row(0, "B")]  # killed before its first checkpoint
    assert provenance.machine_labels(rows) == ["bf16 on A", "bf16 on C", "bf16 on E"]
    # a kind that trained nothing kept is no change; a precision alone is one
    assert provenance.machine_changes([_row(0, "A"), _row(10, "B"), _row(10, "A")]) == []
    assert provenance.machine_changes([_row(0, "A"), _row(10, "A", "fp32")]) == [
        "from update 10: bf16 on A -> fp32 on A"]
    # ranks of several kinds are each named with their count
    mixed = _row(0, "A", machines={"A": 2, "B": 1}, world_size=3)
    assert provenance.label(mixed) == "bf16 on 2 x A; 1 x B"
    # several ranks are not one process (each normalises its own share of the batch): the count is in the label
    assert provenance.label(_row(0, "A", machines={"A": 4})) == "bf16 on 4 x A"
    assert provenance.label(_row(0, "A", machines={"A": 1})) == "bf16 on A"
    # what ran, not what auto would pick on that CPU
    assert provenance.label(_row(0, OTHER, "bf16")) == f"bf16 on {OTHER_KIND}"


def test_rows_are_appended_whole_and_a_damaged_file_is_named(tmp_path: Path) -> None:
    assert provenance.read_rows(tmp_path) == []  # a run saved before the file existed
    provenance.append_row(tmp_path, _row(0))
    assert provenance.append_row(tmp_path, _row(7, "B")) == [_row(0), _row(7, "B")]
    assert provenance.read_rows(tmp_path) == [_row(0), _row(7, "B")]
    assert list(tmp_path.iterdir()) == [tmp_path / provenance.FILE_NAME]  # no temporary file left
    path = tmp_path / provenance.FILE_NAME
    path.write_text(path.read_text() + '{"start_update": 9, "mach')  # a torn line, as a copy cut short leaves
    with pytest.raises(provenance.ProvenanceError, match=f"{path} line 3 is not JSON"):
        provenance.read_rows(tmp_path)
    for bad in ('{"start_update": 0}', '{"start_update": null, "machine": "A", "precision": "bf16"}',
                '{"start_update": 1, "machine": "A", "precision": "bf16", "machines": ["A"]}'):
        path.write_text(bad + "\n")
        with pytest.raises(provenance.ProvenanceError, match="line 1 is not a row of this file"):
            provenance.read_rows(tmp_path)
    path.write_bytes(b'{"start_update": 0, "machine": "\xff"}\n')
    with pytest.raises(provenance.ProvenanceError, match="is not UTF-8 text"):
        provenance.read_rows(tmp_path)


def test_training_before_the_first_row_is_named_not_recorded() -> None:
    """A run started before run_info.jsonl existed and resumed since (or one whose damaged file was set aside):
    its first row starts past update 0, so part of its training ran where nothing says; a checkpoint's own
    machines are those of the starts before its update."""
    rows = [_row(40, "B"), _row(90, "C", "fp32")]
    assert provenance.machine_labels(rows) == [provenance.NOT_RECORDED, "bf16 on B", "fp32 on C"]
    assert provenance.machine_labels(rows, before_update=40) == [provenance.NOT_RECORDED]  # of updates 0..39
    assert provenance.machine_labels([], before_update=40) == []  # no record at all
    assert provenance.machine_labels(rows, before_update=60) == [provenance.NOT_RECORDED, "bf16 on B"]
    assert provenance.machine_labels([_row(0, "A"), _row(50, "B")], before_update=50) == ["bf16 on A"]
    assert provenance.machine_changes(rows) == ["from update 90: bf16 on B -> fp32 on C"]
    # a salvaged file: its new row counts the lines lost, which may have been starts of the kept training
    assert provenance.machine_labels([_row(0, "A"), _row(9, "A", lines_lost=1)]) == [provenance.NOT_RECORDED,
                                                                                     "bf16 on A"]


def test_code_changes_name_commits_and_library_versions() -> None:
    def row(start: int, commit: str | None, dirty: bool = False, torch_version: str = "2.14.1") -> dict:
        return _row(start, code=None if commit is None else {"commit": commit * 40, "dirty": dirty},
                    versions={"torch": torch_version, "avalanche-lib": "0.6.0"})

    assert provenance.code_changes([row(0, "a"), row(5, "a")]) == []
    assert provenance.code_changes([row(0, "a"), row(5, "a", dirty=True), row(9, "b", torch_version="2.11.0")]) == [
        f"from update 5: code {'a' * 12} -> {'a' * 12} with uncommitted changes",
        f"from update 9: code {'a' * 12} with uncommitted changes -> {'b' * 12}, torch 2.14.1 -> 2.11.0"]
    assert provenance.code_changes([row(0, None), row(5, "a"), row(5, None)]) == []  # the second start at 5 replaced
    # fields a hand-edited or older file may hold in another shape: read as absent, never an error
    odd = [_row(0, code="abc", versions=["2.14"]), _row(5, code={"dirty": True}, versions=None)]
    assert provenance.code_changes(odd) == []

def test_a_start_row_names_the_machine_precision_versions_and_code(tmp_path: Path) -> None:
    row = provenance.start_row(device=torch.device("cpu"), amp_dtype=torch.bfloat16, start_update=12,
                               machines=[cpu_kind(), cpu_kind(), OTHER])
    assert (row["machine"], row["precision"], row["start_update"], row["world_size"]) == (cpu_kind(), "bf16", 12, 3)
    assert (row["cwd"], row["python"], row["launcher"]) == (os.getcwd(), sys.executable, None)
    assert row["machines"] == {cpu_kind(): 2, OTHER: 1}
    assert row["versions"]["torch"] == importlib.metadata.version("torch") and row["versions"]["python"]
    assert row["versions"]["avalanche-lib"] == importlib.metadata.version("avalanche-lib")
    assert json.loads(json.dumps(row)) == row  # JSON as it is
    assert provenance.precision_name(None) == "fp32" and provenance.precision_name(torch.float16) == "fp16"
    assert provenance.start_row(device=torch.device("cpu"), amp_dtype=None, start_update=0)["machines"] == {
        cpu_kind(): 1}
    # the code: a commit, and whether tracked files changed since; None outside a git checkout
    assert provenance.code_version(tmp_path) is None
    if shutil.which("git") is None:
        return
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "a.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "a.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "a"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / "untracked.txt").write_text("not code")
    assert provenance.code_version(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "a.py").write_text("x = 2\n")
    assert provenance.code_version(tmp_path) == {"commit": head, "dirty": True}


def test_a_damaged_run_info_is_set_aside_and_training_goes_on(tmp_path: Path, caplog) -> None:
    """A damaged file is set aside (a second one beside the first, never over it) and the record starts afresh; a
    record that cannot be written at all is a warning, not an error: the run trains on."""
    from streaming_ssl.runner import record_start

    good = json.dumps(_row(0, "A")) + "\n"
    damages = (good + "not json\n", b'\xff\xfe bad\n' + good.encode() + b'{"start_update": "x"}\n')
    for n, damage in enumerate(damages):
        path = tmp_path / provenance.FILE_NAME
        path.write_bytes(damage.encode() if isinstance(damage, str) else damage)
        with caplog.at_level("WARNING"):
            record_start(tmp_path, torch.device("cpu"), None, 5 + n)
        rows = provenance.read_rows(tmp_path)  # the readable row kept, then this start's, which counts the lost
        assert [(r["start_update"], r["precision"], r.get("lines_lost")) for r in rows] == [
            (0, "bf16", None), (5 + n, "fp32", n + 1)]
    assert (tmp_path / (provenance.FILE_NAME + ".damaged")).read_text() == good + "not json\n"
    assert (tmp_path / (provenance.FILE_NAME + ".damaged-2")).read_bytes() == damages[1]
    assert "line 2 is not JSON" in caplog.text and "line 1 is not UTF-8 text" in caplog.text
    assert "(and 1 more lines); the file is set aside as run_info.jsonl.damaged-2" in caplog.text
    caplog.clear()
    not_a_folder = tmp_path / "afile"
    not_a_folder.write_text("x")
    with caplog.at_level("WARNING"):
        record_start(not_a_folder, torch.device("cpu"), None, 0)  # no exception
    assert f"could not record this start in {not_a_folder / provenance.FILE_NAME}" in caplog.text
    assert "training goes on without it" in caplog.text


def test_compare_warns_only_for_recorded_kinds_and_names_unrecorded_runs(tmp_path: Path, caplog, capsys) -> None:
    """Runs of one machine beside a run started before run_info.jsonl existed: no warning (not recorded is no
    kind), and the note names the run it does not cover; a seed of the group that trained partly in another
    precision: the warning that the group's mean mixes them; groups of different precisions (an ablation, one
    config each): the milder warning, each group's machines listed."""
    from streaming_ssl.cli import compare
    from streaming_ssl.config import load_config, save_config

    def make(name: str, seed: int, *rows: dict, precision: str = "auto", updates: int = 10) -> Path:
        run_dir = tmp_path / name
        run_dir.mkdir()
        save_config(load_config(REPO / "configs/smoke.yaml", [f"train.seed={seed}", f"train.precision={precision}"]),
                    run_dir / "config.yaml")
        (run_dir / "metrics.jsonl").write_text(json.dumps({"samples_seen": 10, "updates": updates,
                                                           "probe/acc_all": 0.25}) + "\n")
        (run_dir / "summary.json").write_text("{}")
        for row in rows:
            provenance.append_row(run_dir, row)
        return run_dir

    a, old = make("a", 0, _row(0, "A")), make("old", 1)
    assert compare.main([str(a), str(old)]) == 0
    assert capsys.readouterr().out.endswith(f"\nTrained on: bf16 on A (not recorded for part or all of {old}).\n")
    assert "more than one machine kind" not in caplog.text
    other = make("other", 2, _row(0, "A"), _row(1, "A", "fp32"))
    assert compare.main([str(a), str(old), str(other)]) == 0
    assert ("runs averaged in one group trained on more than one machine kind or precision (a): the group's mean "
            "mixes them; accuracy and wall time compare only within one kind and precision (bf16 on A; fp32 on A;")\
        in caplog.text
    # which seed ran where
    assert capsys.readouterr().out.endswith(f"\n- a: bf16 on A (a, other); {provenance.NOT_RECORDED} (old); fp32 on "
                                            "A (other)\n")
    caplog.clear()
    fp32 = make("fp32", 0, _row(0, "A", "fp32"), precision="fp32")
    assert compare.main([str(a), str(fp32)]) == 0
    assert "the groups trained on different machine kinds or precisions: where that is not the setting" in caplog.text
    assert "averaged in one group" not in caplog.text
    assert capsys.readouterr().out.endswith("\n- a: bf16 on A\n- fp32: fp32 on A\n")
    # a start after the last evaluated update trained nothing that was evaluated; a damaged record is read as far
    # as it can be, with a warning, and never refuses the comparison
    caplog.clear()
    late = make("late", 3, _row(0, "A"), _row(10, "B", "fp32"))
    (late / provenance.FILE_NAME).write_text((late / provenance.FILE_NAME).read_text() + "garbage\n")
    assert compare.main([str(a), str(late)]) == 0
    assert f"{late / provenance.FILE_NAME} line 3 is not JSON" in caplog.text and "taken as not recorded" in caplog.text
    assert capsys.readouterr().out.endswith(f"\nTrained on: bf16 on A (not recorded for part or all of {late}).\n")


def test_code_labels_and_compare_name_the_code_each_seed_trained_with(tmp_path: Path, caplog, capsys) -> None:
    """code_labels: the commit (and uncommitted changes) and the torch / avalanche-lib versions of the training a run
    holds; compare_runs warns where the seeds of one group trained with different code and names which, and lists
    each group's code when groups differ (no warning: an ablation run at two commits is common)."""
    from streaming_ssl.cli import compare
    from streaming_ssl.config import load_config, save_config

    def code(commit: str, dirty: bool = False, torch_version: str = "2.14.1") -> dict:
        return {"code": {"commit": commit * 40, "dirty": dirty},
                "versions": {"torch": torch_version, "avalanche-lib": "0.6.0", "numpy": "2.0"}}

    rows = [_row(0, **code("a")), _row(5, **code("b", True)), _row(5, **code("a", False, "2.11.0")),
            _row(9, machine="A")]  # the start at 5 replaced by another; the last records no code
    assert provenance.code_labels(rows) == ["commit aaaaaaaaaaaa, torch 2.14.1, avalanche-lib 0.6.0",
                                            "commit aaaaaaaaaaaa, torch 2.11.0, avalanche-lib 0.6.0"]
    assert provenance.code_labels(rows, before_update=5) == ["commit aaaaaaaaaaaa, torch 2.14.1, avalanche-lib 0.6.0"]
    assert provenance.code_label(_row(0, **code("b", True))) == (
        "commit bbbbbbbbbbbb with uncommitted changes, torch 2.14.1, avalanche-lib 0.6.0")
    assert provenance.code_label(_row(0)) is None and provenance.code_label(_row(0, code="junk")) is None

    def make(name: str, seed: int, lr: float, *starts: dict) -> Path:
        run_dir = tmp_path / name
        run_dir.mkdir()
        save_config(load_config(REPO / "configs/smoke.yaml", [f"train.seed={seed}", f"optim.lr={lr}"]),
                    run_dir / "config.yaml")
        (run_dir / "metrics.jsonl").write_text(json.dumps({"samples_seen": 10, "updates": 10,
                                                           "probe/acc_all": 0.25}) + "\n")
        (run_dir / "summary.json").write_text("{}")
        for row in starts:
            provenance.append_row(run_dir, row)
        return run_dir

    s0, s1 = make("s0", 0, 0.3, _row(0, **code("a"))), make("s1", 1, 0.3, _row(0, **code("a")))
    assert compare.main([str(s0), str(s1)]) == 0
    assert capsys.readouterr().out.endswith("\nCode: commit aaaaaaaaaaaa, torch 2.14.1, avalanche-lib 0.6.0.\n")
    assert "version of the code" not in caplog.text
    s2 = make("s2", 2, 0.3, _row(0, **code("a")), _row(4, **code("c", True)))  # resumed with other code
    other = make("other", 0, 0.1, _row(0, **code("c")))
    with caplog.at_level("WARNING"):
        assert compare.main([str(s0), str(s1), str(s2), str(other)]) == 0
    assert "runs averaged in one group trained with more than one version of the code (s0: git commit" in caplog.text
    table = capsys.readouterr().out
    assert table.endswith("\n- s0: commit aaaaaaaaaaaa, torch 2.14.1, avalanche-lib 0.6.0 (s0, s1, s2); commit "
                          "cccccccccccc with uncommitted changes, torch 2.14.1, avalanche-lib 0.6.0 (s2)\n"
                          "- other: commit cccccccccccc, torch 2.14.1, avalanche-lib 0.6.0\n")
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert compare.main([str(s0), str(other)]) == 0  # groups at two commits: listed, no warning
    assert "version of the code" not in caplog.text
    assert capsys.readouterr().out.endswith(
        "\nCode (the groups trained with different versions; a difference between them may come from the code as well "
        "as from their settings):\n- s0: commit aaaaaaaaaaaa, torch 2.14.1, avalanche-lib 0.6.0\n"
        "- other: commit cccccccccccc, torch 2.14.1, avalanche-lib 0.6.0\n")


@pytest.mark.skipif(not DATA or not (Path(DATA) / "cifar10.npz").is_file(),
                    reason="needs the real CIFAR-10: set STREAMING_SSL_DATA to the folder of cifar10.npz")
def test_a_resumed_run_records_each_start_and_warns_when_it_moved(tmp_path: Path, dies_after, caplog,
                                                                  capsys) -> None:
    """A run killed after 3 updates (checkpoints every 2 updates and at experience ends) as if it ran on another
    kind in float32, resumed here: the resume warns that the run's training spans two kinds, run_info.jsonl holds
    both starts, and compare_runs warns and names both under its table, beside a run that trained here alone."""
    from streaming_ssl.cli import compare
    from streaming_ssl.cli import train as run_stream
    from streaming_ssl.device import resolve_precision

    def args(run_dir: Path, seed: int) -> list[str]:
        return ["--config", str(REPO / "configs/smoke.yaml"), f"run.out_dir={run_dir}",
                f"data.root={Path(DATA).resolve()}", "data.train_per_class=10", "data.test_per_class=2",
                "stream.n_experiences=2", "eval.probe_epochs=1", "eval.knn_k=0", "run.tensorboard=false",
                "run.plot=false", "train.threads=1", "run.checkpoint_every=2", f"train.seed={seed}"]

    moved, here = tmp_path / "runs" / "moved", tmp_path / "runs" / "here"
    dies_after(3, run_stream.main, args(moved, 0))
    (first,) = provenance.read_rows(moved)
    precision = provenance.precision_name(resolve_precision("auto", torch.device("cpu")))  # smoke.yaml's
    here_label, other_label = provenance.label({"machine": cpu_kind(), "precision": precision}), f"fp32 on {OTHER_KIND}"
    assert (first["start_update"], first["machine"], first["precision"]) == (0, cpu_kind(), precision)
    data = first["data"]  # the training data: 10 images of each of the 10 classes, read from the data folder
    assert (data["dataset"], data["root"], data["training_images"]) == ("cifar10", str(Path(DATA).resolve()), 100)
    assert len(data["digest"]) == 40
    from streaming_ssl import checkpoint as ckpt

    kept = ckpt.step_of(ckpt.latest(moved))  # the update the resume continues from
    assert 0 < kept <= 3
    (moved / provenance.FILE_NAME).write_text(json.dumps({**first, "machine": OTHER, "precision": "fp32",
                                                          "machines": {OTHER: 1}}) + "\n")
    with caplog.at_level("WARNING"):
        assert run_stream.main(["--resume", str(moved)]) == 0
    change = f"from update {kept}: {other_label} -> {here_label}"
    assert "this run's training spans more than one machine kind or precision" in caplog.text
    assert change in caplog.text
    rows = provenance.read_rows(moved)
    assert [(r["start_update"], r["machine"]) for r in rows] == [(0, OTHER), (kept, cpu_kind())]
    assert provenance.machine_changes(rows) == [change]
    assert rows[1]["data"] == data  # the same data: the resume checked its digest
    assert run_stream.main(args(here, 1)) == 0
    assert provenance.machine_labels(provenance.read_rows(here)) == [here_label]
    if (REPO / ".git").exists():
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        assert rows[1]["code"]["commit"] == head

    caplog.clear()
    assert compare.main([str(tmp_path / "runs")]) == 0
    table = capsys.readouterr().out
    assert "runs averaged in one group trained on more than one machine kind or precision (here)" in caplog.text
    assert "**Runs averaged in one group trained on more than one machine kind or precision (here)" in table
    assert f"- here: {here_label} (here, moved); {other_label} (moved)" in table  # one group: only the seed differs
    assert compare.main([str(here)]) == 0
    out = capsys.readouterr().out
    assert f"\nTrained on: {here_label} (every run).\nCode: " in out and out.endswith(
        f", torch {rows[1]['versions']['torch']}, avalanche-lib {rows[1]['versions']['avalanche-lib']}.\n")
