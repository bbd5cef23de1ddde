"""One training run, from a resolved Config to its run directory: the library behind run_stream.py.

`prepare_run_dir` checks the run directory (new, --resume, --overwrite) before anything is written;
`train` builds the run (build.py), creates the directory only once data, stream and model are known to
be good (with --auto-resume: an empty directory holding its lock at the start), trains the strategy over the
stream, and writes the plot and summary.json.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
from pathlib import Path

import torch
import yaml

from streaming_ssl import checkpoint as ckpt
from streaming_ssl import distributed as ddp
from streaming_ssl import oom, provenance
from streaming_ssl.atomic import atomic_write_text, remove_stale_temp_files
from streaming_ssl.config import Config, config_from_dict, save_config
from streaming_ssl.device import cpu_kind
from streaming_ssl.runlock import RunLock, run_files

log = logging.getLogger(__name__)


class RunError(RuntimeError):
    """A problem with the run directory or the command line; the message says what to do."""


class OutOfMemory(RunError):
    """The device ran out of memory; the message says where, the settings that lower the peak, and the --resume
    command that continues the run with them (oom.py)."""


# settings a run may resume with other values of: the memory settings, and what only adds a figure
RESUMABLE = {**oom.RESUMABLE,
             "eval.forward_transfer": "forward transfer from the next evaluation on (a run saved without its baseline "
                                      "takes it from its model at initialisation, rebuilt from its seed), or not"}


def dict_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """`key: run has X, now Y` for every leaf that differs between two nested dicts."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += dict_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: run has {va!r}, now {vb!r}")
    return out


def _predates_blur_kernel(raw) -> bool:
    """Whether a saved config (its YAML mapping) was written before `augment.blur_kernel` existed (every resolved
    config written since holds every key)."""
    return isinstance(raw, dict) and "blur_kernel" not in (raw.get("augment") or {})


def prepare_run_dir(cfg: Config, *, resume: bool = False, overwrite: bool = False) -> tuple[Path, dict | None]:
    """Check the run directory; with `resume` return the checkpoint to continue from (None: start afresh)."""
    run_dir, path = _prepare_run_dir(cfg, resume=resume, overwrite=overwrite)
    return run_dir, None if path is None else ckpt.load(path)


def _prepare_run_dir(cfg: Config, *, resume: bool, overwrite: bool,
                     check_empty: bool = True) -> tuple[Path, Path | None]:
    """prepare_run_dir without loading: (run directory, the checkpoint file to continue from or None). Without
    `check_empty` a new run is not refused for a non-empty directory (another rank than rank 0 under --auto-resume:
    rank 0 decides, holding the run's lock)."""
    run_dir = Path(cfg.run.out_dir)
    check_out_dir_path(run_dir)
    if resume:
        saved_cfg_path = run_dir / "config.yaml"
        if not saved_cfg_path.is_file():
            raise RunError(f"cannot resume {str(run_dir)!r}: it holds no config.yaml (not a run directory)")
        raw = yaml.safe_load(saved_cfg_path.read_text())
        saved = config_from_dict(raw, saved=True)
        if _predates_blur_kernel(raw) and cfg.augment.blur_kernel is None:
            # saved before augment.blur_kernel existed: it trained with the 10% kernel, and resumes with it
            saved.augment.blur_kernel = cfg.augment.blur_kernel = 0
            log.info("this run was saved before augment.blur_kernel existed: it resumes with the blur it trained with "
                     "(augment.blur_kernel=0, 10%% of the patch; the default now spans +-3 sigma)")
        if Path(saved.run.out_dir).resolve() != run_dir.resolve():  # not a difference: the run is where it is
            log.info("the run was saved in %s and continues in %s (moved or copied)", saved.run.out_dir, run_dir)
        saved.run.out_dir = cfg.run.out_dir
        diffs = dict_diff(saved.to_dict(), cfg.to_dict())
        changed = [d for d in diffs if d.split(":")[0] in RESUMABLE]
        diffs = [d for d in diffs if d not in changed]
        if diffs:
            raise RunError(f"cannot resume {str(run_dir)!r} with a different config ({'; '.join(diffs[:5])}); "
                           f"continue it as it was saved ({ddp.relaunch()} --resume {run_dir}, no overrides; "
                           "with --auto-resume: the run's own config and overrides), change only "
                           f"{', '.join(RESUMABLE)}, or start a new run with another run.out_dir")
        for diff in changed:
            log.info("resuming with %s (%s)", diff, RESUMABLE[diff.split(":")[0]])
        path = ckpt.latest(run_dir)
        if path is None:
            if ddp.env_world()[0] == 0:
                log.warning("no checkpoint in %s yet: starting the run from the beginning", run_dir)
            return run_dir, None
        return run_dir, path
    if check_empty and run_files(run_dir) and not overwrite:
        raise RunError(f"run directory {str(run_dir)!r} is not empty; pass --resume {run_dir} to continue it, "
                       "--overwrite to replace it, or choose another run.out_dir")
    return run_dir, None


