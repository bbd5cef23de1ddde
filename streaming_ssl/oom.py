"""Out of memory during a run: what ran out, the settings that lower the peak, and how to continue.

A GPU that runs out of memory in the middle of a long stream should cost its user the updates since the last
checkpoint and nothing else. The runner turns PyTorch's out-of-memory error into one that says where it happened
(a training update, or the evaluation after an experience), how much the device holds, which settings lower the
peak, and the `--resume` command that continues the run with them. The settings of `RESUMABLE` change memory, not
what is learned, so a run may resume with other values of them (runner.prepare_run_dir); every other setting
must match the run's.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import torch

# settings a run may resume with other values of, and what changing them changes
RESUMABLE = {
    "model.recompute_stages": "memory only: the recomputation repeats the same forward, the results stay the same",
    "model.recompute_bn_relu": "memory only: the results stay the same",
    "eval.batch_size": "the memory of the probes' feature extraction; later evaluations can differ from an "
                       "uninterrupted run's in rounding and, with eval.patches > 0, in the patches drawn",
}
# our code of the evaluation after an experience (an error raised in it happened while probing, not training); only
# this package's files count (avalanche has an evaluation.py too, and a user's plugin may be called probe.py)
_PACKAGE = Path(__file__).resolve().parent
_EVALUATION_FILES = tuple(_PACKAGE / name for name in ("probe.py", "evaluation.py", "probe_run.py",
                                                       "features_cache.py"))
_CPU_ALLOCATOR_FAILURE = "DefaultCPUAllocator: can't allocate memory"


def is_out_of_memory(err: BaseException) -> bool:
    """PyTorch's out-of-memory error (CUDA and other accelerators), or the CPU allocator's failure."""
    return isinstance(err, torch.OutOfMemoryError) or (isinstance(err, RuntimeError)
                                                       and _CPU_ALLOCATOR_FAILURE in str(err))


def during_evaluation(err: BaseException) -> bool:
    """Whether the error was raised in the probes' code (feature extraction, probe fits) rather than in training."""
    return any(Path(frame.f_code.co_filename).resolve() in _EVALUATION_FILES
               for frame, _ in traceback.walk_tb(err.__traceback__))


def device_memory(device: torch.device) -> str:
    """`cuda:0 (NVIDIA H200, 139.8 GiB, this process's peak 131.0 GiB)`; the device's name alone elsewhere."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return str(device)
    gib = 2 ** 30
    total = torch.cuda.get_device_properties(device).total_memory
    peak = torch.cuda.max_memory_allocated(device)
    return (f"{device} ({torch.cuda.get_device_name(device)}, {total / gib:.1f} GiB, this process's peak "
            f"{peak / gib:.1f} GiB)")


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0].rstrip(".") if lines else type(err).__name__


def resume_command(run_dir: str | Path, overrides: list[str], launch: str = "python run_stream.py") -> str:
    return " ".join([launch, "--resume", str(run_dir), *overrides])


def out_of_memory_message(err: BaseException, *, evaluating: bool, device: str, update: int, experience: int,
                          run_dir: str | Path, checkpoint_update: int | None, batch_size: int, n_patches: int,
                          replay_batch: int, recompute_stages: int, recompute_bn_relu: bool, eval_batch_size: int,
                          eval_patches: int, launch: str = "python run_stream.py") -> str:
    """What ran out of memory and where, the settings that lower the peak, and the command that continues the run.

    Args:
        err: PyTorch's error (its first line, which says how much it tried to allocate, is quoted).
        evaluating: raised in the evaluation after `experience` (else in training update `update`, 0-based).
        device: the device in words (`device_memory`).
        checkpoint_update: the update of the run's newest checkpoint (None: none written yet).
        launch: how the run was started (under torchrun: the same torchrun command with run_stream.py).
        The rest: the run's settings of the same names.
    """
    if checkpoint_update is None:
        kept = "no checkpoint was written yet: the resumed run starts from the beginning"
    else:
        kept = (f"the checkpoint of update {checkpoint_update} is intact, and the resumed run trains the updates "
                "after it again (the same batches and augmentations)")
    where = (f"in the evaluation after experience {experience} (its feature extraction or probes)" if evaluating
             else f"in training update {update} (experience {experience})")
    if evaluating and experience < 0:
        where = "in forward transfer's baseline (the probes of the model at initialisation, before experience 0)"
    head = f"out of memory on {device} {where}: {_first_line(err)}."
    if evaluating:
        smaller = max(1, eval_batch_size // 4)
        held = f"{eval_batch_size} images" + (f" x {eval_patches} patches" if eval_patches else "")
        return (f"{head} The feature extraction holds eval.batch_size={eval_batch_size} ({held}) at once; lower "
                f"it ({RESUMABLE['eval.batch_size']}). Nothing of this evaluation was saved; {kept}. Continue with:"
                f"\n  {resume_command(run_dir, [f'eval.batch_size={smaller}'], launch)}")
    held = f"train.batch_size={batch_size} x augment.n_patches={n_patches} = {batch_size * n_patches} patches"
    if replay_batch:
        held += f", plus {replay_batch * n_patches} of cl.replay.batch={replay_batch} replayed images"
    method = ("Changing the method instead lowers it too: a smaller train.batch_size, augment.n_patches or "
              "cl.replay.batch (a new run), or more GPUs under torchrun (train.batch_size is the global batch, each "
              "GPU holds its share).")
    savers = []
    if recompute_stages < 4:
        savers.append(f"model.recompute_stages={2 if recompute_stages < 2 else 4}")
    if not recompute_bn_relu:
        savers.append("model.recompute_bn_relu=true")
    if not savers:
        return (f"{head} An update holds the activations of {held}; the memory savers are on at their most "
                f"(model.recompute_stages=4, model.recompute_bn_relu=true). {method} Nothing of this update was "
                f"saved; {kept}.")
    return (f"{head} An update holds the activations of {held}. The memory savers {' '.join(savers)} recompute "
            "the front of the network in backward instead of storing it (model.recompute_stages=2 with "
            "model.recompute_bn_relu: 5.3 instead of 10.8 GB for a full-width CIFAR update, for one more forward "
            f"of the stem and stages 1-2; README \"Memory\"): {RESUMABLE['model.recompute_stages']}. "
            f"{method} Nothing of this update was saved; {kept}. Continue with:\n  "
            f"{resume_command(run_dir, savers, launch)}")


def probe_out_of_memory_message(err: BaseException, *, device: str, checkpoint: str, batch_size: int,
                                patches: int) -> str:
    """evaluate.py's: what ran out while probing a checkpoint, and the --batch-size that holds less."""
    held = f"{batch_size} images" + (f" x {patches} patches" if patches else "")
    depends = ("with --patches the patches drawn depend on it (seeded per batch)" if patches
               else "whole-image features do not depend on it but for rounding")
    return (f"out of memory on {device} while probing {checkpoint}: {_first_line(err)}. The feature extraction holds "
            f"{held} at once (--batch-size; default: the run's eval.batch_size): lower it, e.g. --batch-size "
            f"{max(1, batch_size // 4)} ({depends}). Nothing was written.")
