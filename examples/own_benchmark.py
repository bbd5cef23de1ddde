"""Bring your own Avalanche benchmark: EMP-SSL with Avalanche's ReplayPlugin, probed after every experience.

    python examples/own_benchmark.py --npz ../shared/data/cifar10.npz --per-class 200

Builds a class-incremental benchmark from plain tensors with Avalanche's own API, trains one pass of
EMPSSLStrategy on it (no labels used), and prints the linear-probe accuracy matrix A[t, j].
"""

import argparse
import math

import numpy as np
import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.benchmarks.utils import as_classification_dataset
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
from torch.utils.data import TensorDataset

from streaming_ssl import (LARS, EMPSSLModel, EMPSSLStrategy, MultiPatchAugment, ProbeMetric, ProbeSet,
                           StreamEvaluator, TrainLog, param_groups)


def tensors(npz, split: str, per_class: int):
    """The first `per_class` images of each class as uint8 (N, 3, H, W) plus labels."""
    x, y = torch.from_numpy(npz[f"x_{split}"]).permute(0, 3, 1, 2), torch.from_numpy(npz[f"y_{split}"]).long()
    keep = torch.cat([torch.nonzero(y == c).flatten()[:per_class] for c in y.unique()])
    return x[keep].contiguous(), y[keep]


def labelled(x: torch.Tensor, y: torch.Tensor):
    """An Avalanche classification dataset of plain tensors (Avalanche reads the labels from `targets`)."""
    data = TensorDataset(x, y)
    data.targets = y.tolist()
    return as_classification_dataset(data)


def main(argv=None) -> list[list[float]]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--npz", required=True, help="x_train, y_train, x_test, y_test (uint8 HWC images)")
    p.add_argument("--per-class", type=int, default=200, help="training images per class (fewer: faster)")
    p.add_argument("--experiences", type=int, default=5)
    p.add_argument("--width", type=float, default=0.25, help="ResNet-18 channel multiplier")
    p.add_argument("--curves", help="a folder for the training curves (train.jsonl; TensorBoard: tb/train)")
    args = p.parse_args(argv)
    npz = np.load(args.npz)
    (xtr, ytr), (xte, yte) = tensors(npz, "train", args.per_class), tensors(npz, "test", args.per_class // 2)
    bench = nc_benchmark(labelled(xtr, ytr), labelled(xte, yte), n_experiences=args.experiences, task_labels=False, seed=0)
    model = EMPSSLModel(stem="cifar", width=args.width, feature_dim=512, proj_hidden_dim=512, proj_dim=128)
    augment = MultiPatchAugment(8, 32)
    classes = [sorted(exp.classes_in_this_experience) for exp in bench.train_stream]
    evaluator = StreamEvaluator(in_domain=ProbeSet("mine", xtr, ytr, xte, yte, int(ytr.max()) + 1), transfer=[],
                                parent_classes=classes, augment=augment, device=torch.device("cpu"))
    strategy = EMPSSLStrategy(model=model, optimizer=LARS(param_groups(model, 1e-4), lr=0.3), augment=augment,
                              batch_size=50, plugins=[ReplayPlugin(mem_size=100),
                                                      *([TrainLog(args.curves, every=1, tensorboard=True)]
                                                        if args.curves else [])],
                              # the learning rate's cosine decay spans the whole stream, as in run_stream.py (without
                              # total_updates it stays at lr)
                              total_updates=sum(math.ceil(len(e.dataset) / 50) for e in bench.train_stream),
                              evaluator=EvaluationPlugin(ProbeMetric(evaluator, model)))
    for experience in bench.train_stream:
        strategy.train(experience)
    matrix = [h[:-1] for h in evaluator.history]
    for t, row in enumerate(matrix):
        print(f"after experience {t + 1}: " + " ".join(f"{100 * a:5.1f}" for a in row))
    return matrix


if __name__ == "__main__":
    main()
