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
    # the 2 x 2 accuracy matrix, in percent, row t = after experience t
    assert "| 1 | 90.0 | 0.0 |" in md and "| 2 | 81.2 | 70.0 |" in md
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
