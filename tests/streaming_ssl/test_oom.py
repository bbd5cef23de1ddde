"""Out of memory: which errors count, where they happened, what the message advises, and what --resume accepts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from streaming_ssl import oom
from streaming_ssl.augment import MultiPatchAugment
from streaming_ssl.config import load_config, save_config
from streaming_ssl.probe import extract_features
from streaming_ssl.runner import RunError, prepare_run_dir

SETTINGS = dict(batch_size=100, n_patches=20, replay_batch=0, recompute_stages=0, recompute_bn_relu=False,
                eval_batch_size=256, eval_patches=0)


class Greedy(torch.nn.Module):
    """features() asks the CPU allocator for 2**62 bytes: a real allocation failure, wherever it is called."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.empty(2 ** 62, dtype=torch.uint8)


def _raised(fn) -> BaseException:
    with pytest.raises(Exception) as info:
        fn()
    return info.value


def test_out_of_memory_errors_and_where_they_happened():
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    in_probe = _raised(lambda: extract_features(Greedy(), images, MultiPatchAugment(2, 8), device=torch.device("cpu")))
    in_training = _raised(lambda: Greedy().features(images))
    assert "DefaultCPUAllocator: can't allocate memory" in str(in_probe)
    assert oom.is_out_of_memory(in_probe) and oom.is_out_of_memory(in_training)
    assert oom.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not oom.is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not oom.is_out_of_memory(MemoryError())  # Python's own: not the tensor allocator, not advised on
    assert oom.during_evaluation(in_probe) and not oom.during_evaluation(in_training)
    # only this package's probe code counts: a user's (or avalanche's) file of the same name is not an evaluation
    elsewhere = {}
    exec(compile("def raise_it():\n    raise torch.OutOfMemoryError('CUDA out of memory.')\n",
                 "/somewhere/else/probe.py", "exec"), {"torch": torch}, elsewhere)
    assert not oom.during_evaluation(_raised(elsewhere["raise_it"]))
    assert oom.device_memory(torch.device("cpu")) == "cpu"


def _overrides(message: str) -> list[str]:
    line = message.splitlines()[-1].strip()
    assert line.startswith("python run_stream.py --resume runs/r "), message
    return line.split()[4:]


@pytest.mark.parametrize("stages, bn_relu, expected", [
    (0, False, ["model.recompute_stages=2", "model.recompute_bn_relu=true"]),
    (1, True, ["model.recompute_stages=2"]),
    (2, False, ["model.recompute_stages=4", "model.recompute_bn_relu=true"]),
    (4, False, ["model.recompute_bn_relu=true"]),
])
def test_training_message_names_the_savers_not_yet_on_and_a_resume_that_is_accepted(stages, bn_relu, expected):
    err = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity\nmore")
    msg = oom.out_of_memory_message(err, evaluating=False, device="cuda:0 (H200)", update=7, experience=1,
                                    run_dir="runs/r", checkpoint_update=5,
                                    **{**SETTINGS, "recompute_stages": stages, "recompute_bn_relu": bn_relu})
    assert msg.startswith("out of memory on cuda:0 (H200) in training update 7 (experience 1): CUDA out of memory. "
                          "Tried to allocate 2.00 GiB. GPU 0 has a total capacity.")  # PyTorch's first line only
    assert "train.batch_size=100 x augment.n_patches=20 = 2000 patches." in msg
    assert "the checkpoint of update 5 is intact" in msg
    assert _overrides(msg) == expected
    # every override it advises is one --resume accepts and a valid config
    assert all(o.split("=")[0] in oom.RESUMABLE for o in expected)
    load_config("configs/smoke.yaml", expected)


def test_training_message_with_the_savers_at_their_most_and_replay():
    msg = oom.out_of_memory_message(RuntimeError("DefaultCPUAllocator: can't allocate memory"), evaluating=False,
                                    device="cpu", update=0, experience=0, run_dir="runs/r", checkpoint_update=None,
                                    **{**SETTINGS, "recompute_stages": 4, "recompute_bn_relu": True,
                                       "replay_batch": 50})
    assert "plus 1000 of cl.replay.batch=50 replayed images" in msg
    assert "the memory savers are on at their most" in msg and "more GPUs under torchrun" in msg
    assert "no checkpoint was written yet" in msg and "--resume" not in msg


@pytest.mark.parametrize("eval_patches, held", [(0, "256 images"), (16, "256 images x 16 patches")])
def test_evaluation_message_names_the_extraction_batch(eval_patches, held):
    msg = oom.out_of_memory_message(torch.OutOfMemoryError("CUDA out of memory."), evaluating=True, device="cuda:0",
                                    update=40, experience=3, run_dir="runs/r", checkpoint_update=30,
                                    **{**SETTINGS, "eval_patches": eval_patches})
    assert "in the evaluation after experience 3" in msg and f"eval.batch_size=256 ({held}) at once" in msg
    assert "CUDA out of memory. The feature extraction" in msg  # PyTorch's closing full stop is not doubled
    assert "recompute" not in msg  # training's savers do nothing for the probes
    assert _overrides(msg) == ["eval.batch_size=64"]
    load_config("configs/smoke.yaml", ["eval.batch_size=64"])


def test_a_baseline_that_runs_out_of_memory_is_named():
    msg = oom.out_of_memory_message(torch.OutOfMemoryError("CUDA out of memory."), evaluating=True, device="cuda:0",
                                    update=0, experience=-1, run_dir="runs/r", checkpoint_update=None, **SETTINGS)
    assert "in forward transfer's baseline (the probes of the model at initialisation, before experience 0)" in msg
    assert "experience -1" not in msg and _overrides(msg) == ["eval.batch_size=64"]


def test_resume_accepts_only_the_resumable_changes(tmp_path: Path, caplog):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    base = [f"run.out_dir={run_dir}"]
    save_config(load_config("configs/smoke.yaml", base), run_dir / "config.yaml")
    changes = ["model.recompute_stages=2", "model.recompute_bn_relu=true", "eval.batch_size=64",
               "eval.forward_transfer=true"]  # the last adds a figure: a run saved without it resumes with it
    with caplog.at_level("INFO"):
        assert prepare_run_dir(load_config("configs/smoke.yaml", base + changes), resume=True) == (run_dir, None)
    said = "\n".join(r.getMessage() for r in caplog.records)
    for line in ("model.recompute_stages: run has 0, now 2", "model.recompute_bn_relu: run has False, now True",
                 "eval.batch_size: run has 256, now 64", "eval.forward_transfer: run has False, now True"):
        assert f"resuming with {line}" in said
    for other in ("train.batch_size=10", "augment.n_patches=8", "eval.patches=4"):
        with pytest.raises(RunError, match=re.escape(other.split("=")[0]) + r".*change only model\.recompute_stages, "
                           r"model\.recompute_bn_relu, eval\.batch_size, eval\.forward_transfer, or start a "
                           r"new run"):
            prepare_run_dir(load_config("configs/smoke.yaml", base + changes + [other]), resume=True)


def test_under_torchrun_the_resume_command_is_the_same_launch():
    msg = oom.out_of_memory_message(torch.OutOfMemoryError("CUDA out of memory."), evaluating=False, device="cuda:3",
                                    update=9, experience=0, run_dir="runs/r", checkpoint_update=8,
                                    launch="the same torchrun command with run_stream.py", **SETTINGS)
    assert msg.endswith("\n  the same torchrun command with run_stream.py --resume runs/r model.recompute_stages=2 "
                        "model.recompute_bn_relu=true")
