"""compare_runs.py: runs grouped by what they learn, seeds averaged, figures read from the runs' own rows."""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
from pathlib import Path

import pytest

from streaming_ssl.compare import (CompareError, Run, _labels, flatten, group_curve, group_runs, inert_settings,
                                   markdown_table, mean_std, read_run, run_metrics, summarize)
from streaming_ssl.config import load_config

DATA = os.environ.get("STREAMING_SSL_DATA")
needs_data = pytest.mark.skipif(not DATA or not (Path(DATA) / "cifar10.npz").is_file(),
                                reason="needs the real CIFAR-10: set STREAMING_SSL_DATA to the folder of cifar10.npz")
REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 240


def _config(*overrides: str) -> dict:
    return flatten(load_config(REPO / "configs/smoke.yaml", list(overrides)).to_dict())


def _run(name: str, *overrides: str) -> Run:
    return Run(path=Path(name), config=_config(*overrides), rows=[{"probe/acc_all": 0.5}], complete=True)


def test_runs_differing_in_seed_or_in_what_is_not_learned_share_a_group() -> None:
    """Seeds, the run folder, threads, data.root, memory-only settings and the settings of a method that is off do
    not split a group; a learned setting does, and names it (on both sides)."""
    runs = [_run("a", "train.seed=0"),
            _run("a@seed1", "train.seed=1", "train.threads=1", "run.out_dir=x", "data.root=/elsewhere",
                 "train.log_every=5", "optim.foreach=false", "train.channels_last=false",
                 "model.recompute_stages=1", "cl.distill.weight=5", "cl.replay.minred_ema=0.9"),
            _run("b", "cl.replay.policy=reservoir", "cl.replay.size=20"),
            _run("c", "optim.lr=0.1"),
            _run("b@seed1", "cl.replay.policy=reservoir", "cl.replay.size=20", "train.seed=1", "cl.mixup.alpha=0.3")]
    groups = group_runs(runs)
    assert [[r.path.name for r in members] for _, members in groups] == [["a", "a@seed1"], ["b", "b@seed1"], ["c"]]
    lr, batch = _config()["optim.lr"], _config()["cl.replay.batch"]
    assert [label for label, _ in groups] == [  # replay's batch and size are settings of b alone (off in a and c)
        f"cl.replay.policy=none, optim.lr={lr}",
        f"cl.replay.batch={batch}, cl.replay.policy=reservoir, cl.replay.size=20, optim.lr={lr}",
        "cl.replay.policy=none, optim.lr=0.1"]
    # one group: nothing tells it apart
    assert group_runs(runs[:2])[0][0] == ""


def test_inert_settings_are_those_of_methods_that_are_off() -> None:
    off = _config()
    assert {"cl.distill.weight", "cl.mixup.alpha", "cl.replay.size", "cl.replay.minred_ema"} <= inert_settings(off)
    assert not {"cl.distill.enabled", "cl.mixup.enabled", "cl.replay.policy"} & inert_settings(off)
    on = _config("cl.replay.policy=reservoir", "cl.distill.enabled=true")
    assert {"cl.replay.size", "cl.distill.weight"}.isdisjoint(inert_settings(on))
    assert "cl.replay.minred_ema" in inert_settings(on)  # MinRed's own, under another policy
    assert "cl.replay.minred_ema" not in inert_settings(_config("cl.replay.policy=minred"))
    # how an online stream is cut changes nothing in another mode: a seed with another cut joins its group
    online_only = {"stream.online_base", "stream.online_experience_size", "stream.access_task_boundaries"}
    assert online_only <= inert_settings(off) and off["stream.mode"] != "online"
    online = _config("stream.mode=online", "stream.online_experience_size=8")
    assert online_only.isdisjoint(inert_settings(online))
    seeds = [_run("s0"), _run("s1", "train.seed=1", "stream.online_experience_size=50",
                              "stream.access_task_boundaries=true")]
    assert [len(members) for _, members in group_runs(seeds)] == [2]
    cuts = [_run("o", "stream.mode=online"), _run("o50", "stream.mode=online", "stream.online_experience_size=50")]
    assert [label for label, _ in group_runs(cuts)] == ["stream.online_experience_size=10",
                                                        "stream.online_experience_size=50"]


