"""bench/accuracy.py --report-only: the README's accuracy table, matrices and figure come from accuracy.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ACCURACY = ROOT / "bench" / "accuracy.py"


def _probe(linear: float, selected: float, wd: float, knn: float) -> dict:
    return {"linear": linear, "knn": knn, "linear_selected": {"accuracy": selected, "weight_decay": wd}}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ACCURACY), *args], cwd=str(ROOT), capture_output=True, text=True,
                          timeout=300, env={"STREAMING_SSL_DATA": "/nonexistent", "PATH": "/usr/bin:/bin"})


def test_report_only_renders_table_matrix_and_figure(tmp_path):
    results = {
        "split_cifar10": {"samples_seen": 50000, "train_and_stream_eval_seconds": 3600.0, "avg_forgetting": 0.0125,
                          "accuracy_matrix": [[0.9, 0.0], [0.8125, 0.7]],
                          "probe_whole": _probe(0.55, 0.6, 0.02, 0.5), "probe_bof16": _probe(0.7, 0.74, 0.005, 0.66)},
        "random_init": {"samples_seen": 0, "probe_whole": _probe(0.35, 0.36, 0.1, 0.3),
                        "probe_bof16": _probe(0.4, 0.42, 0.05, 0.33)},
    }
    out = tmp_path / "accuracy.json"
    out.write_text(json.dumps(results))
    proc = _run("--report-only", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / "accuracy.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    # rows in the order (floor first), whatever the order of the JSON
    assert table[2].startswith("| random-init encoder") and table[3].startswith("| Split CIFAR-10")
    assert "55.0% / 60.0% (wd 0.02)" in table[3] and "70.0% / 74.0% (wd 0.005)" in table[3]
    assert "50.0% / 66.0%" in table[3] and "1.2 pts" in table[3] and "60 min" in table[3]
    assert "| - |" in table[2]  # no forgetting for a single evaluation
    # the 2 x 2 accuracy matrix, in percent, row t = after experience t, numbered from 0 as train.log numbers them
    assert "| after | exp 0 | exp 1 |" in md and "| 0 | 90.0 | 0.0 |" in md and "| 1 | 81.2 | 70.0 |" in md
    png = (tmp_path / "accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert md in proc.stdout
    assert "re-estimated" not in md  # no such probes: no second table


def test_report_lists_recalibrated_probes_in_a_table_of_their_own(tmp_path):
    bn = {**_probe(0.58, 0.63, 0.02, 0.52), "bn_recalibrate": 10000}
    results = {"offline_1epoch": {"samples_seen": 50000, "probe_whole": _probe(0.55, 0.6, 0.02, 0.5),
                                  "probe_bof16": _probe(0.7, 0.74, 0.005, 0.66), "probe_whole_bn": bn}}
    out = tmp_path / "accuracy.json"
    out.write_text(json.dumps(results))
    assert _run("--report-only", "--out", str(out)).returncode == 0
    md = (tmp_path / "accuracy.md").read_text()
    main, extra = md.split("re-estimated")
    assert "58.0%" not in main and "55.0% / 60.0% (wd 0.02)" in main
    row = [line for line in extra.splitlines() if line.startswith("| offline")]
    assert row == ["| offline, 1 epoch (i.i.d. one pass) | 10,000 | 58.0% / 63.0% (wd 0.02) | - | 52.0% / - |"]


def test_report_only_without_results_names_the_file(tmp_path):
    proc = _run("--report-only", "--out", str(tmp_path / "none.json"))
    assert proc.returncode == 2 and "none.json" in proc.stderr and "run some rows first" in proc.stderr


def _row(bag_selected: float, forwards: int | None = None, **extra) -> dict:
    row = {"samples_seen": 50000, "probe_whole": _probe(0.6, 0.6, 0.02, 0.5),
           "probe_bof16": _probe(bag_selected, bag_selected, 0.005, 0.6), **extra}
    if forwards is not None:
        row["compute"] = {"patches_forward": forwards, "frozen_forwards": 0, "extra_forwards": 0}
    return row


def _targets(results: dict, tmp_path: Path) -> list[str]:
    out = tmp_path / "accuracy.json"
    out.write_text(json.dumps(results))
    proc = _run("--report-only", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / "accuracy.md").read_text()
    assert "Targets" in md
    return md.split("Targets", 1)[1].split("Accuracy matrix", 1)[0].splitlines()


def test_targets_name_the_cheapest_split_row_that_halves_the_gap_within_twice_the_compute(tmp_path):
    # i.i.d. 76, plain split 72 (gap 4: the target is 74 or more at <= 2x the plain's 1M patch forwards)
    results = {"offline_1epoch": _row(0.76, 1_000_000), "split_cifar10": _row(0.72, 1_000_000),
               "split_cifar10_replay": _row(0.745, 2_000_000),          # reaches, 2x
               "split_cifar10_mixup": _row(0.741, 1_000_000),           # reaches, 1x: the cheapest
               "split_cifar10_distill": _row(0.735, 1_600_000),         # 37% of the gap: misses
               "split_cifar10_replay_distill": _row(0.76, 2_600_000)}   # closes it all, but at 2.6x: misses
    lines = _targets(results, tmp_path)
    verdict = {line.split(":")[0].strip("- "): line for line in lines if line.startswith("  - Split CIFAR-10")}
    assert "reaches" in verdict["Split CIFAR-10 + replay (reservoir 500, 100/update)"]
    assert "2.00x" in verdict["Split CIFAR-10 + replay (reservoir 500, 100/update)"]
    assert "62% of the gap" in verdict["Split CIFAR-10 + replay (reservoir 500, 100/update)"]
    assert "misses" in verdict["Split CIFAR-10 + CaSSLe distillation (weight 200)"]
    assert "misses" in verdict["Split CIFAR-10 + replay + distillation"] and "2.60x" in verdict[
        "Split CIFAR-10 + replay + distillation"]
    assert "  - Cheapest reaching it: Split CIFAR-10 + LUMP mixup (buffer 500)." in lines
    assert not any("online" in line.lower() for line in lines)  # no online rows, no online verdict


def test_targets_say_plainly_when_no_row_reaches_them_and_use_the_mean_over_seeds(tmp_path):
    results = {"offline_1epoch": _row(0.76), "split_cifar10": _row(0.72, 1_000_000),
               "split_cifar10@seed1": _row(0.70, 1_000_000, seed=1),  # plain mean 71: gap 5, target 73.5
               "split_cifar10_replay": _row(0.74, 2_000_000),         # 3 of 5 points: would reach against seed 0 alone
               "split_cifar10_replay@seed1": _row(0.72, 2_000_000, seed=1),  # mean 73: 40% of the gap: misses
               "online_cifar10_replay": _row(0.725, 1_000_000)}       # 3.5 points under the i.i.d. pass: misses
    lines = _targets(results, tmp_path)
    text = "\n".join(lines)
    assert "plain 71.0% (2 seeds: 72.0, 70.0, spread 2.0 pts), gap 5.0 pts" in text
    assert "73.0% (2 seeds: 74.0, 72.0, spread 2.0 pts), 40% of the gap closed, 2.00x compute: misses" in text
    assert "  - None of the measured split rows reaches this target." in lines
    assert "72.5% (1 seed; -3.5 pts): misses the target" in text
    assert "  - None of the measured online rows reaches this target." in lines
    md = (tmp_path / "accuracy.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| Split CIFAR-10")]
    # each seed row right after its recipe row
    assert [t.split(" | ")[0] for t in table] == [
        "| Split CIFAR-10, 5 x 2 classes, one pass", "| Split CIFAR-10, 5 x 2 classes, one pass, seed 1",
        "| Split CIFAR-10 + replay (reservoir 500, 100/update)",
        "| Split CIFAR-10 + replay (reservoir 500, 100/update), seed 1"]


def test_online_target_is_judged_against_the_iid_one_pass(tmp_path):
    results = {"offline_1epoch": _row(0.76), "online_cifar10": _row(0.70, 1_000_000),
               "online_cifar10_replay": _row(0.735, 2_000_000)}
    lines = _targets(results, tmp_path)
    assert any("online + replay" in line and "reaches" in line and "-2.5 pts" in line for line in lines)
    assert any(line.startswith("  - online, mini-experiences of 10") and "misses" in line for line in lines)
    assert "  - Cheapest reaching it: online + replay (reservoir 500, 10/update)." in lines


def test_targets_wait_for_the_iid_row(tmp_path):
    out = tmp_path / "accuracy.json"
    out.write_text(json.dumps({"split_cifar10": _row(0.72, 1_000_000)}))
    assert _run("--report-only", "--out", str(out)).returncode == 0
    assert "Targets: not judged yet (no i.i.d. one-pass row, offline_1epoch)." in (tmp_path / "accuracy.md").read_text()
