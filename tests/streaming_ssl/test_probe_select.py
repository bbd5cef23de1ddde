"""Tests of the validation-selected probe weight decay (streaming_ssl.probe.select_weight_decay)."""

from __future__ import annotations

import pytest
import torch

from streaming_ssl.probe import linear_probe_accuracy, select_weight_decay, stratified_holdout


def test_stratified_holdout_partitions_every_class():
    labels = torch.tensor([0] * 20 + [1] * 10 + [2] * 3)
    fit, held = stratified_holdout(labels, 0.2, seed=1)
    assert sorted(torch.cat([fit, held]).tolist()) == list(range(len(labels)))  # a partition
    assert torch.bincount(labels[held]).tolist() == [4, 2, 1]
    again = stratified_holdout(labels, 0.2, seed=1)
    assert torch.equal(again[1], held) and not torch.equal(stratified_holdout(labels, 0.2, seed=2)[1], held)
    with pytest.raises(ValueError, match="fraction"):
        stratified_holdout(labels, 1.0)


def _separable(n: int = 120, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=gen)
    feats = 0.1 * torch.randn(n, d, generator=gen)
    feats[torch.arange(n), labels] += 3.0  # class c lights up feature c
    return feats, labels


def test_selection_scores_are_held_out_accuracies_of_the_training_features():
    """Each score is a probe fitted on the fit part and scored on the held-out part of the same training set."""
    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 3, (90,), generator=gen)
    feats = torch.randn(90, 12, generator=gen)
    feats[torch.arange(90), labels] += 1.0  # overlapping classes: accuracies differ between decays
    grid = (0.0, 0.05, 0.5)
    best, scores = select_weight_decay(feats, labels, 3, grid=grid, val_fraction=0.3, epochs=5, seed=4)
    fit, held = stratified_holdout(labels, 0.3, seed=4)
    for wd in grid:
        expected, _ = linear_probe_accuracy(feats[fit], labels[fit], feats[held], labels[held], 3, weight_decay=wd,
                                            epochs=5, seed=4)
        assert scores[wd] == expected
    assert scores[best] == max(scores.values())


def test_ties_go_to_the_larger_decay():
    feats, labels = _separable(seed=1)
    best, scores = select_weight_decay(feats, labels, 3, grid=(0.0, 1e-6), val_fraction=0.25, epochs=10)
    assert scores[0.0] == scores[1e-6] == 1.0 and best == 1e-6