def test_run_metrics_and_mean_std() -> None:
    rows = [{"samples_seen": 40, "updates": 2, "probe/acc_all": 0.3, "probe/acc_seen": 0.6,
             "compute/patches_forward": 100, "compute/patches_backward": 100, "time/wall_seconds": 36.0},
            {"samples_seen": 80, "updates": 4, "probe/acc_all": 0.5, "probe/acc_seen": 0.5, "probe/avg_forgetting": 0.1,
             "probe/bwt": -0.05, "knn/acc_all": 0.4, "compute/stream_images": 80, "compute/buffer_images": 30,
             "compute/patches_forward": 220, "compute/patches_backward": 200, "compute/frozen_forwards": 7,
             "compute/extra_forwards": 3, "time/wall_seconds": 7200.0}]
    m = run_metrics(rows)
    assert m["acc_final"] == 0.5 and m["acc_avg_incremental"] == pytest.approx(0.55)
    assert (m["forgetting"], m["bwt"], m["knn_final"]) == (0.1, -0.05, 0.4)
    assert (m["stream_images"], m["buffer_images"], m["updates"]) == (80, 30, 4)
    assert m["forward_equivalents"] == 220 + 2 * 200 + 7 + 3 and m["wall_hours"] == 2.0
    assert run_metrics(rows[:1])["forgetting"] is None  # a row without it: absent, not 0
    mean, std = mean_std([0.7, 0.72, None, 0.74])
    assert mean == pytest.approx(0.72) and std == pytest.approx(statistics.stdev([0.7, 0.72, 0.74]))
    assert mean_std([0.7]) == (0.7, None) and mean_std([None]) == (None, None)


def test_missing_and_non_finite_figures_are_left_out_not_zero() -> None:
    """A row without the compute counters (a run saved before they were logged) has no compute, not 0; a NaN
    accuracy (a class with no test image) is no figure; a table of such groups prints empty cells."""
    m = run_metrics([{"probe/acc_all": float("nan"), "probe/acc_seen": float("nan")}])
    assert m["forward_equivalents"] is None and m["acc_final"] is None and m["acc_avg_incremental"] is None
    assert m["updates"] is None and m["stream_images"] is None
    stat = {metric: {"mean": None, "std": None, "n": 0, "values": [None]} for metric in m}
    table = markdown_table({"groups": [{"label": "old", "differs": "", "n": 1, "complete": True, **stat}]})
    assert table.splitlines()[-1] == "| old |  | 1 |  |  |  |  |  |  |  |  |"


def test_group_names_stay_apart_when_folders_share_a_name() -> None:
    groups = [[_run("runs/plain/seed0")], [_run("runs/replay/seed0")], [_run("x/a@seed1")]]
    assert _labels(groups) == ["plain/seed0", "replay/seed0", "x/a"]
    assert _labels([[_run("p/a/s")], [_run("q/a/s")]]) == ["a/s #1", "a/s #2"]
    assert _labels([[_run("runs/a")], [_run("runs/b@seed2")]]) == ["a", "b"]


def test_a_run_saved_before_blur_kernel_existed_groups_with_what_it_trained(tmp_path: Path) -> None:
    """A config.yaml without augment.blur_kernel trained with the 10% kernel (0), as its resume does: it does not
    join the runs of the default kernel."""
    import yaml

    from streaming_ssl.config import save_config

    runs = []
    for name, drop in (("new", False), ("old", True)):
        run_dir = tmp_path / name
        run_dir.mkdir()
        save_config(load_config(REPO / "configs/smoke.yaml", [f"train.seed={int(drop)}"]), run_dir / "config.yaml")
        if drop:
            raw = yaml.safe_load((run_dir / "config.yaml").read_text())
            del raw["augment"]["blur_kernel"]
            (run_dir / "config.yaml").write_text(yaml.safe_dump(raw))
        (run_dir / "metrics.jsonl").write_text(json.dumps({"probe/acc_all": 0.5}) + "\n")
        runs.append(read_run(run_dir))
    assert runs[1].config["augment.blur_kernel"] == 0 and runs[0].config["augment.blur_kernel"] is None
    assert [label for label, _ in group_runs(runs)] == ["augment.blur_kernel=None", "augment.blur_kernel=0"]


