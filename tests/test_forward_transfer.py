"""Forward transfer (eval.forward_transfer): the model probed at initialisation, FWT in every evaluation row."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from streaming_ssl import checkpoint as ckpt
from streaming_ssl.compare import markdown_table, run_metrics
from streaming_ssl.evaluation import forward_transfer

DATA = os.environ.get("STREAMING_SSL_DATA")
needs_data = pytest.mark.skipif(not DATA or not (Path(DATA) / "cifar10.npz").is_file(),
                                reason="needs the real CIFAR-10: set STREAMING_SSL_DATA to the folder of cifar10.npz")
REPO = Path(__file__).resolve().parents[1]
NEW_KEYS = ("probe/fwt", "probe/init_acc_all", "probe/init_acc_matrix_row", "knn/init_acc_all", "transfer/init_dots")


def test_forward_transfer_is_the_mean_gain_over_initialisation_right_before_each_experience() -> None:
    # history rows: A[t, :] followed by the experiences seen at that evaluation
    after_0 = [0.9, 0.3, 0.2, 1.0]
    after_1 = [0.8, 0.85, 0.4, 2.0]
    baseline = [0.5, 0.25, 0.1]
    assert forward_transfer([], baseline, 1) is None  # after the first experience: no j > 0 trained yet
    assert forward_transfer([after_0], baseline, 2) == pytest.approx(0.3 - 0.25)
    assert forward_transfer([after_0, after_1], baseline, 3) == pytest.approx(((0.3 - 0.25) + (0.4 - 0.1)) / 2)
    assert forward_transfer([after_0, after_1], None, 3) is None  # no baseline: not measured
    # experience 2's baseline undefined (no test image): left out, not NaN
    assert forward_transfer([after_0, after_1], [0.5, 0.25, math.nan], 3) == pytest.approx(0.05)
    # online: several evaluations with one experience seen; the last, right before experience 1 trains, counts
    mid_0 = [0.6, 0.1, 0.1, 1.0]
    assert forward_transfer([mid_0, after_0], baseline, 2) == pytest.approx(0.05)
    # an experience never evaluated before it trained is left out
    assert forward_transfer([after_1], baseline, 3) == pytest.approx(0.4 - 0.1)


def test_compare_reports_fwt_only_where_a_run_has_it() -> None:
    def table(rows: list[dict]) -> str:
        stat = {k: {"mean": v, "std": None, "n": 1, "values": [v]} for k, v in run_metrics(rows).items()}
        return markdown_table({"groups": [{"label": "a", "differs": "", "n": 1, "complete": True, **stat}]})

    row = {"probe/acc_all": 0.5, "probe/fwt": 0.04}
    assert run_metrics([row])["fwt"] == 0.04 and run_metrics([{"probe/acc_all": 0.5}])["fwt"] is None
    header, rule, line = table([row]).splitlines()[:3]
    assert header.count("|") == rule.count("|") == line.count("|")
    assert header.split(" | ")[7] == "FWT (pts)" and line.split(" | ")[7] == "4.00"
    assert "FWT" not in table([{"probe/acc_all": 0.5}])


def _dots(folder: Path) -> Path:
    """A small out-of-domain target: bright or dark 8x8 grayscale images, as an npz source (transfer/dots)."""
    rng = np.random.default_rng(0)
    split = {}
    for name, n in (("train", 24), ("test", 12)):
        labels = np.arange(n) % 2
        split[f"x_{name}"] = (rng.integers(0, 120, (n, 8, 8)) + 120 * labels[:, None, None]).astype(np.uint8)
        split[f"y_{name}"] = labels
    np.savez(folder / "dots.npz", **split)
    return folder / "dots.npz"


def _args(run_dir: Path, *extra: str) -> list[str]:
    return ["--config", str(REPO / "configs/smoke.yaml"), f"run.out_dir={run_dir}",
            f"data.root={Path(DATA).resolve()}", f"eval.transfer=[npz:{_dots(run_dir.parent)}]",
            "data.train_per_class=12", "data.test_per_class=6", "stream.n_experiences=3", "eval.probe_epochs=2",
            "run.tensorboard=false", "run.plot=false", "train.threads=1", "train.deterministic=true",
            "run.checkpoint_every=0", *extra]


def _rows(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / name).read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


@needs_data
def test_a_run_reports_forward_transfer_trains_as_without_it_and_keeps_its_baseline_on_resume(
        tmp_path: Path, caplog, dies_after, monkeypatch) -> None:
    from streaming_ssl.cli import train as run_stream
    from streaming_ssl.evaluation import StreamEvaluator

    # the global random stream, which our methods leave alone but a user's plugin may draw from, is untouched
    baseline, rng = StreamEvaluator.evaluate_baseline, []

    def recording(self, model):
        before = torch.get_rng_state()
        out = baseline(self, model)
        rng.append(torch.equal(before, torch.get_rng_state()))
        return out

    monkeypatch.setattr(StreamEvaluator, "evaluate_baseline", recording)
    plain, fwt, killed = tmp_path / "plain", tmp_path / "fwt", tmp_path / "killed"
    assert run_stream.main(_args(plain)) == 0
    with caplog.at_level("INFO"):
        assert run_stream.main(_args(fwt, "eval.forward_transfer=true", "run.plot=true")) == 0
    assert caplog.text.count("forward transfer's baseline") == 1 and rng == [True]

    # probing the initialisation draws nothing training draws: the same training curves, evaluations and weights
    assert _rows(fwt, "train.jsonl") == _rows(plain, "train.jsonl")
    rows = _rows(fwt)
    assert [{k: v for k, v in r.items() if k not in NEW_KEYS} for r in rows] == _rows(plain)
    a, b = ckpt.load(ckpt.latest(plain))["model"], ckpt.load(ckpt.latest(fwt))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(k in r for r in _rows(plain) for k in NEW_KEYS)

    # the baseline is one evaluation, the same in every row; FWT follows from the rows themselves
    init = rows[0]["probe/init_acc_matrix_row"]
    assert len(init) == 3 and all(r["probe/init_acc_matrix_row"] == init for r in rows)
    assert all(r["probe/init_acc_all"] == rows[0]["probe/init_acc_all"] for r in rows)
    assert 0.0 <= rows[0]["knn/init_acc_all"] <= 1.0
    # the out-of-domain probe at initialisation, beside the trained model's
    assert all(r["transfer/init_dots"] == rows[0]["transfer/init_dots"] for r in rows)
    assert all(0.0 <= r[k] <= 1.0 for r in rows for k in ("transfer/dots", "transfer/init_dots"))
    assert rows[0]["probe/fwt"] is None
    for t in (1, 2):
        gains = [rows[j - 1]["probe/acc_matrix_row"][j] - init[j] for j in range(1, t + 1)]
        assert rows[t]["probe/fwt"] == pytest.approx(sum(gains) / len(gains))
    # a run trained without it gets the same baseline afterwards, from its config alone
    from streaming_ssl.build import initial_baseline
    from streaming_ssl.config import load_config

    again = initial_baseline(load_config(plain / "config.yaml"))
    assert again == {"acc_all": rows[0]["probe/init_acc_all"], "acc_matrix_row": init,
                     "knn_acc_all": rows[0]["knn/init_acc_all"], "transfer": {"dots": rows[0]["transfer/init_dots"]}}
    assert (fwt / "accuracy.png").stat().st_size > 0  # with the initialisation as its first row
    summary = json.loads((fwt / "summary.json").read_text())
    assert summary["probe/fwt"] == pytest.approx(rows[-1]["probe/fwt"])

    # killed in the second experience and resumed: the baseline comes from the checkpoint, not from the trained
    # model probed again, and the run ends as the uninterrupted one
    caplog.clear()
    with caplog.at_level("INFO"):
        dies_after(4, run_stream.main, _args(killed, "eval.forward_transfer=true"))
        state = ckpt.load(ckpt.latest(killed))
        assert state["evaluator"]["baseline"]["acc_matrix_row"] == init
        assert run_stream.main(["--resume", str(killed)]) == 0
    assert caplog.text.count("forward transfer's baseline") == 1  # the first start only
    assert _rows(killed) == rows


    # a run saved without forward transfer, resumed with it (its recipe turned it on): the baseline is taken from the
    # model as built, before the checkpoint's weights are loaded, and equals the one of a run that had it throughout
    late = tmp_path / "late"
    dies_after(4, run_stream.main, _args(late))
    assert not ckpt.load(ckpt.latest(late))["evaluator"]["baseline"]
    caplog.clear()
    with caplog.at_level("INFO"):
        assert run_stream.main([*_args(late, "eval.forward_transfer=true"), "--auto-resume"]) == 0
    assert "resuming with eval.forward_transfer: run has False, now True" in caplog.text
    assert "probing the model at initialisation (rebuilt from the run's seed) before restoring it" in caplog.text
    late_rows = _rows(late)
    assert not any(k in late_rows[0] for k in NEW_KEYS)  # logged before the resume, kept as it was
    assert late_rows[1:] == rows[1:]
