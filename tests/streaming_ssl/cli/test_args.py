"""The command lines parse as their help says: overrides anywhere among the flags, --transfer repeatable."""

from __future__ import annotations

import streaming_ssl.cli.evaluate as evaluate
import streaming_ssl.cli.train as run_stream


def test_train_overrides_go_before_after_and_between_flags() -> None:
    args = run_stream.parse_args(["--config", "c.yaml", "a.b=1", "--overwrite", "c.d=2"])
    assert args.overrides == ["a.b=1", "c.d=2"] and args.overwrite and args.config == "c.yaml"
    args = run_stream.parse_args(["a.b=1", "--resume", "runs/x", "c.d=2", "--auto-resume"])
    assert args.overrides == ["a.b=1", "c.d=2"] and args.resume == "runs/x" and args.auto_resume
    assert run_stream.parse_args(["--config", "c.yaml"]).overrides == []


def test_evaluate_repeated_transfer_adds_to_the_list() -> None:
    args = evaluate.parse_args(["--checkpoint", "x", "--transfer", "cifar100", "--knn", "--transfer", "npz:/d.npz",
                                "folder:/svhn"])
    assert args.transfer == ["cifar100", "npz:/d.npz", "folder:/svhn"] and args.knn
    assert evaluate.parse_args(["--checkpoint", "x"]).transfer == []  # the default list was not extended in place