def _args(run_dir: Path, *extra: str) -> list[str]:
    return ["--config", str(REPO / "configs/smoke.yaml"), f"run.out_dir={run_dir}", f"data.root={Path(DATA).resolve()}",
            "data.train_per_class=10", "data.test_per_class=2", "stream.n_experiences=2", "eval.probe_epochs=1",
            "eval.knn_k=0", "run.tensorboard=false", "run.plot=false", "train.threads=1", *extra]


@needs_data
def test_compare_runs_groups_real_runs_averages_seeds_and_leaves_out_unfinished(zygote, tmp_path: Path,
                                                                                dies_after, capsys) -> None:
    """Three finished runs (plain at seeds 0 and 1, replay at seed 0), one stopped after 3 updates and one stopped
    before its first evaluation (config.yaml alone), given as a folder: the plain runs are one group whose figures
    are their mean and standard deviation, replay is another, the stopped runs are left out with the reason (the
    first taken with --include-incomplete, without cutting the finished runs' curves), and the files are
    written."""
    from streaming_ssl.cli import compare
    from streaming_ssl.cli import train as run_stream

    sweep = tmp_path / "sweep"
    runs = {"plain": ("train.seed=0",), "plain@seed1": ("train.seed=1",),
            "replay": ("train.seed=0", "cl.replay.policy=reservoir", "cl.replay.size=20", "cl.replay.batch=10")}
    logs = {name: tmp_path / f"{name}.log" for name in runs}
    pids = {name: zygote.start(_args(sweep / name, *extra), logs[name]) for name, extra in runs.items()}
    dies_after(3, run_stream.main, _args(sweep / "stopped", "train.seed=2"))
    (sweep / "early").mkdir()
    shutil.copy(sweep / "stopped" / "config.yaml", sweep / "early" / "config.yaml")
    for name, pid in pids.items():
        assert zygote.wait(pid, TIMEOUT) == 0, logs[name].read_text(errors="replace")[-3000:]
    rows = {name: [json.loads(line) for line in (sweep / name / "metrics.jsonl").read_text().splitlines()]
            for name in runs}

    out = tmp_path / "compared"
    assert compare.main([str(sweep), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    summary = json.loads((out / "compare.json").read_text())
    assert (out / "compare.md").read_text() == table and (out / "compare.png").stat().st_size > 10_000
    assert [(r["run"], r["why"].split(" (")[0]) for r in summary["left_out"]] == [
        (str(sweep / "early"), "no evaluation yet"), (str(sweep / "stopped"), "it has not finished")]
    plain, replay = summary["groups"]
    assert (plain["label"], plain["n"], plain["seeds"]) == ("plain", 2, [0, 1])
    assert (replay["label"], replay["n"]) == ("replay", 1)
    assert replay["differs"] == "cl.replay.batch=10, cl.replay.policy=reservoir, cl.replay.size=20"
    finals = [rows[name][-1]["probe/acc_all"] for name in ("plain", "plain@seed1")]
    assert plain["acc_final"]["values"] == finals
    assert plain["acc_final"]["mean"] == pytest.approx(sum(finals) / 2)
    assert plain["acc_final"]["std"] == pytest.approx(abs(finals[0] - finals[1]) / math.sqrt(2))
    assert replay["acc_final"]["mean"] == rows["replay"][-1]["probe/acc_all"] and replay["acc_final"]["std"] is None
    # the same stream images; replay's buffer images add to its cost, read from its own rows
    assert plain["stream_images"]["mean"] == replay["stream_images"]["mean"] == rows["plain"][-1]["samples_seen"]
    last = rows["replay"][-1]
    assert replay["buffer_images"]["mean"] == last["compute/buffer_images"] > 0
    assert replay["forward_equivalents"]["mean"] == (last["compute/patches_forward"]
                                                     + 2 * last["compute/patches_backward"])
    assert replay["forward_equivalents"]["mean"] > plain["forward_equivalents"]["mean"]
    mean, std = 100 * plain["acc_final"]["mean"], 100 * plain["acc_final"]["std"]
    assert f"| plain | cl.replay.policy=none | 2 | {mean:.2f} ± {std:.2f} |" in table
    # the stopped run, taken on request: only its seed differs, so it joins plain, which is then marked
    assert compare.main([str(sweep), "--include-incomplete", "--out", str(out)]) == 0
    assert "| plain | cl.replay.policy=none | 3 (incomplete) |" in capsys.readouterr().out
    plain = json.loads((out / "compare.json").read_text())["groups"][0]
    stopped = [json.loads(line) for line in (sweep / "stopped" / "metrics.jsonl").read_text().splitlines()]
    assert len(stopped) < len(rows["plain"]) and plain["seeds"] == [0, 1, 2]
    curve = group_curve(plain["curves"], "samples_seen")
    assert len(curve) == len(rows["plain"])  # the finished runs' last evaluation is kept
    last = [rows[name][-1]["probe/acc_all"] for name in ("plain", "plain@seed1")]
    assert curve[-1][1:] == pytest.approx((sum(last) / 2, min(last), max(last)))


def test_compare_runs_refuses_what_it_cannot_compare(tmp_path: Path, caplog, capsys) -> None:
    """Not a run, a run named twice, a copy of a run (same config and seed), no run with an evaluation, runs on
    different test sets (data or eval test subsets), an --out that is a run or under a file: exit 2 with the
    reason, before anything is printed; --allow-mixed lists runs on different test sets anyway, --allow-same-seed
    averages the copies."""
    from streaming_ssl.cli import compare
    from streaming_ssl.config import save_config

    def make(name: str, *overrides: str, rows: int = 1) -> Path:
        run_dir = tmp_path / name
        run_dir.mkdir()
        save_config(load_config(REPO / "configs/smoke.yaml", list(overrides)), run_dir / "config.yaml")
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"samples_seen": 10, "updates": 1,
                                                                   "probe/acc_all": 0.25}) + "\n"
                                                       for _ in range(rows)))
        (run_dir / "summary.json").write_text("{}")
        return run_dir

    a, b, empty = make("a"), make("b", "data.test_per_class=3"), make("empty", rows=0)
    c, copy, same = make("c", "eval.test_per_class=3"), make("copy"), make("same", "eval.test_per_class=50")
    (tmp_path / "afile").write_text("x")
    cases = {(str(tmp_path / "nothing"),): "is neither a run directory (with config.yaml) nor a folder of run",
             (str(a), str(a)): "run named twice",
             (str(a), str(copy)): f"{a} and {copy} learn with the same config and seed (0)",
             (str(empty),): "no run to compare: " + f"{empty}: no evaluation yet",
             (str(a), str(b)): "the runs differ in test images per class (a: 20; b: 3)",
             (str(a), str(c)): "the runs differ in test images per class (a: 20; c: 3)",
             (str(a), "--out", str(b)): f"--out {b} is a run directory",
             (str(a), "--out", str(tmp_path / "afile" / "sub")): f"--out {tmp_path / 'afile' / 'sub'}: cannot make"}
    for argv, said in cases.items():
        caplog.clear()
        assert compare.main(list(argv)) == 2
        assert said in caplog.text, caplog.text
        assert capsys.readouterr().out == ""
    assert compare.main([str(a), str(b), "--allow-mixed"]) == 0
    assert compare.main([str(a), str(copy), "--allow-same-seed"]) == 0
    assert "| a |  | 2 |" in capsys.readouterr().out
    # eval.test_per_class 50 over data.test_per_class 20: the same 20 test images per class, so not refused (a group
    # of its own: an evaluation setting differs)
    assert [g["differs"] for g in summarize([a, same])["groups"]] == ["eval.test_per_class=None",
                                                                     "eval.test_per_class=50"]
    (b / "summary.json").unlink()
    with pytest.raises(CompareError, match="it has not finished"):
        summarize([b])
