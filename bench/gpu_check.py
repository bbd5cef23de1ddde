#!/usr/bin/env python
"""GPU check: everything that needs a CUDA device, in one time-boxed command (issue 17). Not a test.

    bash scripts/gpu_check.sh                          # on the GPU machine (installs .gpu/wheels, then this)
    python bench/gpu_check.py --dry-run                # here: every check on tiny sizes, device cpu

Checks, each step a subprocess with its own timeout inside one overall budget (default 450 s), so a hang
cannot eat the machine's window; tests, e2e, ddp and a warm-up of speed's compiled case (filling inductor's
caches) run side by side (none of them times anything), then speed alone:
  tests    pytest -m cuda tests/test_cuda.py: augmentation, bf16 model, objective, features and probe on CUDA
           against the CPU, NCCL + SyncBatchNorm at world 1 (none may skip on a GPU)
  e2e      Split CIFAR-10 through the real CLI (run_stream.py, configs/smoke.yaml; on CUDA bf16 and
           train.deterministic) writing all outputs; a second run stopped by SIGTERM inside its first
           checkpoint, then --resume: its metrics rows must be complete and agree with the uninterrupted run
           (tolerances below); beside the resume,
           evaluate.py probes the uninterrupted run's checkpoint on the device, and its linear probe must give the
           run's own last probe/acc_all (within the accuracy tolerance)
  ddp      the same run under `torchrun --nproc_per_node 1` with model.sync_bn=true, compared with the plain run
  speed    bench/speed.py --device cuda: reference, ours, model_only, ours_lowmem, ours_compiled at widths
           1/4 and 1, peak CUDA memory per case; the first update's loss of ours_lowmem and ours_compiled (the
           same model on the same patches, recomputed or compiled) within 1% of ours's; its targets are reported
           (fatal only with --strict-targets);
           then, for information, ours_compiled_augment (augment.compile: the augmentation through torch.compile),
           ours_indexed (the augmentation indexing its subsets, one host sync per update), ours_trainlog (the
           training curves logged at every update: `ours` over it is what logging costs), ours_replay and
           ours_minred (MinRed's cost beside a reservoir), ours_fp16 (float16 with its loss scaler, the skip of
           an overflowed update decided on the device: `ours` over it is what float16 costs where bf16 is native
           too) and ours_fp16_hostread (the same, the skip decided on the host by GradScaler, torch's default:
           ours_fp16 over it is what deciding on the device gains)

Writes bench/results/gpu_check.json and the same as Markdown tables in gpu_check.md (a dry run:
runs/gpu_check/gpu_check_dry.{json,md}), prints a table (pass/fail per check), exits 1 if any check fails
and 2 at once when CUDA is not available (unless --dry-run). A second try in the same checkout starts from
clean run directories. `--write-data SRC DST` writes the CIFAR-10 subset of scripts/fetch_gpu_wheels.sh.

Tolerances (plain run vs resumed run, and vs torchrun): the runs share seeds, data order and augmentation
seeds, and on the GPU they train with train.deterministic (deterministic kernels, no timed pick of convolution
algorithms), where a resumed run, and a world-1 NCCL group with SyncBatchNorm (which then normalises as
BatchNorm does), should give the plain run's numbers exactly; the JSON keeps the measured differences, so a
nonzero one is seen even within the tolerances. Those allow for what deterministic mode does not fix (a
collective that sums in another order): final loss within 1% (relative), its coding-rate part within 5%
(relative), invariance within 0.005 (absolute), and the first evaluation's probe and kNN accuracy within 5
points (500 test images: one binomial standard deviation is about 2.2 points). A real defect (wrong batch
statistics, all-gather, lr schedule or resume position) moves the coding rate or the accuracy far more.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "bench" / "results" / "gpu_check.json"
NO_CUDA_EXIT = 2
TOL = {"loss_rel": 0.01, "tcr_rel": 0.05, "inv_abs": 0.005, "acc_abs": 0.05}
SPEED_CASES = ("reference", "ours", "model_only", "ours_lowmem", "ours_compiled")
# cases that train `ours`'s model from the same weights on the same patches (recomputed in backward, compiled): their
# first update's loss is `ours`'s up to kernel rounding (bf16 against fp32 moves it 0.03%); a wrong recomputation or
# compiled graph moves it more
SAME_LOSS_CASES = ("ours_lowmem", "ours_compiled")
FIRST_LOSS_RTOL = 0.01
# measured after those, for information (ours over each: what compiling the augmentation gains, and what masking its
# subsets gains, on the GPU; ours over ours_trainlog: what logging the training curves at every update costs, whose
# values stay on the device until a flush every 50 rows; ours_minred over ours_replay: what MinRed's choice at every
# update costs beside a reservoir); a missing result of these does not fail the check. The dry run leaves out the
# compiled.
INFO_CASES = ("ours_compiled_augment", "ours_indexed", "ours_trainlog", "ours_replay", "ours_minred", "ours_fp16",
              "ours_fp16_hostread")
# what every check's processes import from the carried wheels and the machine's own packages: tried once, before any
# check starts, so that a package missing or at odds with another (the machine's TensorBoard under a carried
# protobuf) ends the check in seconds with its name, not minutes later as "no TensorBoard events" in every run
IMPORTS = ("avalanche.benchmarks", "avalanche.training.plugins", "torch.utils.tensorboard", "scenarios.streams",
           "streaming_ssl.build", "torchvision.transforms", "PIL.Image", "matplotlib")
SMOKE = "configs/smoke.yaml"
# GPU: a few hundred images per class of .gpu/data; 3 experiences (4/3/3 classes) of batch 50: 16 + 12 + 12 updates;
# train.deterministic, so that the plain, resumed and torchrun runs may be compared at all on CUDA: without it,
# cudnn.benchmark's timed pick of kernels and atomic adds in backward let the runs drift apart from the first update
# by an amount nobody has measured (README: exact resume on a GPU needs train.deterministic). The speed step times
# the default path (benchmark on)
# Two CPU threads per run: the host's cores are shared by the tests, three runs, torchrun and two compile warm-ups,
# and with torch's default of a thread per core each their OpenMP threads would wait on one another (the probe
# fits on the CPU)
E2E_GPU = ["data.train_per_class=200", "data.test_per_class=50", "train.batch_size=50", "train.deterministic=true",
           "train.threads=2"]
TESTS_THREADS = "4"  # OMP_NUM_THREADS of the CUDA tests' process on the GPU machine (the dry run's: 1)
DETERMINISTIC_CUBLAS = ":4096:8"  # what train.deterministic sets (streaming_ssl.build.setup_runtime)
# dry run: configs/smoke.yaml at half its images (4 + 3 + 3 updates, still a checkpoint before the stop), one CPU
# thread per run (three runs share the cores: with torch's default of a thread per core each, their OpenMP threads
# wait on one another and the step takes twice as long); train.deterministic as on the GPU
E2E_DRY = ["data.train_per_class=20", "data.test_per_class=10", "eval.probe_epochs=3", "train.threads=1",
           "train.deterministic=true"]
CHECKPOINT_EVERY = {"gpu": 5, "dry": 3}


@dataclass
class Ctx:
    """What every check needs: sizes, device, folders, the overall deadline."""

    dry: bool
    device: str
    precision: str
    data: str
    workdir: Path
    deadline: float
    python: str = sys.executable
    results: dict = field(default_factory=dict)

    def timeout(self, wanted: float) -> float:
        return max(0.0, min(wanted, self.deadline - time.monotonic()))

    def env(self, **extra) -> dict:
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        # the GPU machine has JAX, which avalanche's qpsolvers imports: should anything start a JAX backend, it must
        # not take 75% of the GPU's memory first
        return {**os.environ, "PYTHONPATH": path, "STREAMING_SSL_DATA": self.data, "PYTHONUNBUFFERED": "1",
                "XLA_PYTHON_CLIENT_PREALLOCATE": "false", **extra}


# ------------------------------------------------------------------------------------------ subprocesses
@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    started: float
    ended: list = field(default_factory=list)  # when it exited (a watcher thread notes it: steps run side by side)


def start(name: str, cmd: list[str], ctx: Ctx, **env) -> Proc:
    """Start a step in its own process group (so a timeout also ends torchrun workers and loader workers)."""
    log = ctx.workdir / f"{name}.log"
    with open(log, "wb") as fh:
        popen = subprocess.Popen(cmd, cwd=ROOT, env=ctx.env(**env), stdout=fh, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    proc = Proc(name, popen, log, time.monotonic())
    threading.Thread(target=lambda: (popen.wait(), proc.ended.append(time.monotonic())), daemon=True).start()
    return proc


def finish(proc: Proc, timeout: float) -> dict:
    """Wait up to `timeout` s; on timeout kill the whole process group. Returns rc, seconds, timed_out, tail."""
    timed_out = False
    try:
        rc = proc.popen.wait(timeout=max(timeout, 0.1))
    except subprocess.TimeoutExpired:
        timed_out = True
        kill_group(proc.popen)
        rc = proc.popen.wait()
    text = proc.log.read_text(errors="replace")
    ended = proc.ended[0] if proc.ended else time.monotonic()
    return {"cmd": " ".join(proc.popen.args), "rc": rc, "seconds": round(ended - proc.started, 2),
            "timed_out": timed_out, "log": str(proc.log), "tail": text[-2500:], "output": text}


def kill_group(popen: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal the step's process group and every process below it: torchrun starts its workers in sessions of
    their own (torch elastic's start_new_session), out of the group's reach, and a worker left alive would hold
    the GPU through the steps after it. The descendants are listed before anything is killed (an orphan's parent
    becomes init, and the tree is lost)."""
    below = descendants(popen.pid)
    try:
        os.killpg(popen.pid, sig)
    except ProcessLookupError:
        pass
    for pid in below:
        try:
            if os.getpgid(pid) != popen.pid:  # the group's own are signalled above (their pids may be reused now)
                os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def descendants(pid: int) -> list[int]:
    """The pids below `pid`, children first, from /proc (Linux; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # after the command name, which may hold spaces
        except (OSError, IndexError, ValueError):
            continue  # a process that ended while listed
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(0), [])
        out += below
        todo += below
    return out


def run_step(name: str, cmd: list[str], ctx: Ctx, timeout: float, **env) -> dict:
    return finish(start(name, cmd, ctx, **env), ctx.timeout(timeout))


def public(step: dict) -> dict:
    """A step's record without its full output."""
    return {k: v for k, v in step.items() if k != "output"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ (a) tests
# s for the CUDA tests. The dry run runs them on the CPU beside three CLI runs, torchrun and a warm-up, all on the
# machine's cores: about 60 s alone on 2 cores, 90 s in the dry run, and about 190 s when other work also holds the
# cores (seen: 21 of 27 tests done at 150 s); its limit only guards against a hang. On the GPU they share the
# device and the host with the same steps and include cold Triton compiles: 240 s, since a test step killed while
# working reports nothing, and the first phase ends with its slowest step anyway
TESTS_TIMEOUT = {"gpu": 240, "dry": 360}


def start_tests(ctx: Ctx) -> Proc:
    """The CUDA tests, started alongside the CLI runs: neither measures time, and the GPU has room for both.
    CUBLAS_WORKSPACE_CONFIG is set before the process starts: PyTorch reads it once, at the process's first cuBLAS
    call (an earlier test's), so the deterministic tests could not set it for themselves."""
    return start("tests", [ctx.python, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-rs", "-p",
                           "no:cacheprovider"], ctx, STREAMING_SSL_TEST_DEVICE=ctx.device,
                 CUBLAS_WORKSPACE_CONFIG=DETERMINISTIC_CUBLAS, OMP_NUM_THREADS="1" if ctx.dry else TESTS_THREADS)


def check_tests(ctx: Ctx, proc: Proc) -> dict:
    limit = TESTS_TIMEOUT["dry" if ctx.dry else "gpu"]
    step = finish(proc, ctx.timeout(limit - (time.monotonic() - proc.started)))
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", step["output"])}
    problems = []
    if step["rc"] != 0 or step["timed_out"]:
        problems.append(f"pytest exit {step['rc']}" + (" (timed out)" if step["timed_out"] else ""))
    if not counts.get("passed"):
        problems.append("no test passed")
    if counts.get("skipped") and not ctx.dry:
        problems.append(f"{counts['skipped']} skipped on a CUDA machine")
    return {"ok": not problems, "problems": problems, "counts": counts, "step": public(step)}


# ------------------------------------------------------------------------------------------ (b, c) CLI runs
def cli_overrides(ctx: Ctx, out_dir: Path) -> list[str]:
    sizes = E2E_DRY if ctx.dry else E2E_GPU
    # eval.forward_transfer: the probe of the initialisation (on CUDA under a forked CUDA generator) and its resume
    return ["--config", SMOKE, f"data.root={ctx.data}", f"train.device={ctx.device}",
            f"train.precision={ctx.precision}", "train.log_every=1", "eval.forward_transfer=true",
            f"run.out_dir={out_dir}", *sizes]


def read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def train_rows(run_dir: Path) -> list[dict]:
    """The rows of the run's train.jsonl; a partial last line (a process killed mid-append) is left out."""
    path, rows = run_dir / "train.jsonl", []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def run_starts(run_dir: Path) -> tuple[list[dict], list[str]]:
    """The rows of a stopped-and-resumed run's run_info.jsonl (provenance.py), and what is wrong with them: two
    starts, the first at update 0 and the resume's after it, on one machine kind in one precision."""
    path = run_dir / "run_info.jsonl"
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as err:
        return [], [f"run_info.jsonl unreadable ({err})"]
    starts = [r.get("start_update") for r in rows]
    problems = [] if len(starts) == 2 and starts[0] == 0 and isinstance(starts[1], int) and starts[1] > 0 else [
        f"run_info.jsonl holds starts at updates {starts}, expected 0 and the resume's checkpoint"]
    kinds = {(r.get("machine"), r.get("precision")) for r in rows}
    if len(kinds) > 1:
        problems.append(f"run_info.jsonl names {len(kinds)} machine kinds or precisions for one machine: {kinds}")
    return rows, problems


def last_progress(run_dir: Path) -> dict:
    """Loss, coding rate and invariance of the last update, from the run's training curves (train.log_every=1)."""
    rows = train_rows(run_dir)
    return {key: rows[-1][key] for key in ("loss", "tcr", "inv") if key in rows[-1]} if rows else {}


def run_outputs(run_dir: Path, n_experiences: int) -> list[str]:
    """What is missing or wrong among the outputs every run writes."""
    problems = [f"{name} missing" for name in ("config.yaml", "metrics.jsonl", "summary.json", "accuracy.png",
                                                "train.log", "train.jsonl", "train_curves.png", "run_info.jsonl")
                if not (run_dir / name).is_file()]
    if not list((run_dir / "tb").rglob("events.out.tfevents*")):
        problems.append("no TensorBoard events in tb/")
    if not list(run_dir.glob("ckpt_*.pt")):
        problems.append("no checkpoint")
    experiences = [r.get("experience") for r in read_rows(run_dir)]
    if experiences != list(range(n_experiences)):
        problems.append(f"metrics rows of experiences {experiences}, expected {list(range(n_experiences))}")
    rows, logged = read_rows(run_dir), [r.get("update") for r in train_rows(run_dir)]
    if rows and logged != list(range(1, rows[-1]["updates"] + 1)):  # train.log_every=1: each update once
        problems.append(f"train.jsonl holds updates {logged[:5]}...{logged[-3:]} ({len(logged)} rows), expected "
                        f"1..{rows[-1]['updates']} once each")
    if rows and not isinstance(rows[-1].get("probe/fwt"), float):
        problems.append(f"no forward transfer in the last metrics row (probe/fwt: {rows[-1].get('probe/fwt')!r})")
    return problems


def compare_runs(ref_rows: list[dict], ref_prog: dict, rows: list[dict], prog: dict) -> tuple[dict, list[str]]:
    """Differences between two runs of the same config, and which exceed TOL."""
    diffs, problems = {}, []
    if not (ref_prog and prog):
        return diffs, ["no train.jsonl row with the loss (train.log_every=1) in one of the runs"]
    if not (ref_rows and rows):
        return diffs, ["a run has no metrics rows"]
    diffs["loss_rel"] = abs(prog["loss"] - ref_prog["loss"]) / max(abs(ref_prog["loss"]), 1e-9)
    diffs["tcr_rel"] = abs(prog["tcr"] - ref_prog["tcr"]) / max(abs(ref_prog["tcr"]), 1e-9)
    diffs["inv_abs"] = abs(prog["inv"] - ref_prog["inv"])
    for key in ("probe/acc_all", "knn/acc_all", "probe/init_acc_all"):
        if key in rows[0] and key in ref_rows[0]:
            diffs[f"first_row {key}"] = abs(rows[0][key] - ref_rows[0][key])
    for key in ("samples_seen", "updates"):
        if rows[-1].get(key) != ref_rows[-1].get(key):
            problems.append(f"final {key} {rows[-1].get(key)} != {ref_rows[-1].get(key)}")
    for name, value in diffs.items():
        limit = TOL["acc_abs"] if name.startswith("first_row") else TOL[name]
        if value > limit:
            problems.append(f"{name} differs by {value:.4g} > {limit}")
    return diffs, problems


def stop_after_first_checkpoint(ctx: Ctx, run_dir: Path, timeout: float) -> dict:
    """Start a run with checkpoints every few updates; inside its first checkpoint write (paused there by the
    STREAMING_SSL_TEST_CKPT_* hooks of checkpoint.py) send SIGTERM; the run must save and exit 130."""
    marker = ctx.workdir / "ckpt_marker.txt"
    marker.unlink(missing_ok=True)
    every = CHECKPOINT_EVERY["dry" if ctx.dry else "gpu"]
    proc = start("e2e_interrupted", [ctx.python, "run_stream.py", *cli_overrides(ctx, run_dir),
                                     f"run.checkpoint_every={every}"], ctx,
                 STREAMING_SSL_TEST_CKPT_MARKER=str(marker), STREAMING_SSL_TEST_CKPT_PAUSE="1.5")
    end = time.monotonic() + ctx.timeout(timeout)
    while time.monotonic() < end and proc.popen.poll() is None:
        if marker.is_file() and marker.read_text().strip():
            proc.popen.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    step = finish(proc, end - time.monotonic())
    step["signalled"] = bool(marker.is_file() and marker.read_text().strip())
    return step


def check_e2e(ctx: Ctx, plain: dict) -> dict:
    """Resume check: the SIGTERM-stopped run, then --resume; `plain` is the finished uninterrupted run."""
    problems = [f"plain run: {p}" for p in plain["problems"]]
    resumed_dir = ctx.workdir / "resumed"
    stopped = plain["stopped"]
    rows_at_stop = len(read_rows(resumed_dir))
    if stopped["rc"] != 130 or not stopped["signalled"]:
        problems.append(f"stopped run: exit {stopped['rc']} (expected 130 after SIGTERM), "
                        f"signalled={stopped['signalled']}, timed_out={stopped['timed_out']}")
    n_exp = 3
    if rows_at_stop >= n_exp:
        problems.append("the stopped run had already finished every experience")
    resuming = start("e2e_resume", [ctx.python, "run_stream.py", "--resume", str(resumed_dir)], ctx)
    evaluating = start_evaluate(ctx)  # beside the resume: neither measures time
    resume = finish(resuming, ctx.timeout(120))
    if resume["rc"] != 0:
        problems.append(f"--resume: exit {resume['rc']}" + (" (timed out)" if resume["timed_out"] else ""))
    problems += [f"resumed run: {p}" for p in run_outputs(resumed_dir, n_exp)]
    starts, bad = run_starts(resumed_dir)
    problems += [f"resumed run: {p}" for p in bad]
    diffs, bad = compare_runs(plain["rows"], plain["progress"], read_rows(resumed_dir),
                              last_progress(resumed_dir))
    problems += [f"resumed vs plain: {p}" for p in bad]
    evaluated = check_evaluate(ctx, evaluating, plain["rows"])
    evaluate_step = evaluated.pop("step")
    problems += [f"evaluate.py: {p}" for p in evaluated.pop("problems")]
    where = {k: starts[0].get(k) for k in ("machine", "precision", "versions")} if starts else None
    return {"ok": not problems, "problems": problems, "rows_when_stopped": rows_at_stop, "diffs_vs_plain": diffs,
            "evaluate": evaluated, "run_info": where,
            "steps": {"plain": public(plain["step"]), "stopped": public(stopped), "resume": public(resume),
                      "evaluate": evaluate_step}}


def start_evaluate(ctx: Ctx) -> Proc:
    """evaluate.py on the uninterrupted run's latest checkpoint (on the device: `--device` auto), probing the
    images the run's own evaluations used."""
    sizes = dict(o.split("=", 1) for o in (E2E_DRY if ctx.dry else E2E_GPU))
    (ctx.workdir / "evaluate.json").unlink(missing_ok=True)  # a first try's
    return start("e2e_evaluate", [ctx.python, "evaluate.py", "--checkpoint", str(ctx.workdir / "plain"),
                                  "--train-per-class", sizes["data.train_per_class"],
                                  "--test-per-class", sizes["data.test_per_class"],
                                  "--out", str(ctx.workdir / "evaluate.json")], ctx)


def check_evaluate(ctx: Ctx, proc: Proc, run_rows: list[dict]) -> dict:
    """evaluate.py's linear probe against the run's own last probe/acc_all (the same checkpoint, images, seeds)."""
    out = ctx.workdir / "evaluate.json"
    step = public(finish(proc, ctx.timeout(90)))
    if step["rc"] != 0 or not out.is_file():
        return {"problems": [f"exit {step['rc']}" + (" (timed out)" if step["timed_out"] else "")], "step": step}
    result = json.loads(out.read_text())
    dataset = next(k for k, v in result.items() if isinstance(v, dict) and "linear" in v)
    linear, run_acc = result[dataset]["linear"], (run_rows[-1].get("probe/acc_all") if run_rows else None)
    if run_acc is None:
        return {"problems": ["the run has no probe/acc_all to compare with"], "linear": linear, "step": step}
    diff = abs(linear - run_acc)
    problems = [f"linear {linear:.4f} vs the run's last probe/acc_all {run_acc:.4f}: differs by {diff:.4g} > "
                f"{TOL['acc_abs']}"] if diff > TOL["acc_abs"] else []
    return {"problems": problems, "dataset": dataset, "linear": linear, "run_probe_acc_all": run_acc,
            "diff": diff, "step": step}


def check_ddp(ctx: Ctx, plain: dict, step: dict) -> dict:
    run_dir = ctx.workdir / "torchrun"
    problems = [] if step["rc"] == 0 else [f"torchrun: exit {step['rc']}" + (" (timed out)" if step["timed_out"]
                                                                           else "")]
    problems += [f"torchrun run: {p}" for p in run_outputs(run_dir, 3)]
    diffs, bad = compare_runs(plain["rows"], plain["progress"], read_rows(run_dir), last_progress(run_dir))
    problems += [f"torchrun vs plain: {p}" for p in bad]
    log = (run_dir / "train.log").read_text(errors="replace") if (run_dir / "train.log").is_file() else ""
    world = re.search(r"world (\d+)", log)
    # logged while the model is built, before train.log opens: on the console
    wrapped = re.search(r"DDP over (\w+), world \d+, SyncBatchNorm (on|off)", step["output"])
    want = ("nccl", "on") if ctx.device == "cuda" else ("gloo", "off")  # PyTorch's SyncBatchNorm is CUDA-only
    if not wrapped or wrapped.groups() != want:
        problems.append(f"the torchrun run did not train under DDP over {want[0]} with SyncBatchNorm {want[1]} "
                        f"(its log: {wrapped.group(0) if wrapped else 'no DDP line'})")
    note = ("world 1: under torchrun streaming_ssl.distributed.init_from_env joins a process group even for one "
            "process (NCCL on CUDA), so this run takes the DDP wrapper, SyncBatchNorm and the collectives as at scale")
    return {"ok": not problems, "problems": problems, "diffs_vs_plain": diffs,
            "world": int(world.group(1)) if world else None, "ddp": wrapped.group(0) if wrapped else None,
            "note": note, "step": public(step)}


def launch_cli_runs(ctx: Ctx, torchrun: bool = True) -> dict:
    """The plain run, the run to be stopped, and (for `ddp`) the torchrun run, side by side (the GPU has room)."""
    plain_dir, torchrun_dir = ctx.workdir / "plain", ctx.workdir / "torchrun"
    for run_dir in (plain_dir, torchrun_dir, ctx.workdir / "resumed"):  # a second try on a warm machine starts clean
        shutil.rmtree(run_dir, ignore_errors=True)
    backend_env = {} if ctx.device == "cuda" else {"GLOO_SOCKET_IFNAME": "lo"} if Path("/sys/class/net/lo").exists() \
        else {}
    procs = {"plain": start("e2e_plain", [ctx.python, "run_stream.py", *cli_overrides(ctx, plain_dir)], ctx)}
    if torchrun:
        procs["torchrun"] = start("ddp_torchrun", [ctx.python, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                                                   "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                                                   "run_stream.py", *cli_overrides(ctx, torchrun_dir),
                                                   "model.sync_bn=true"], ctx, **backend_env)
    stopped = stop_after_first_checkpoint(ctx, ctx.workdir / "resumed", 150)
    steps = {name: finish(p, ctx.timeout(150)) for name, p in procs.items()}
    plain = steps["plain"]
    problems = [] if plain["rc"] == 0 else [f"exit {plain['rc']}" + (" (timed out)" if plain["timed_out"] else "")]
    problems += run_outputs(plain_dir, 3)
    return {"plain": {"step": plain, "rows": read_rows(plain_dir), "progress": last_progress(plain_dir),
                      "problems": problems, "stopped": stopped},
            "torchrun": steps.get("torchrun")}


# ------------------------------------------------------------------------------------------ (d) speed
WARMUP_GRACE = 45  # s the compile warm-ups may still run after the first phase, before speed stops them


def start_warmups(ctx: Ctx) -> list[Proc]:
    """The compiling speed case at both widths, run once beside the tests and CLI runs (their timings thrown away):
    its graphs and Triton kernels land in inductor's on-disk caches, so that the measured case loads them instead of
    compiling inside the speed step's time. Two CPU threads and four compile workers each, to leave the cores to the
    CLI runs. The dry run warms `ours` at the tiny size instead (a CPU compile takes minutes): the same plumbing."""
    if ctx.dry:
        plan, args = [("ours", 0.125)], ["--tiny", "--run-device", "cpu", "--threads", "1"]
    else:
        plan, args = [("ours_compiled", w) for w in (0.25, 1.0)], ["--run-device", "cuda", "--threads", "2"]
    return [start(f"warm_{case}_{width}", [ctx.python, "bench/speed.py", "--case", case, "--width", str(width),
                                           *args], ctx, TORCHINDUCTOR_COMPILE_THREADS="4") for case, width in plan]


def finish_warmups(ctx: Ctx, procs: list[Proc]) -> dict:
    """Give the warm-ups up to WARMUP_GRACE s more (nothing else runs now), then stop any left: speed is timed."""
    end = time.monotonic() + ctx.timeout(WARMUP_GRACE)
    steps = {p.name: public(finish(p, end - time.monotonic())) for p in procs}
    return {name: {k: v for k, v in step.items() if k != "tail" or step["rc"]} for name, step in steps.items()}


def check_speed(ctx: Ctx, strict: bool) -> dict:
    out = ctx.workdir / "speed.json"
    out.unlink(missing_ok=True)  # never read an earlier try's figures
    # case-major: the compiling case comes last at both widths, so a slow compile can cost only its own rows
    if ctx.dry:  # in-process tiny sizes on the CPU; no compile (minutes on a CPU)
        args = ["--tiny", "--device", "cpu", "--threads", "1", "--only", ",".join(SPEED_CASES[:-1]), "--order", "case"]
    else:
        args = ["--device", "cuda", "--only", ",".join(SPEED_CASES), "--widths", "0.25,1.0", "--repeats", "1",
                "--allocators", "default", "--timeout", "150", "--order", "case"]
    step = run_step("speed", [ctx.python, "bench/speed.py", *args, "--out", str(out)], ctx, 330)
    result = json.loads(out.read_text()) if out.is_file() else {"rows": [], "summary": {"by_group": {}}}
    problems = [] if step["rc"] == 0 else [f"speed.py exit {step['rc']}" + (" (timed out)" if step["timed_out"]
                                                                           else "")]
    problems += [f"{r['case']} width {r['width']}: {r['error']}" for r in result["rows"] if "error" in r]
    wanted = {(c, w) for c in (SPEED_CASES[:-1] if ctx.dry else SPEED_CASES) for w in ([0.125] if ctx.dry else
                                                                                         [0.25, 1.0])}
    have = {(r["case"], r["width"]) for r in result["rows"] if "error" not in r}
    missing = ("not measured: the time ran out (the speed step's limit or the check's budget)" if step["timed_out"]
               else "no result")
    problems += [f"{c} width {w}: {missing}" for c, w in sorted(wanted - have)]
    if not ctx.dry:
        problems += [f"{r['case']} width {r['width']}: no peak_cuda_MB" for r in result["rows"]
                     if "error" not in r and r.get("peak_cuda_MB") is None]
    first_loss = first_loss_diffs(result["rows"])
    problems += [f"{k}: its first update's loss is {d:.3g} off ours's (relative; more than {FIRST_LOSS_RTOL})"
                 for k, d in first_loss.items() if not d <= FIRST_LOSS_RTOL]  # (nan included)
    targets = speed_targets(result)
    missed = [f"target {t['name']} ({t['group']}): {t['median']:.3g}, wanted {t['op']} {t['target']}"
              for t in targets if t["met"] is False]
    if strict:
        problems += missed
    return {"ok": not problems, "problems": problems, "targets": targets, "targets_missed": missed,
            "first_loss_rel": first_loss,
            "peak_cuda_MB": {f"{r['case']}@{r['width']}": r.get("peak_cuda_MB") for r in result["rows"]},
            "cases": [case_row(r) for r in result["rows"]],
            "speed_json": str(out), "step": public(step), "info": speed_info(ctx, result)}


def first_loss_diffs(rows: list[dict]) -> dict[str, float]:
    """|first-update loss - ours's| / |ours's| for each SAME_LOSS_CASES row, as `case@width` (nan when not finite)."""
    ours = {r["width"]: r.get("first_loss") for r in rows if r["case"] == "ours" and "error" not in r}
    out = {}
    for r in rows:
        ref = ours.get(r["width"])
        if r["case"] in SAME_LOSS_CASES and "error" not in r and ref is not None and r.get("first_loss") is not None:
            out[f"{r['case']}@{r['width']}"] = abs(r["first_loss"] - ref) / max(abs(ref), 1e-12)
    return out


def case_row(row: dict) -> dict:
    """What the report keeps of one speed.py row."""
    keep = ("case", "width", "patches_per_s", "seconds_per_step", "peak_cuda_MB", "peak_cuda_steady_MB", "peak_rss_MB",
            "amp_dtype", "lars_step_ms", "dataloader_workers", "workers_note", "error")
    return {k: row[k] for k in keep if k in row}


def speed_info(ctx: Ctx, result: dict) -> dict:
    """INFO_CASES in a second speed.py run, only in the budget left (never a problem of the check), `ours` over
    each of them per width, ours_minred over ours_replay and ours_fp16 over ours_fp16_hostread."""
    if ctx.timeout(150) < 60:
        return {"skipped": f"{ctx.timeout(150):.0f} s of the budget left"}
    out = ctx.workdir / "speed_info.json"
    out.unlink(missing_ok=True)
    # not in the dry run: compiling takes minutes on the CPU, float16 is emulated there (speed.py's tests run
    # the float16 cases at the tiny size)
    cases = [c for c in INFO_CASES if not (ctx.dry and ("compiled" in c or c.startswith("ours_fp16")))]
    if ctx.dry:
        args = ["--tiny", "--device", "cpu", "--threads", "1"]
    else:
        # case by case, in INFO_CASES' order: a time limit cuts the last cases (float16's), not an earlier one's
        # full-width row
        args = ["--device", "cuda", "--widths", "0.25,1.0", "--repeats", "1", "--allocators", "default",
                "--timeout", "60", "--order", "case"]
    step = run_step("speed_info", [ctx.python, "bench/speed.py", *args, "--only", ",".join(cases), "--out",
                                   str(out)], ctx, 150)
    rows = json.loads(out.read_text())["rows"] if out.is_file() else []
    ours = {r["width"]: r["patches_per_s"] for r in result["rows"] if r["case"] == "ours" and "error" not in r}
    ratios = {f"ours_over_{r['case']}@{r['width']}": ours[r["width"]] / r["patches_per_s"] for r in rows
              if "error" not in r and r["width"] in ours and r.get("patches_per_s")}
    done = {(r["case"], r["width"]): r["patches_per_s"] for r in rows if "error" not in r and r.get("patches_per_s")}
    ratios.update({f"ours_minred_over_ours_replay@{w}": done[("ours_minred", w)] / done[("ours_replay", w)]
                   for c, w in done if c == "ours_minred" and ("ours_replay", w) in done})
    ratios.update({f"ours_fp16_over_ours_fp16_hostread@{w}": done[("ours_fp16", w)] / done[("ours_fp16_hostread", w)]
                   for c, w in done if c == "ours_fp16" and ("ours_fp16_hostread", w) in done})
    return {"ratios": ratios, "errors": [f"{r['case']} width {r['width']}: {r['error']}" for r in rows if "error" in r],
            "patches_per_s": {f"{r['case']}@{r['width']}": r.get("patches_per_s") for r in rows},
            "peak_cuda_MB": {f"{r['case']}@{r['width']}": r.get("peak_cuda_MB") for r in rows}, "step": public(step)}


def speed_targets(result: dict) -> list[dict]:
    names = ("ours_over_reference_patches_per_s", "ours_over_model_only", "peak_cuda_ours_lowmem_over_reference",
             "peak_cuda_steady_ours_lowmem_over_reference",
             "ours_compiled_over_ours", "peak_cuda_ours_over_reference", "lars_loop_over_foreach_step_time")
    out = []
    for group, g in sorted(result["summary"]["by_group"].items()):
        for name in names:
            r = g["ratios"].get(name)
            if r:
                out.append({"group": group, "name": name, "median": r["median"], "target": r.get("target"),
                            "op": r["op"], "met": r.get("met")})
    return out


# ------------------------------------------------------------------------------------------ driver
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="every check on tiny sizes with device cpu (tests this "
                   "script without a GPU)")
    p.add_argument("--only", default="tests,e2e,ddp,speed", help="comma-separated checks to run")
    p.add_argument("--budget", type=float, default=450, help="seconds for all checks together (the machine is "
                   "lent for 15 minutes, start-up included)")
    p.add_argument("--out", default=None, help="JSON result path (default: bench/results/gpu_check.json on CUDA; "
                   "WORKDIR/gpu_check_dry.json in --dry-run, so a dry run never overwrites the GPU's result)")
    p.add_argument("--workdir", default=None, help="run directories and logs (default: runs/gpu_check)")
    p.add_argument("--results-dir", default=None, help="also copy the JSON, the Markdown and a tar.gz of the logs "
                   "there (scripts/gpu_check.sh passes the device tool's $OUT: only what lands there comes back)")
    p.add_argument("--data", default=None, help="folder of cifar10.npz (default: $STREAMING_SSL_DATA, .gpu/data)")
    p.add_argument("--strict-targets", action="store_true", help="a missed speed/memory target fails the check")
    p.add_argument("--preflight", action="store_true", help="only check that CUDA is there (exit 2 if not)")
    p.add_argument("--write-data", nargs=2, metavar=("SRC_NPZ", "DST_NPZ"),
                   help="write the first --train-per-class / --test-per-class images of every class of SRC to DST")
    p.add_argument("--train-per-class", type=int, default=300)
    p.add_argument("--test-per-class", type=int, default=100)
    return p.parse_args(argv)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def write_cifar_subset(src: str | Path, dst: str | Path, train_per_class: int, test_per_class: int) -> dict:
    """The first k images of every class of each split, in the original order, with the same npz keys."""
    import numpy as np

    with np.load(src, allow_pickle=False) as d:
        arrays = {key: d[key] for key in d.files}
    counts = {}
    for split, k in (("train", train_per_class), ("test", test_per_class)):
        y = arrays[f"y_{split}"]
        keep = np.sort(np.concatenate([np.flatnonzero(y == c)[:k] for c in np.unique(y)]))
        arrays[f"x_{split}"], arrays[f"y_{split}"] = arrays[f"x_{split}"][keep], y[keep]
        counts[split] = len(keep)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(dst).with_name(Path(dst).name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(dst)
    return counts


def run_checks(ctx: Ctx, only: list[str], strict: bool) -> dict:
    """The checks of `only`, each with its wall `seconds`. The tests, e2e, ddp and speed's compile warm-ups run side
    by side (e2e and ddp both get their common span); speed runs alone."""
    results: dict = {}
    tests = start_tests(ctx) if "tests" in only else None
    warmups = start_warmups(ctx) if "speed" in only and {"tests", "e2e", "ddp"} & set(only) else []
    if "e2e" in only or "ddp" in only:
        t0 = time.monotonic()
        runs = launch_cli_runs(ctx, torchrun="ddp" in only)
        if "e2e" in only:
            results["e2e"] = check_e2e(ctx, runs["plain"])
        if "ddp" in only:
            results["ddp"] = check_ddp(ctx, runs["plain"], runs["torchrun"])
        for name in ("e2e", "ddp"):
            if name in results:
                results[name]["seconds"] = round(time.monotonic() - t0, 1)
    if tests is not None:
        results["tests"] = check_tests(ctx, tests)
        results["tests"]["seconds"] = results["tests"]["step"]["seconds"]
    if "speed" in only:  # alone on the device
        warmed = finish_warmups(ctx, warmups)
        t0 = time.monotonic()
        results["speed"] = check_speed(ctx, strict)
        results["speed"]["seconds"] = round(time.monotonic() - t0, 1)
        results["speed"]["warmups"] = warmed
    return {name: results[name] for name in ("tests", "e2e", "ddp", "speed") if name in results}


def print_table(results: dict, file=sys.stdout) -> None:
    print(f"\n{'check':<8} {'result':<6} {'seconds':>8}  details", file=file)
    for name, r in results.items():
        seconds = r.get("seconds", "")
        detail = "; ".join(r["problems"]) if r["problems"] else r.get("summary", "")
        print(f"{name:<8} {'pass' if r['ok'] else 'FAIL':<6} {seconds:>8}  {detail}", file=file)
    for t in results.get("speed", {}).get("targets", []):
        met = {True: "met", False: "MISSED", None: "info"}[t["met"]]
        target = f"{t['op']} {t['target']}" if t.get("target") is not None else ""
        print(f"  {t['group']:<28} {t['name']:<40} {t['median']:>8.3g} {target:>8} {met}", file=file)


def summarize(name: str, r: dict) -> str:
    if name == "tests":
        return ", ".join(f"{n} {k}" for k, n in r["counts"].items())
    if name in ("e2e", "ddp"):
        evaluated = r.get("evaluate", {})
        return ", ".join([f"{k} {v:.3g}" for k, v in r["diffs_vs_plain"].items()]
                         + ([f"evaluate.py vs the run {evaluated['diff']:.3g}"] if "diff" in evaluated else []))
    if name == "speed":
        info = ", ".join(f"{k} {v:.3g}" for k, v in r.get("info", {}).get("ratios", {}).items())
        notes = [f"{c['case']}@{c['width']}: {c['workers_note']}" for c in r.get("cases", []) if "workers_note" in c]
        same = ", ".join(f"{k} {v:.2g}" for k, v in r.get("first_loss_rel", {}).items())
        return "; ".join([f"{len(r['peak_cuda_MB'])} cases", f"targets missed: {len(r['targets_missed'])}",
                          *([f"first loss vs ours: {same}"] if same else []), *([info] if info else []), *notes])
    return ""


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.write_data:
        counts = write_cifar_subset(*args.write_data, args.train_per_class, args.test_per_class)
        print(f"wrote {args.write_data[1]}: {counts['train']} train, {counts['test']} test images")
        return 0
    if not args.dry_run and not cuda_available():
        print("gpu_check: no CUDA device visible (torch.cuda.is_available() is False). Run it on the GPU machine "
              "(bash scripts/gpu_check.sh), or --dry-run to test the checks on the CPU.", file=sys.stderr)
        return NO_CUDA_EXIT
    if args.preflight:
        return 0
    only = [c.strip() for c in args.only.split(",") if c.strip()]
    bad = [c for c in only if c not in ("tests", "e2e", "ddp", "speed")]
    if bad:
        raise SystemExit(f"unknown check(s) {bad}; valid: tests, e2e, ddp, speed")
    data = args.data or os.environ.get("STREAMING_SSL_DATA") or str(ROOT / ".gpu" / "data")
    if not (Path(data) / "cifar10.npz").is_file():
        raise SystemExit(f"no cifar10.npz in {data}: run scripts/fetch_gpu_wheels.sh (it writes .gpu/data) or set "
                         "--data / STREAMING_SSL_DATA")
    workdir = Path(args.workdir or ROOT / "runs" / "gpu_check").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(dry=args.dry_run, device="cpu" if args.dry_run else "cuda", precision="bf16",
              data=str(Path(data).resolve()), workdir=workdir, deadline=time.monotonic() + args.budget)
    broken = failed_imports(ctx, IMPORTS)
    if broken:
        print("gpu_check: cannot import what the checks run (nothing was started): " + "; ".join(broken) + ". Carry "
              ".gpu/wheels from scripts/fetch_gpu_wheels.sh and start through scripts/gpu_check.sh (it installs them "
              "into .gpu/site and puts that and the checkout on PYTHONPATH)", file=sys.stderr)
        return 1
    env = environment()
    missing = [what for what, ok in (("Triton", env["triton"]), ("a C compiler", env["c_compiler"]),
                                     ("Python.h", env["python_h"])) if not ok]
    if missing and not args.dry_run:  # said first, so a compile failure further down is not a mystery
        print(f"gpu_check: no {', no '.join(missing)} here: torch.compile on CUDA (Triton builds its launcher with "
              "them) will fail, and with it the compiled test and speed cases", file=sys.stderr)
    t0, written = time.monotonic(), []
    out = Path(args.out) if args.out else RESULT if not args.dry_run else workdir / "gpu_check_dry.json"
    try:
        results = run_checks(ctx, only, args.strict_targets)
        for name, r in results.items():
            r["summary"] = summarize(name, r)
        report = {"mode": "dry-run (cpu, tiny)" if args.dry_run else "cuda", "tolerances": TOL,
                  "seconds": round(time.monotonic() - t0, 1), "budget_seconds": args.budget, "env": env,
                  "checks": results, "ok": all(r["ok"] for r in results.values())}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str))
        out.with_suffix(".md").write_text(markdown(report))
        written += [out, out.with_suffix(".md")]
        print_table(results)
        print(f"\n{'all checks passed' if report['ok'] else 'FAILED'} in {report['seconds']} s; wrote {out} and "
              f"{out.with_suffix('.md').name}")
        return 0 if report["ok"] else 1
    finally:  # the logs also when a check raised
        if args.results_dir:
            try:
                export_results(written, workdir, Path(args.results_dir))
            except OSError as err:  # the report stays in the checkout; the exit code stays the checks'
                print(f"gpu_check: could not copy the results to {args.results_dir}: {err}", file=sys.stderr)


