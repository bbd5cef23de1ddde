"""Run machinery as Avalanche plugins: evaluation schedule, checkpoint and exact resume, graceful stop,
progress, DDP buffer sync.

Each is a small `SupervisedPlugin`; they compose with each other, with the continual-learning plugins
of cl/ and with Avalanche's own. Plugins that must see the evaluation of the experience just trained
(checkpoints, stop) carry `runs_after_evaluator = True`; EMPSSLStrategy moves them after its evaluation
plugin (with another strategy, list them last and give the evaluator as a plugin before them).

A plugin that holds state worth resuming (a replay buffer, a frozen model) exposes `state_key`,
`state_dict()` and `load_state_dict(state)`; CheckpointPlugin saves and restores it with the rest.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import torch
from avalanche.core import SupervisedPlugin

from streaming_ssl import checkpoint as ckpt
from streaming_ssl import distributed as ddp
from streaming_ssl.atomic import keep_lines
from streaming_ssl.evaluation import ProbeMetric, StreamEvaluator, read_rows

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """Ctrl-C / SIGTERM (or SIGHUP, SIGUSR1, SIGUSR2) arrived; the run saved a checkpoint at the last finished
    update."""


class EvaluationInterrupted(Interrupted):
    """The stop arrived during an evaluation: it was cut short, and the checkpoint saved right before it (at the
    same update) is the one to resume from; the resumed run evaluates again."""


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2")
                     if hasattr(signal, name))


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the previous ones are intact."""


class EvalSchedule(SupervisedPlugin, supports_distributed=True):
    """Decides after which training experiences the evaluation runs, and how many parents were seen.

    Sets `strategy.eval_due`, `strategy.eval_seen` (parent experiences seen so far) and
    `strategy.at_boundary` (a parent experience just ended) for the experience about to train, in
    before_training_exp, so that every plugin reading them in after_training_exp (the evaluation, checkpoints,
    CaSSLe's frozen copy) sees this experience's values wherever it stands in the plugin list. `every` = k
    evaluates every k training experiences (online: mini-experiences) and after the last; 0 evaluates at the end
    of every parent experience.
    """

    def __init__(self, step_parent: list[int], every: int = 1) -> None:
        super().__init__()
        self.step_parent, self.every = list(step_parent), int(every)

    def is_parent_end(self, step: int) -> bool:
        return step == len(self.step_parent) - 1 or self.step_parent[step + 1] != self.step_parent[step]

    def due(self, done: int) -> bool:
        """Whether to evaluate after `done` finished training experiences."""
        if done == len(self.step_parent):
            return True
        if self.every == 0:
            return self.is_parent_end(done - 1)
        return done % self.every == 0

    def before_training_exp(self, strategy, **kwargs) -> None:
        self._mark(strategy, strategy.stream_step + 1)
        strategy.eval_due_next = strategy.eval_due  # read by CheckpointPlugin before the evaluation

    def after_training_exp(self, strategy, **kwargs) -> None:
        self._mark(strategy, strategy.stream_step)  # (the same values: stream_step has counted this experience)

    def _mark(self, strategy, done: int) -> None:
        """The flags for the evaluation after `done` finished training experiences."""
        if not 1 <= done <= len(self.step_parent):
            raise ValueError(f"EvalSchedule maps {len(self.step_parent)} training experiences to their parents, but "
                             f"experience {done - 1} is training: give step_parent one entry per experience of the "
                             "stream (online: per mini-experience)")
        strategy.eval_due = self.due(done)
        strategy.eval_seen = self.step_parent[done - 1] + 1
        strategy.at_boundary = self.is_parent_end(done - 1)