def check_out_dir_path(run_dir: Path) -> None:
    """RunError unless run_dir can be a folder: the nearest existing path must be one."""
    for path in (run_dir, *run_dir.parents):
        if path.exists():
            if not path.is_dir():
                raise RunError(f"run.out_dir {str(run_dir)!r} cannot be a run directory: {str(path)!r} is a file, not "
                               "a folder; choose another run.out_dir")
            break


def create_run_dir(cfg: Config, run_dir: Path, *, fresh: bool, lock: RunLock | None = None) -> None:
    """Called once data, stream and model are known to be good: nothing is written or deleted before (but the
    directory and its lock file, which --auto-resume takes at the start).

    `fresh` empties the directory (all but its lock file: deleting a held lock file would let a second
    writer lock a new one). `lock` (rank 0), if not yet held, is taken right after the directory exists.

    Under DDP every rank learns whether rank 0 could prepare the directory, and all stop together if not (with a
    bare barrier, the other ranks waited there for the collective timeout: on other nodes nothing ends them)."""
    failed: Exception | None = None
    if ddp.is_main():
        try:
            _create_run_dir(cfg, run_dir, fresh=fresh, lock=lock)
        except Exception as err:  # noqa: BLE001 - every rank learns of it below, then it is raised
            failed = err
    said = ddp.all_gather_object(None if failed is None else f"{type(failed).__name__}: {failed}")[0]
    if failed is not None:
        raise failed
    if said is not None:
        raise RunError(f"rank 0 could not prepare the run directory {str(run_dir)!r} ({said})")


