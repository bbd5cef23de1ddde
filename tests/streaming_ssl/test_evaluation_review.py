"""Tests of the evaluation row and the probes it reads (streaming_ssl.evaluation, streaming_ssl.probe) on edge cases:
classes without test images, features constant on the training set, reduced-precision features."""

from __future__ import annotations

import math

import pytest
import torch

from streaming_ssl.augment import MultiPatchAugment
from streaming_ssl.models import EMPSSLModel
from streaming_ssl.probe import knn_predict, linear_probe_accuracy, standardize

CPU = torch.device("cpu")


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_seen_classes_without_test_images_are_nan_not_a_crash():
    """Experience 0 holds classes 0 and 1, which have no test image (a generic source may lack them): the row is
    written with NaN for what is undefined (the seen-classes probe, A[t, 0], the average accuracy), as the data
    loader's warning says, and the evaluation does not fail."""
    from streaming_ssl.evaluation import ProbeSet, StreamEvaluator

    probes = ProbeSet("x", _images(40, 1), torch.arange(40) % 4, _images(20, 2), 2 + torch.arange(20) % 2, 4)
    torch.manual_seed(0)
    model = EMPSSLModel(width=1 / 16, feature_dim=32, proj_hidden_dim=32, proj_dim=16)
    evaluator = StreamEvaluator(in_domain=probes, transfer=[], parent_classes=[[0, 1], [2, 3]],
                                augment=MultiPatchAugment(2, 16), device=CPU, channels_last=False, batch_size=16,
                                knn_k=3, probe_kwargs={"epochs": 2})
    row = evaluator.evaluate(model, 1)
    assert math.isnan(row["probe/acc_seen"]) and math.isnan(row["probe/avg_acc"])
    assert math.isnan(row["probe/acc_matrix_row"][0]) and 0 <= row["probe/acc_matrix_row"][1] <= 1
    row = evaluator.evaluate(model, 2)
    assert row["probe/acc_seen"] == row["probe/acc_all"]


def test_a_feature_constant_on_the_training_set_does_not_swamp_the_test_predictions():
    """A ReLU unit of h that is 0 on every training image but fires on a test image: its training std is 0, and
    dividing the test value by a clamped std of 1e-6 made it 1e5 times larger than any feature the probe learnt
    from, so the probe's (untrained) weight for that unit decided those test images."""
    gen = torch.Generator().manual_seed(0)
    n, n_test, d, c = 300, 150, 16, 3
    ytr, yte = torch.arange(n) % c, torch.arange(n_test) % c
    centres = torch.randn(c, d, generator=gen) * 3
    tr = (centres[ytr] + torch.randn(n, d, generator=gen)).relu()
    te = (centres[yte] + torch.randn(n_test, d, generator=gen)).relu()
    clean, _ = linear_probe_accuracy(tr, ytr, te, yte, c)
    dead = torch.cat([tr, torch.zeros(n, 1)], 1)
    fires = torch.cat([te, (torch.arange(n_test) % 3 == 0).float().unsqueeze(1) * 0.1], 1)
    with_dead, _ = linear_probe_accuracy(dead, ytr, fires, yte, c)
    assert clean == 1.0 and with_dead == clean
    _, st = standardize(dead, fires)
    assert st[:, -1].abs().max() <= 0.1 + 1e-6  # a constant training feature is centred, not scaled
    assert torch.allclose(st[:, :d], (te - tr.mean(0)) / tr.std(0))


def test_knn_predict_reads_bfloat16_features():
    """Features kept in bfloat16 vote like the same values in float32 (the votes are summed in float32)."""
    gen = torch.Generator().manual_seed(3)
    train, test = torch.randn(40, 8, generator=gen).bfloat16(), torch.randn(10, 8, generator=gen).bfloat16()
    labels = torch.arange(40) % 3
    ours = knn_predict(train, labels, test, 3, k=5)
    assert torch.equal(ours, knn_predict(train.float(), labels, test.float(), 3, k=5))


def test_the_accuracy_figure_numbers_experiences_as_the_logs_do(tmp_path, monkeypatch) -> None:
    """metrics.jsonl, log.txt and train.log number experiences from 0 ("experience 1: classes [3, 9]"); a heatmap
    numbered from 1 would put those classes under the label of the next experience."""
    import matplotlib.figure

    from streaming_ssl.evaluation import plot_run

    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    rows = [{"experience": t, "probe/acc_matrix_row": [0.5, 0.4, 0.3], "probe/acc_all": 0.4} for t in range(3)]
    plot_run(rows, tmp_path / "accuracy.png")
    heatmap = saved[0].axes[0]
    assert [t.get_text() for t in heatmap.get_xticklabels()] == ["0", "1", "2"]
    assert [t.get_text() for t in heatmap.get_yticklabels()] == ["0", "1", "2"]


def test_backward_transfer_compares_each_experience_with_its_accuracy_at_its_own_end() -> None:
    """Online: several evaluations per parent experience (history rows end with the parents seen); A[j, j] is the
    last one with j the newest, and a parent never evaluated at its end is left out."""
    from streaming_ssl.evaluation import backward_transfer, forgetting

    history = [[0.7, 0.0, 0.0, 1.0], [0.6, 0.1, 0.0, 1.0],  # parent 0: two evaluations, its end is the second
               [0.5, 0.3, 0.0, 2.0]]                        # parent 1's end
    now = [0.4, 0.5, 0.7]
    assert backward_transfer(history, now, 3) == pytest.approx(((0.4 - 0.6) + (0.5 - 0.3)) / 2)
    assert backward_transfer(history, now, 1) is None and backward_transfer([], [0.5], 1) is None
    # parent 0 never evaluated with it newest (evaluation every k mini-experiences): only parent 1 counts
    assert backward_transfer(history[2:], now, 3) == pytest.approx(0.5 - 0.3)
    # not minus the average forgetting: that takes the best earlier accuracy, this the one at the end
    f = [x for x in forgetting(history, now, 3) if x is not None]
    assert -sum(f) / len(f) != pytest.approx(backward_transfer(history, now, 3))