class SyncBuffers(SupervisedPlugin, supports_distributed=True):
    """DDP without SyncBatchNorm: every rank evaluates rank 0's model (the one checkpointed).

    Each rank's last forward updated its BatchNorm running statistics with its own share of the batch;
    feature extraction shards the images, so the probes would otherwise read features computed with a
    different model on every rank. Runs before the evaluation plugin.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def after_training_exp(self, strategy, **kwargs) -> None:
        ddp.broadcast_buffers(self.model)


class ProgressPlugin(SupervisedPlugin, supports_distributed=True):
    """A tqdm bar over the updates of the run, with the loss and the first six values of `strategy.last_stats`
    (coding rate, invariance, and a method's own) every `log_every` (in float16 also the loss scale and the updates
    it skipped)."""

    TAKEN = ("loss", "scale", "skipped", "refresh", "ordered_dict")  # the bar's own, or set_postfix's arguments

    def __init__(self, total_updates: int, *, desc: str = "", log_every: int = 20) -> None:
        super().__init__()
        self.total, self.desc, self.log_every = total_updates, desc, max(int(log_every), 1)
        self.bar = None

    def before_training(self, strategy, **kwargs) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=self.total, initial=strategy.global_step, desc=self.desc, unit="upd",
                        disable=not ddp.is_main(), dynamic_ncols=True, mininterval=2.0)

    def after_training_iteration(self, strategy, **kwargs) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        if strategy.global_step % self.log_every == 0 and strategy.last_stats:
            stats = {k: f"{float(v):.3f}" for k, v in list(strategy.last_stats.items())[:6]  # a method's own too
                     if (not isinstance(v, torch.Tensor) or v.numel() == 1) and k not in self.TAKEN}
            if getattr(strategy, "grad_scaler", None) is not None:  # float16: the loss scale and the skipped updates
                stats["scale"] = f"{strategy.grad_scaler.get_scale():.0f}"
                strategy.counters.flush()  # (the loss read below waits for the device anyway)
                stats["skipped"] = str(strategy.counters.skipped_updates)
            self.bar.set_postfix(loss=f"{float(strategy.loss.detach().reshape(-1)[0]):.2f}", **stats, refresh=False)

    def after_training(self, strategy, **kwargs) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class TrainLog(SupervisedPlugin, supports_distributed=True):
    """The training curves: every `every` updates one row of train.jsonl (and TensorBoard's `train/*` in tb/train,
    when `tensorboard`), with the update, experience, samples seen, learning rate, loss and every value in
    `strategy.last_stats` (the objective's `tcr` and `inv`, and whatever a method adds there, as `distill`; a
    method's value named as one of the row's own fields, ROW_FIELDS, is left out with a warning).

    The values stay on the device until a flush (every `flush_rows` (50) rows, after an evaluated experience, in
    `state_dict()`, which the checkpoint calls, and in `close()`, also after an error), so logging adds no host sync
    to the other updates. The number of rows written is checkpointed: a resumed run first drops the rows logged
    after its checkpoint (and TensorBoard hides those steps), so train.jsonl equals an uninterrupted run's; a new
    run (update 0, no checkpoint) starts the file afresh. Rank 0's values, written by rank 0; a failed write (a
    full disk) is logged and tried again at the next flush, never raised (under DDP the other ranks would wait
    for rank 0 in the checkpoint's collectives). Place it before CheckpointPlugin, so that the row of a
    checkpointed update is in that checkpoint."""

    state_key = "train_log"
    state_optional = True  # a checkpoint from before the curves were logged resumes without it
    flush_rows = 50
    ROW_FIELDS = ("update", "experience", "samples_seen", "lr", "loss")

    def __init__(self, run_dir: str | Path, *, every: int = 20, tensorboard: bool = False) -> None:
        super().__init__()
        self.path = Path(run_dir) / "train.jsonl"
        self.every, self.tensorboard = max(int(every), 1), tensorboard
        self.pending: list[tuple[dict, list[str], torch.Tensor, dict]] = []
        self.rows, self.unsynced = 0, False  # rows in train.jsonl; some not yet fsynced
        self.keep: int | None = None  # rows of the file to keep at the start (load_state_dict: the checkpoint's)
        self.started = False
        self.writer = None
        self.warned: set[str] = set()

    def before_training(self, strategy, **kwargs) -> None:
        if self.started or not ddp.is_main():
            return
        self.started = True
        keep = self.keep if self.keep is not None else 0 if strategy.global_step == 0 else None
        if keep is not None:  # rows past the checkpoint, or of an earlier run: logged again
            self.rows = keep_lines(self.path, keep)
        elif self.path.exists():  # resumed without a count (an older checkpoint): append
            self.rows = len(self.path.read_text().splitlines())
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # the steps logged after the checkpoint (all of them in a new run) are hidden, as the rows are dropped.
            # A folder of its own (TensorBoard's run "train"): a purge hides every tag's steps from there on, and
            # the evaluations in tb/ count experiences, not updates
            self.writer = SummaryWriter(str(self.path.parent / "tb" / "train"), purge_step=strategy.global_step + 1)

    def after_training_iteration(self, strategy, **kwargs) -> None:
        if strategy.global_step % self.every or not ddp.is_main() or strategy.loss is None:
            return
        loss = strategy.loss.detach().reshape(-1)[0]
        keys, tensors, numbers = ["loss"], [loss.float()], {}
        for key, value in strategy.last_stats.items():
            if key in self.ROW_FIELDS:
                self._warn(key, f"strategy.last_stats[{key!r}] is not logged: {key!r} is a field of every row of "
                                f"{self.path.name}; give the value another name")
            elif isinstance(value, torch.Tensor) and value.numel() == 1:
                keys.append(key)
                tensors.append(value.detach().reshape(()).to(device=loss.device, dtype=torch.float32))
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                numbers[key] = float(value)
        groups = getattr(strategy.optimizer, "param_groups", None) or [{}]
        meta = {"update": strategy.global_step, "experience": strategy.stream_step,
                "samples_seen": strategy.samples_seen, "lr": groups[0].get("lr")}
        self.pending.append((meta, keys, torch.stack(tensors), numbers))
        if len(self.pending) >= self.flush_rows:
            self.flush()

    def after_training_exp(self, strategy, **kwargs) -> None:
        if getattr(strategy, "eval_due", True):  # the evaluation waits for the device anyway
            self.flush()

    def after_training(self, strategy, **kwargs) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.flush()

    def flush(self, sync: bool = False) -> None:
        """Read the pending rows back from the device (one sync) and append them to train.jsonl and TensorBoard;
        `sync`: every row written is on disk before returning (a checkpoint is about to count them)."""
        if not self.pending:
            if sync and self.unsynced:
                self._append([], sync=True)
            return
        values = torch.cat([t for _, _, t, _ in self.pending]).cpu().tolist()
        rows, at = [], 0
        for meta, keys, _, numbers in self.pending:
            rows.append({**meta, **dict(zip(keys, values[at:at + len(keys)])), **numbers})
            at += len(keys)
        if not self._append([json.dumps(row, allow_nan=True) + "\n" for row in rows], sync=sync):
            return  # kept pending, tried again at the next flush
        self.pending = []
        for row in rows if self.writer is not None else []:
            for key, value in row.items():
                if key not in ("update", "experience") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, row["update"])

    def _append(self, lines: list[str], *, sync: bool) -> bool:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as fh:
                fh.write("".join(lines))
                if sync:
                    fh.flush()
                    os.fsync(fh.fileno())
        except OSError as err:
            where = free_space(self.path.parent)
            self._warn("write", f"could not append to {self.path} ({err.strerror or err}; {where}): its rows are "
                                "kept and written at the next flush")
            try:  # no partial row left behind for the next append to follow
                keep_lines(self.path, self.rows)
            except OSError:
                pass
            return False
        self.rows, self.unsynced = self.rows + len(lines), not sync
        return True

    def _warn(self, what: str, message: str) -> None:
        if what not in self.warned:
            self.warned.add(what)
            log.warning("%s", message)

    def state_dict(self) -> dict:
        self.flush(sync=True)
        if self.writer is not None:
            self.writer.flush()
        return {"rows": self.rows if ddp.is_main() else 0}

    def load_state_dict(self, state: dict) -> None:
        """The rows of train.jsonl the checkpoint counted; the ones after them are dropped when training starts
        (not here: a resume refused after this must leave the run directory as it was)."""
        self.pending, self.keep, self.rows, self.started = [], int(state["rows"]), int(state["rows"]), False

    def close(self) -> None:
        """Write what is pending (after an error too: the rows up to a non-finite loss are what one looks at), and
        close the TensorBoard writer."""
        try:
            self.flush()
        except Exception as err:  # noqa: BLE001 - must not hide the error the run is ending with
            log.warning("the last %d rows of %s were not written: %s", len(self.pending), self.path.name, err)
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def free_space(path: Path) -> str:
    """'123.4 MB free there' (or why that is unknown), and the process's file-size limit where one is set (a full
    disk and `ulimit -f` look alike to torch.save), for the message of a checkpoint that could not be written."""
    try:
        out = f"{shutil.disk_usage(path).free / 1e6:.1f} MB free there"
    except OSError as err:
        out = f"free space unknown: {err.strerror or err}"
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, OSError, ValueError):
        return out
    if limit != resource.RLIM_INFINITY:
        out += f", but this process may write files of at most {limit / 1e6:.1f} MB (its file-size limit, ulimit -f)"
    return out


class CheckpointPlugin(SupervisedPlugin, supports_distributed=True):
    """Atomic checkpoints of everything a run needs to continue bit for bit, and the restore.

    Saved: model, optimizer, stream position, every RNG state, each rank's augmentation generator, float16's loss
    scale, the evaluator's history, the number of metrics.jsonl rows, wall time, compute counters, the resolved
    config, the training data's name, image size and normalisation (`data`, build.TrainingData: what rebuilding the
    model needs of it), and the state of every plugin with a `state_key`. Written after every experience (online
    streams: only with an evaluation, at parent boundaries, or on stop) and every `every` updates.
    """

    runs_after_evaluator = True

    def __init__(self, run_dir: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 evaluator: StreamEvaluator, metric: ProbeMetric, config: dict, keep_last: int = 3, every: int = 0,
                 each_experience: bool = True, data: dict | None = None) -> None:
        super().__init__()
        self.run_dir, self.model, self.optimizer = Path(run_dir), model, optimizer
        self.evaluator, self.metric, self.config, self.data = evaluator, metric, config, data
        self.keep_last, self.every, self.each_experience = keep_last, every, each_experience
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.last_saved: tuple[int, int] | None = None

    def after_training_iteration(self, strategy, **kwargs) -> None:
        if self.every and strategy.global_step % self.every == 0:
            self.save(strategy)

    def after_training_epoch(self, strategy, **kwargs) -> None:
        """Right before an evaluation (the experience's last epoch is done, one is due): save, so that a stop during
        the evaluation need not wait for it (a scheduler's SIGKILL may come first). The save after the evaluation
        has the same update and replaces this file."""
        last_epoch = strategy.epoch_in_exp >= getattr(strategy, "train_epochs", 1) - 1
        if last_epoch and getattr(strategy, "eval_due_next", True) and \
                self.last_saved != (strategy.global_step, strategy.stream_step):
            self.save(strategy)

    def saved_before_evaluation(self, strategy) -> bool:
        """Whether the newest checkpoint holds this update with the experience just trained not yet evaluated (the
        evaluation running now, which advanced stream_step, can be thrown away and run again on resume)."""
        return self.last_saved == (strategy.global_step, strategy.stream_step - 1)

    def after_training_exp(self, strategy, **kwargs) -> None:
        if self.each_experience or getattr(strategy, "eval_due", True) or getattr(strategy, "at_boundary", True):
            self.save(strategy)

    def payload(self, strategy) -> dict:
        from streaming_ssl.strategy import NonFiniteLossError

        if hasattr(strategy, "check_finite"):
            strategy.check_finite()
        model, optimizer = self.model.state_dict(), self.optimizer.state_dict()
        plugins = {p.state_key: p.state_dict() for p in strategy.plugins if hasattr(p, "state_key")}
        unloadable = ckpt.unloadable_names(plugins, "plugins")  # a user's plugin: refused now, not at every resume
        # what training goes on from (not the evaluator's history: a class without test images is a NaN accuracy)
        bad = ckpt.nonfinite_names({"model": model, "optimizer": optimizer["state"], "plugins": plugins})
        # every rank stops together: some state is one rank's own (MinRed's stored features live on rank 0)
        if bool(ddp.any_rank_flag(bool(bad or unloadable), strategy.device).item()):
            kept = "Nothing was saved at this update and the last checkpoint is intact"
            if unloadable:
                raise ckpt.CheckpointError(
                    f"a plugin's state_dict() holds what a checkpoint cannot load safely (weights_only=True): "
                    f"{', '.join(unloadable[:3])}; return tensors, Python numbers, strings, lists and dicts only "
                    f"(e.g. float(x), x.tolist() or torch.as_tensor(x) for numpy values). {kept}")
            if not bad:
                raise NonFiniteLossError(
                    f"the training state of another rank than rank {ddp.rank()} cannot be saved at update "
                    f"{strategy.global_step} (non-finite, or a plugin state a checkpoint cannot load): that rank's "
                    f"log names it. {kept}")
            raise NonFiniteLossError(
                f"the training state became non-finite at update {strategy.global_step} (first: {bad[0]}); this state "
                "was not saved and the last checkpoint is intact. Lower optim.lr or check the input data.")
        scaler = getattr(strategy, "grad_scaler", None)
        return {"format": ckpt.FORMAT_VERSION, "model": model,
                "optimizer": optimizer, "position": strategy.position(), "rng": ckpt.rng_state(),
                "aug_generator": ddp.all_gather_object(strategy.aug_generator.get_state().cpu()),
                "aug_device": strategy.aug_generator.device.type,
                "evaluator": self.evaluator.state_dict(), "counters": strategy.counters.state_dict(),
                "grad_scaler": None if scaler is None else scaler.state_dict(),
                "plugins": plugins,
                "metrics_rows": len(read_rows(self.metrics_path)) if ddp.is_main() else 0,
                "wall_seconds": self.metric.time_offset + time.time() - self.metric.start_time,
                "config": self.config, **({"data": self.data} if self.data is not None else {})}

    def save(self, strategy) -> None:
        payload = self.payload(strategy)
        failed: BaseException | None = None
        if ddp.is_main():
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)  # a run built in Python names a new folder
                ckpt.save_rotating(payload, self.run_dir, strategy.global_step, self.keep_last)
            except Exception as err:  # noqa: BLE001 - every rank learns of it below, then it is raised
                failed = err
        # instead of a barrier: every rank learns whether rank 0 wrote, and all stop together if not (a bare barrier
        # left the other ranks waiting there, on other nodes until the collective timeout)
        if bool(ddp.any_rank_flag(failed is not None, strategy.device).item()):
            fix = (f"the previous checkpoints are intact: free disk space (or move run.out_dir), then "
                   f"{ddp.relaunch()} --resume {self.run_dir}")
            if failed is None:
                raise CheckpointWriteError(f"rank 0 could not write a checkpoint into {str(self.run_dir)!r} (its log "
                                           f"says why); {fix}")
            # a full disk reaches torch.save as an OSError or, from its zip writer, a RuntimeError ("unexpected pos")
            what = failed.strerror if isinstance(failed, OSError) and failed.strerror else failed
            raise CheckpointWriteError(
                f"could not write a checkpoint into {str(self.run_dir)!r} ({type(failed).__name__}: {what}; "
                f"{free_space(self.run_dir)}); {fix}") from failed
        self.last_saved = (strategy.global_step, strategy.stream_step)

    def restore(self, strategy, state: dict) -> None:
        """Continue from `state`: call after everything is built, right before training (RNG last)."""
        strategy.core_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        strategy.set_position(state["position"])
        self.evaluator.load_state_dict(state["evaluator"])
        self.metric.time_offset = float(state["wall_seconds"])
        strategy.counters.load_state_dict(state.get("counters", {}))
        scaler = getattr(strategy, "grad_scaler", None)
        if scaler is not None and state.get("grad_scaler"):  # float16: the loss scale and its growth count go on
            scaler.load_state_dict(state["grad_scaler"])
        saved = state.get("plugins", {})
        # (the training curves' row count is no method: a strategy without TrainLog resumes without it)
        unused = sorted(set(saved) - {p.state_key for p in strategy.plugins if hasattr(p, "state_key")}
                        - {TrainLog.state_key})
        if unused:  # silently dropped, the resumed run would train on without a method the run had
            raise ckpt.CheckpointError(
                f"the checkpoint holds the state of {', '.join(map(repr, unused))}, a plugin this run lacks: it was "
                "written with a method the resumed run does not build; resume with the same plugins (the config saved "
                "in the run, which names your methods' modules in cl.imports, or from Python the same plugin list)")
        for p in strategy.plugins:
            if hasattr(p, "state_key"):
                if p.state_key not in saved:
                    if getattr(p, "state_optional", False):
                        continue
                    raise ckpt.CheckpointError(f"the checkpoint holds no state for {p.state_key!r}: it was written by "
                                               "a run without that method; resume with the config saved in the run")
                p.load_state_dict(saved[p.state_key])
        aug_states = state["aug_generator"]
        if len(aug_states) != ddp.world_size():
            raise ckpt.CheckpointError(
                f"the run was saved by {len(aug_states)} process(es) but resumes with {ddp.world_size()}; resume "
                "with the same number of processes (torchrun --nproc_per_node)")
        here = strategy.aug_generator.device.type
        there = state.get("aug_device") or here  # checkpoints before the key: told apart by the state's size
        if there != here or aug_states[ddp.rank()].numel() != strategy.aug_generator.get_state().numel():
            raise ckpt.CheckpointError(
                f"the run was trained on {'another device' if there == here else there} and resumes on {here}: the "
                "augmentation's random stream (CPU and CUDA generators differ) continues exactly only on the kind of "
                "device the run started on; resume it on such a machine (a CPU run on a GPU machine: "
                "CUDA_VISIBLE_DEVICES= python run_stream.py --resume RUN), or start a new run")
        strategy.aug_generator.set_state(aug_states[ddp.rank()])
        if ddp.is_main():  # drop rows written after the checkpoint (they will be computed again)
            keep_lines(self.metrics_path, int(state["metrics_rows"]))
        ckpt.set_rng_state(state["rng"])
        self.last_saved = (strategy.global_step, strategy.stream_step)


class GracefulStop(SupervisedPlugin, supports_distributed=True):
    """SIGINT, SIGTERM, SIGHUP, SIGUSR1, SIGUSR2: finish the current update, save (through `checkpoint`), raise
    Interrupted. During an evaluation that `checkpoint` saved right before, the evaluation is cut short at once
    (EvaluationInterrupted): that checkpoint is the one to resume from, and a scheduler's grace period (30 s for
    SLURM and torchrun) need not cover the rest of the evaluation.

    Under DDP every rank stops after the same update, whichever ranks the signal reached and whenever: a rank
    that stopped alone would leave the others waiting in the next collective, and the checkpoint is written
    collectively. After each update the ranks all-reduce whether any of them was signalled. Over gloo (CPU)
    the result is read at once; on CUDA it is read `lag` updates later, so that the host never waits for the
    update it just launched (the stop comes at most `lag` updates late). At the end of an experience that was
    evaluated it is read at once (the evaluation has synchronised anyway).

    A second Ctrl-C (SIGINT) leaves at once (KeyboardInterrupt); any other repeated signal is ignored, so that a
    stop delivered twice (srun signals every process of the step, and torchrun forwards its own) does not cut a
    checkpoint write short. A signal the process was started ignoring (SIGHUP under `nohup`) stays ignored.
    Handlers are installed for the training and restored after it (call `close()` in a `finally` too: an exception
    skips after_training).
    """

    runs_after_evaluator = True

    def __init__(self, checkpoint: CheckpointPlugin | None = None, lag: int = 2) -> None:
        super().__init__()
        self.checkpoint = checkpoint
        self.lag = int(lag)
        self.signal: int | None = None
        self._old: dict = {}
        self._pending: list = []  # CUDA under DDP: (event, pinned host copy) of flags not read yet, oldest first
        self._strategy = None

    def _on_signal(self, signum, frame) -> None:
        if self.signal is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            log.warning("signal %d: already stopping (signal %d); ignored", signum, self.signal)
            return
        self.signal = signum
        strategy = self._strategy
        if strategy is not None and getattr(strategy, "evaluating", False) and self.checkpoint is not None and \
                self.checkpoint.saved_before_evaluation(strategy):
            raise EvaluationInterrupted(
                f"stopped by signal {signum} during the evaluation after update {strategy.global_step}: the "
                "checkpoint saved right before it is kept, and the resumed run evaluates again")
        log.warning("signal %d: finishing the current update, saving a checkpoint, then stopping%s", signum,
                    " (all ranks after the same update)" if ddp.is_dist() else "")

    def before_training(self, strategy, **kwargs) -> None:
        # a signal the process was started ignoring stays ignored: `nohup` runs go on when the terminal closes
        self._old = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS
                     if signal.getsignal(sig) is not signal.SIG_IGN}
        self._pending = []
        self._strategy = strategy

    def _stop_now(self, strategy, at_once: bool) -> bool:
        """Whether every rank stops here (the same answer on every rank)."""
        if not ddp.is_dist():
            return self.signal is not None
        flag = ddp.any_rank_flag(self.signal is not None, strategy.device)
        if flag.device.type != "cuda" or at_once:
            self._pending = []
            return bool(flag.item())
        host = torch.empty(1, dtype=flag.dtype, pin_memory=True).copy_(flag, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((event, host))
        if len(self._pending) <= self.lag:
            return False
        event, host = self._pending.pop(0)
        event.synchronize()  # the update `lag` before this one: the device still has the later ones queued
        return bool(host.item())

    def _maybe_stop(self, strategy, at_once: bool) -> None:
        if not self._stop_now(strategy, at_once):
            return
        if self.checkpoint is not None and self.checkpoint.last_saved != (strategy.global_step, strategy.stream_step):
            self.checkpoint.save(strategy)
        cause = f"signal {self.signal}" if self.signal is not None else "a signal to another rank"
        raise Interrupted(f"stopped by {cause} at update {strategy.global_step}")

    def after_training_iteration(self, strategy, **kwargs) -> None:
        self._maybe_stop(strategy, at_once=False)

    def after_training_exp(self, strategy, **kwargs) -> None:
        # under DDP only where an evaluation ran (it synchronised anyway): online mini-experiences end after every
        # update or so, and the check after that update has been made already
        if not ddp.is_dist() or getattr(strategy, "eval_due", True):
            self._maybe_stop(strategy, at_once=True)

    def after_training(self, strategy, **kwargs) -> None:
        self.close()

    def close(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}
        self._strategy = None