def _create_run_dir(cfg: Config, run_dir: Path, *, fresh: bool, lock: RunLock | None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    if lock is not None and not lock.locked:  # a new run: prepare_run_dir saw no directory, and held no lock
        lock.acquire()
        if not fresh and run_files(run_dir):  # another run wrote there since: not ours to train over
            lock.release()
            raise RunError(f"run directory {str(run_dir)!r} was written by another run while this one was being "
                           f"built; pass --resume {run_dir} to continue it, --overwrite to replace it, or choose "
                           "another run.out_dir (it is not empty; nothing was changed)")
    for path in remove_stale_temp_files(run_dir) if lock is not None else []:
        log.info("removed %s, left by a writer that was killed mid-write", path.name)
    for path in run_files(run_dir) if fresh else []:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    save_config(cfg, run_dir / "config.yaml")


def setup_logging(run_dir: Path | None) -> logging.Handler | None:
    """Log to stderr and (rank 0) to RUN/train.log; returns the file handler, to be removed after the run."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger().setLevel(logging.INFO if ddp.is_main() else logging.WARNING)
    if run_dir is None or not ddp.is_main():
        return None
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


def train(cfg: Config, *, resume: bool | str = False, overwrite: bool = False, lock_wait: float = 0.0) -> dict:
    """Train and evaluate one run; returns the last evaluation row.

    `resume`: True continues the run in cfg.run.out_dir, "auto" continues it if one is there (its config.yaml),
    else starts it: decided once this process holds the run's lock, so a predecessor that was still writing the
    run is seen as it left it (with "auto" the lock is taken at once, making the directory if there is none yet:
    left empty but for its lock file if the run then stops on a bad input).

    One writer per run directory: rank 0 holds RUN/.lock (runlock.py) for the whole run, taken before anything
    is read from or written to an existing directory (a new one: as soon as it is created); a second writer
    (new run, --resume or --overwrite) gets RunLocked and changes nothing, at once or after waiting `lock_wait`
    seconds for the holder to end. Under DDP every rank continues from the checkpoint rank 0 chose holding the
    lock (agree_on_checkpoint)."""
    if isinstance(resume, str) and resume != "auto":
        raise ValueError(f"resume={resume!r}: pass True, False or 'auto'")
    resume = resume if resume == "auto" else bool(resume)
    if resume == "auto" and overwrite:
        raise RunError("resume='auto' (--auto-resume) continues the run or starts it, and overwrite deletes it: "
                       "pass one of them")
    handlers_before = list(logging.getLogger().handlers)
    run_dir = Path(cfg.run.out_dir)
    lock = RunLock(run_dir, wait=lock_wait) if ddp.env_world()[0] == 0 else None
    joins_group = not ddp.is_dist()  # a group the caller made stays the caller's
    try:
        auto = resume == "auto"
        if auto:
            check_out_dir_path(run_dir)
        if lock is not None and (run_dir.is_dir() or auto):
            try:
                lock.acquire()
            except OSError as err:
                raise RunError(f"cannot take the lock of {str(run_dir)!r} ({err.strerror}): check that folder's "
                               "permissions, or choose another run.out_dir") from None
        if auto:
            resume = (run_dir / "config.yaml").is_file()
            if lock is not None:
                log.info("--auto-resume: %s %s", "continuing the run in" if resume else "no run yet in", run_dir)
        return _train(cfg, resume=resume, overwrite=overwrite, lock=lock, auto=auto)
    finally:  # a run's log file must not collect what later runs in this process log
        if joins_group:
            ddp.leave()
        if lock is not None:
            lock.release()
        for handler in logging.getLogger().handlers:
            if handler not in handlers_before:
                logging.getLogger().removeHandler(handler)
                handler.close()


def _train(cfg: Config, *, resume: bool, overwrite: bool, lock: RunLock | None, auto: bool = False) -> dict:
    from streaming_ssl import allocator, build
    from streaming_ssl.evaluation import plot_run, plot_train, read_rows

    # under --auto-resume another rank than rank 0 decided without the lock: rank 0 decides (agree_on_checkpoint)
    run_dir, path = _prepare_run_dir(cfg, resume=resume, overwrite=overwrite,
                                     check_empty=not (auto and ddp.env_world()[0] != 0))
    device, amp_dtype = build.setup_runtime(cfg)
    resume, state = agree_on_checkpoint(cfg, run_dir, resume=resume, overwrite=overwrite, path=path)
    splits = build.load_train_data(cfg)
    stream = build.stream_from_config(cfg, splits)
    log.info("stream: %s, %d training experiences, %d parent experiences, %d updates of %d images x %d patches",
             cfg.stream.mode, len(stream), len(stream.parent_sizes), stream.n_updates(cfg.train.batch_size),
             cfg.train.batch_size, cfg.augment.n_patches)
    model = build.build_model(cfg, build.model_stem(cfg, splits)).to(device)
    if state is not None:
        ckpt.check_model_matches(state, model, str(run_dir))
    run = build.build_run(cfg, run_dir, device=device, amp_dtype=amp_dtype, splits=splits, stream=stream, model=model)
    if state is not None:
        check_same_training_data(state, run.checkpoint.data, cfg.data.dataset, run_dir)
    create_run_dir(cfg, run_dir, fresh=overwrite and not resume, lock=lock)
    if resume and state is None and ddp.is_main():  # killed before its first checkpoint: its rows are computed again
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # (TrainLog starts train.jsonl afresh at update 0)
    setup_logging(run_dir)
    resumed_after = None if state is None else int(state["position"]["stream_step"])
    run.loggers.extend(build.build_loggers(cfg, run_dir, resumed_after=resumed_after))
    try:
        log.info("run %s on %s (precision %s, world %d, allocator %s)", run_dir, device,
                 provenance.precision_name(amp_dtype),
                 ddp.world_size(), allocator.in_effect(dict(os.environ)))
        if device.type == "cpu":  # speed and bf16 figures compare only within one CPU kind: say which
            log.info("CPU: %s", cpu_kind())
        for line in experience_classes_lines(stream.parent_classes, splits.class_names):
            log.info("%s", line)
        if cfg.train.compile:
            log.info("train.compile: the training forward is compiled (%s) at the first update (and at a new batch "
                     "size)", cfg.train.compile_backend)
        if cfg.augment.compile:
            log.info("augment.compile: the augmentation is compiled (%s) at the first update (and at a new batch "
                     "size)", cfg.train.compile_backend)
        _fit(run, state)
    finally:
        build.close_loggers(run.loggers)
    rows = read_rows(run_dir / "metrics.jsonl") if ddp.is_main() else []
    if ddp.is_main() and cfg.run.plot and rows:
        plot_run(rows, run_dir / "accuracy.png", title=f"{cfg.stream.mode} {splits.name} ({run_dir.name})")
    if ddp.is_main() and cfg.run.plot:  # online: the parent experiences' boundaries (the mini-experiences' are many)
        parent_ends = list(itertools.accumulate(stream.parent_sizes))[:-1] if stream.mode == "online" else None
        plot_train(read_rows(run_dir / "train.jsonl"), run_dir / "train_curves.png",
                   title=f"{cfg.stream.mode} {splits.name} ({run_dir.name}): training", parent_ends=parent_ends)
    if ddp.is_main() and rows:
        atomic_write_text(run_dir / "summary.json", json.dumps(rows[-1], indent=2))
        log.info("done: %s", json.dumps({k: v for k, v in rows[-1].items() if not isinstance(v, list)}))
    return rows[-1] if rows else {}


def record_start(run_dir: Path, device: torch.device, amp_dtype: torch.dtype | None, start_update: int,
                 data: dict | None = None) -> None:
    """Add the row of a start that trains to RUN/run_info.jsonl (provenance.py: every rank's machine; rank 0
    writes), and warn when the training the run holds spans more than one machine kind or precision, or more than
    one version of the code or its libraries. A damaged run_info.jsonl is set aside as run_info.jsonl.damaged (-2,
    -3, ... if that name is taken) and its readable rows are written again before this start's, which counts the
    lines lost. The file is a record, not the run: any failure to write it is a warning on rank 0, and training
    goes on on every rank (the others passed the gather already)."""
    machines = ddp.all_gather_object(provenance.device_kind(device))
    if not ddp.is_main():
        return
    try:
        row = provenance.start_row(device=device, amp_dtype=amp_dtype, start_update=start_update, machines=machines,
                                   data=data)
        kept, problems = provenance.salvage_rows(run_dir)
        if problems:
            damaged = _free_name(run_dir / (provenance.FILE_NAME + ".damaged"))
            os.replace(run_dir / provenance.FILE_NAME, damaged)
            row["lines_lost"] = len(problems)
            log.warning("%s%s; the file is set aside as %s, and %s keeps its %d readable rows with this start's",
                        problems[0], f" (and {len(problems) - 1} more lines)" if len(problems) > 1 else "",
                        damaged.name, provenance.FILE_NAME, len(kept))
        rows = provenance.append_row(run_dir, row, rows=kept)
    except Exception as err:  # noqa: BLE001 - a record that cannot be written must not stop the training
        log.warning("could not record this start in %s (%s: %s); training goes on without it",
                    run_dir / provenance.FILE_NAME, type(err).__name__, err)
        return
    changes = provenance.machine_changes(rows)
    if changes:
        log.warning("this run's training spans more than one machine kind or precision (%s): compare its accuracy "
                    "and speed with no run of a single kind (run_info.jsonl)", "; ".join(changes))
    if code := provenance.code_changes(rows):
        log.warning("this run's training spans more than one version of the code or its libraries (%s): to "
                    "reproduce it, train it again on one (run_info.jsonl)", "; ".join(code))


def data_record(cfg: Config, data: dict) -> dict:
    """What run_info.jsonl keeps of the training data: the dataset as configured, the data folder it was read from
    (None where it needs none, as an npz: source's own path), and the checkpoint's count and digest of the training
    images and labels (build.stream_data)."""
    from scenarios.datasets import DataError, resolve_root

    try:
        root = str(resolve_root(cfg.data.root))
    except DataError:
        root = None
    stream = data.get("stream_data") or {}
    return {"dataset": cfg.data.dataset, "root": root, "training_images": stream.get("images"),
            "digest": stream.get("digest")}


def _free_name(path: Path) -> Path:
    """path, or path-2, path-3, ...: the first that does not exist."""
    n = 1
    while (candidate := path if n == 1 else path.with_name(f"{path.name}-{n}")).exists():
        n += 1
    return candidate


def agree_on_checkpoint(cfg: Config, run_dir: Path, *, resume: bool, overwrite: bool,
                        path: Path | None) -> tuple[bool, dict | None]:
    """(whether the run continues, the checkpoint it continues from or None), loaded: under DDP rank 0's choice.

    Every rank lists the run directory before the process group exists, but rank 0 alone holds the run's lock:
    with --wait-lock it lists the directory only after a predecessor still saving has ended, and another rank may
    have found an older checkpoint, or none, or (--auto-resume) no run. Starting from different updates, the ranks
    would train different batches and hang in their collectives. So every rank takes rank 0's choice: it checks
    the run as rank 0 did (taking the same settings of an older run) and loads rank 0's checkpoint. A rank that
    cannot (the run directory is not on a filesystem it shares with rank 0) stops every rank with the reason."""
    from streaming_ssl.checkpoint import CheckpointError

    mine = (bool(resume), None if path is None else path.name, cfg.augment.blur_kernel)
    chosen = tuple(ddp.all_gather_object(mine)[0])
    cfg.augment.blur_kernel = chosen[2]  # an older run's kernel, taken by whichever ranks saw that run
    own: Exception | None = None
    if chosen != mine:
        log.warning("rank %d found %s in %s, but continues from rank 0's choice, %s (rank 0 chose holding the run's "
                    "lock, after any predecessor had ended)", ddp.rank(), mine[1] or "no checkpoint", run_dir,
                    chosen[1] or "the start")
        if chosen[0] and not resume:  # rank 0 continues a run this rank saw no run in: check it as rank 0 did
            try:
                _prepare_run_dir(cfg, resume=True, overwrite=overwrite)
            except Exception as err:  # noqa: BLE001 - every rank learns of it below
                own = err
    state = None
    if chosen[1] is not None and own is None:
        try:
            state = ckpt.load(run_dir / chosen[1])
        except Exception as err:  # noqa: BLE001 - not only CheckpointError: a rank must not leave the others waiting
            own = err
    failed = [(r, e) for r, e in enumerate(ddp.all_gather_object(None if own is None else
                                                                 f"{type(own).__name__}: {own}")) if e is not None]
    if own is not None:
        raise own
    if failed:
        rank, said = failed[0]
        raise CheckpointError(f"rank {rank} could not continue the run as rank 0 does, from "
                              f"{chosen[1] or 'its start'} ({said}); every rank must read the run directory "
                              f"{str(run_dir)!r} that rank 0 writes (on several nodes: a filesystem they share)")
    return chosen[0], state


def check_same_training_data(state: dict, now: dict, dataset: str, run_dir: Path) -> None:
    """RunError when the training data differs from what the checkpoint's run trained on (build.stream_data; a
    checkpoint written before it was kept is not checked): the resumed run would train on another stream."""
    saved = (state.get("data") or {}).get("stream_data")
    if saved and saved["digest"] != now["stream_data"]["digest"]:
        raise RunError(f"cannot resume {str(run_dir)!r}: its training data {dataset} changed since the run was saved "
                       f"({saved['images']} training images then, {now['stream_data']['images']} now; not the same "
                       "images or labels), and a resumed run must see the stream it started on; restore that data, "
                       "or start a new run with another run.out_dir")


def experience_classes_lines(parent_classes: list[list[int]], class_names: list[str]) -> list[str]:
    """What train.log says of the stream's experiences: the classes of each (the columns of the accuracy matrix),
    with their names where there are few."""
    n_classes = len(class_names)
    if all(sorted(c) == list(range(n_classes)) for c in parent_classes):
        return [f"experiences (accuracy-matrix columns): {len(parent_classes)}, each of all {n_classes} classes"]
    lines = ["experiences (accuracy-matrix columns) and their classes:"]
    for j, classes in enumerate(parent_classes):
        names = f" ({', '.join(class_names[c] for c in classes)})" if len(classes) <= 20 else ""
        lines.append(f"  experience {j}: classes {list(classes)}{names}")
    return lines


def out_of_memory_message(run, err: BaseException) -> str:
    """oom.out_of_memory_message for the run's strategy position, newest checkpoint and settings."""
    cfg, strategy = run.cfg, run.strategy
    evaluating = oom.during_evaluation(err)
    newest = ckpt.latest(run.run_dir)
    return oom.out_of_memory_message(
        err, evaluating=evaluating, device=oom.device_memory(run.device), update=strategy.global_step,
        experience=strategy.stream_step - 1 if evaluating else strategy.stream_step, run_dir=run.run_dir,
        checkpoint_update=None if newest is None else ckpt.step_of(newest), batch_size=cfg.train.batch_size,
        n_patches=cfg.augment.n_patches, replay_batch=cfg.cl.replay.batch if cfg.cl.replay.policy != "none" else 0,
        recompute_stages=cfg.model.recompute_stages, recompute_bn_relu=cfg.model.recompute_bn_relu,
        eval_batch_size=cfg.eval.batch_size, eval_patches=cfg.eval.patches, launch=ddp.relaunch())


def _fit(run, state: dict | None) -> None:
    """Restore (if resuming) and train the strategy over the rest of the stream."""
    from streaming_ssl.plugins import EvaluationInterrupted, Interrupted

    strategy = run.strategy
    evaluator, model = run.checkpoint.evaluator, run.checkpoint.metric.model
    baseline = None
    if state is not None and evaluator.forward_transfer and not state["evaluator"].get("baseline") \
            and state["position"]["stream_step"] < len(run.stream):
        # saved without forward transfer's baseline (eval.forward_transfer turned on for the resume): the model is
        # as built, at its initialisation (the run's seed), until the checkpoint's weights are loaded
        log.info("the checkpoint holds no forward-transfer baseline: probing the model at initialisation (rebuilt "
                 "from the run's seed) before restoring it")
        try:
            baseline = evaluator.evaluate_baseline(model)
        except RuntimeError as err:
            if not oom.is_out_of_memory(err):
                raise
            raise OutOfMemory(out_of_memory_message(run, err)) from err
    if state is not None:
        run.checkpoint.restore(strategy, state)
        if baseline is not None:
            evaluator.baseline = baseline
        log.info("resumed at update %d (experience %d, batch %d)", strategy.global_step, strategy.stream_step,
                 strategy.batch_in_epoch)
    if strategy.stream_step >= len(run.stream):
        log.info("the run is complete (all %d experiences trained): nothing to train; its plot and summary.json are "
                 "written again", len(run.stream))
    try:
        if strategy.stream_step < len(run.stream):  # a start that trains (restored: a resume refused changes nothing)
            record_start(run.run_dir, run.device, run.amp_dtype, strategy.global_step,
                         data_record(run.cfg, run.checkpoint.data))
            strategy.train(itertools.islice(iter(run.stream), strategy.stream_step, None), eval_streams=[])
    except Interrupted as err:
        if ddp.is_main():
            cut = "; the evaluation was cut short and runs again" if isinstance(err, EvaluationInterrupted) else ""
            log.warning("stopped by signal at update %d%s; continue with: %s --resume %s", strategy.global_step, cut,
                        ddp.relaunch(), run.run_dir)
        raise
    except RuntimeError as err:  # torch.OutOfMemoryError is one
        if not oom.is_out_of_memory(err):
            raise
        raise OutOfMemory(out_of_memory_message(run, err)) from err
    finally:
        run.progress.close()
        run.stop.close()
        if run.train_log is not None:
            run.train_log.close()