def export_results(reports: list[Path], workdir: Path, dest: Path) -> list[Path]:
    """Copy the reports this call wrote (never an earlier try's) and one tar.gz of the logs and small run files of
    `workdir` (no checkpoints, no events) to `dest`. On the GPU machine only what lands in the device tool's $OUT
    comes back, 8 files at most."""
    import tarfile

    dest.mkdir(parents=True, exist_ok=True)
    copied = [dest / path.name for path in reports]
    for path, copy in zip(reports, copied):
        if not copy.exists() or not copy.samefile(path):  # --out may already point into dest
            shutil.copy2(path, copy)
    logs = dest / "gpu_check_logs.tar.gz"
    with tarfile.open(logs, "w:gz") as tar:
        for path in sorted(workdir.rglob("*")):
            if path.is_file() and path.suffix in (".log", ".json", ".jsonl", ".yaml", ".txt", ".md"):
                tar.add(path, arcname=str(path.relative_to(workdir)))
    return [*copied, logs]


def markdown(report: dict) -> str:
    """The report as Markdown tables (next to the JSON, as bench/results/gpu_check.md), for bench/README.md."""
    env = report["env"]
    where = env.get("gpu") or f"CPU, {env['cores']} cores"
    lines = [f"# GPU check: {report['mode']}, {'all checks passed' if report['ok'] else 'FAILED'}", "",
             f"{where}; Python {env['python']}, torch {env['torch']}, CUDA {env['cuda']}, Triton "
             f"{'yes' if env.get('triton') else 'no'}; {report['seconds']} s of "
             f"a {report['budget_seconds']:.0f} s budget.", "", "| check | result | seconds | details |",
             "| --- | --- | --- | --- |"]
    for name, r in report["checks"].items():
        detail = "; ".join(r["problems"]) if r["problems"] else r.get("summary", "")
        lines.append(f"| {name} | {'pass' if r['ok'] else 'FAIL'} | {r.get('seconds', '')} | {detail} |")
    speed = report["checks"].get("speed")
    if speed:
        memory = "peak CUDA MB: case (measured steps)" if report["mode"] == "cuda" else "peak RSS MB"
        lines += ["", f"| case | width | patches/s | s/step | {memory} | autocast |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for c in speed.get("cases", []):
            if "error" in c:
                lines.append(f"| {c['case']} | {c['width']} | error: {c['error']} | | | |")
                continue
            mem = c.get("peak_cuda_MB") if report["mode"] == "cuda" else c.get("peak_rss_MB")
            mem = "" if mem is None else f"{mem:.0f}"
            if c.get("peak_cuda_steady_MB") is not None:
                mem += f" ({c['peak_cuda_steady_MB']:.0f})"
            lines.append(f"| {c['case']} | {c['width']} | {c['patches_per_s']:.0f} | {c['seconds_per_step']:.4f} | "
                         f"{mem} | {c.get('amp_dtype', '')} |")
        lines += ["", "| group | ratio | median | target | met |", "| --- | --- | --- | --- | --- |"]
        for t in speed["targets"]:
            target = f"{t['op']} {t['target']}" if t.get("target") is not None else ""
            met = {True: "yes", False: "**no**", None: "(information)"}[t["met"]]
            group = t["group"].replace("|", ", ")  # cpu|width=0.25|default: no table cells inside a cell
            lines.append(f"| {group} | {t['name']} | {t['median']:.3g} | {target} | {met} |")
        for name, value in speed.get("info", {}).get("ratios", {}).items():
            lines.append(f"| | {name} | {value:.3g} | | (information) |")
    return "\n".join(lines) + "\n"


def failed_imports(ctx: Ctx, modules) -> list[str]:
    """'module: the error' for each of `modules` that does not import in a process started as every step is (the
    same Python, environment and working directory)."""
    code = ("import importlib, sys\nfor m in sys.argv[1:]:\n    try:\n        importlib.import_module(m)\n"
            "    except Exception as e:\n        print(f'{m}: {type(e).__name__}: {e}', flush=True)")
    try:
        r = subprocess.run([ctx.python, "-c", code, *modules], cwd=ROOT, env=ctx.env(), capture_output=True,
                           text=True, timeout=ctx.timeout(120))
    except subprocess.TimeoutExpired:
        return [f"importing {', '.join(modules)} took over 120 s"]
    failed = [line for line in r.stdout.splitlines() if line.strip()]
    return failed or ([f"{ctx.python} exit {r.returncode}: {r.stderr.strip()[-500:]}"] if r.returncode else [])


def package_versions(names=("numpy", "avalanche-lib", "tensorboard", "protobuf", "torchvision", "triton")) -> dict:
    """The installed distributions' versions (None where absent): what a failure on the GPU machine depends on."""
    from importlib import metadata

    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment() -> dict:
    import platform
    import sysconfig

    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cores": os.cpu_count(), "c_compiler": shutil.which("gcc") or shutil.which("clang") or shutil.which("cc"),
           "python_h": (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file(),
           # DataLoader workers hand batches over through it (the reference's 16 PIL workers: about 0.8 GB in flight)
           "dev_shm_MB": shutil.disk_usage("/dev/shm").total // 2**20 if os.path.isdir("/dev/shm") else None}
    try:  # what torch.compile needs on CUDA: without Triton every compiled case fails for this reason alone
        from torch.utils._triton import has_triton
        env["triton"] = bool(has_triton())
    except ImportError:
        env["triton"] = None
    env["packages"] = package_versions()
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cudnn"] = torch.backends.cudnn.version()
    return env


if __name__ == "__main__":
    sys.exit(main())
