"""bench/forward_transfer.py: forward transfer of stored accuracy matrices against a baseline computed afresh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = os.environ.get("STREAMING_SSL_DATA")
pytestmark = pytest.mark.skipif(not DATA or not (Path(DATA) / "cifar10.npz").is_file(),
                                reason="needs the real CIFAR-10: set STREAMING_SSL_DATA to the folder of cifar10.npz")
SHRINK = ["model.width=0.125", "data.train_per_class=12", "data.test_per_class=6", "eval.probe_epochs=2"]


def _run(results: Path, out: Path) -> str:
    proc = subprocess.run([sys.executable, "bench/forward_transfer.py", "--results", str(results), "--out", str(out),
                           "--set", *SHRINK], cwd=str(ROOT), capture_output=True, text=True, timeout=600,
                          env={**os.environ, "STREAMING_SSL_DATA": str(Path(DATA).resolve())})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_forward_transfer_of_stored_matrices(tmp_path: Path) -> None:
    matrix = [[0.9, 0.3, 0.2, 0.1, 0.4], [0.8, 0.85, 0.5, 0.2, 0.3], [0.7, 0.8, 0.9, 0.6, 0.2],
              [0.7, 0.7, 0.8, 0.9, 0.45], [0.6, 0.7, 0.8, 0.8, 0.95]]
    results = {"split_cifar10": {"accuracy_matrix": matrix, "machine": "somewhere"},
               "split_cifar10@seed1": {"accuracy_matrix": matrix},
               "online_cifar10": {"accuracy_matrix": matrix},
               "offline_1epoch": {"accuracy_matrix": [[0.7]]}}
    path, out = tmp_path / "accuracy.json", tmp_path / "fwt.json"
    path.write_text(json.dumps(results))
    said = _run(path, out)
    got = json.loads(out.read_text())
    # one baseline per seed and stream; the online stream's is computed apart, and equals the split's (the same model,
    # data, probe and class order)
    assert said.count("baseline for") == 3 and len(got["baselines"]) == 3
    assert got["left_out"] == {"offline_1epoch": "one evaluation (one experience): no forward transfer"}
    for key in ("split_cifar10", "split_cifar10@seed1", "online_cifar10"):
        row = got["rows"][key]
        b = row["baseline"]
        assert len(b) == 5 and all(0 <= v <= 1 for v in b)
        expected = [matrix[j - 1][j] - b[j] for j in range(1, 5)]
        assert row["terms"] == pytest.approx(expected) and row["fwt"] == pytest.approx(sum(expected) / 4)
    assert got["rows"]["online_cifar10"]["baseline"] == got["rows"]["split_cifar10"]["baseline"]
    assert got["rows"]["split_cifar10@seed1"]["baseline"] != got["rows"]["split_cifar10"]["baseline"]  # other init
    table = out.with_suffix(".md").read_text()
    assert "| Split CIFAR-10, 5 x 2 classes, one pass | 2 (" in table
    # a rerun reuses the baselines it stored
    assert "baseline for" not in _run(path, out)
    assert json.loads(out.read_text())["rows"] == got["rows"]
