"""Distributed training on CPU: DDP with gloo over 127.0.0.1, in spawned processes and under torchrun.

* one spawn of 2 ranks checks that the sharded objective (differentiable all-gather of the patch blocks)
  gives the loss and, after DDP's averaging, the parameter gradients of one process holding the whole
  global batch (also for uneven shares), that sharded feature extraction equals one process's, and that the
  coalesced averaging of gradients outside DDP (the CaSSLe predictor's) gives every rank the mean;
* `torchrun --nproc_per_node 2` and a 2-"node" static launch (two torchrun agents on 127.0.0.1) of
  run_stream.py on a slice of the real CIFAR-10 write what a 1-process run writes (rank 0 only), and the
  logged evaluations are those of the checkpointed model;
* in the spawned launch, run_stream.py's training whose rank 1 alone gets SIGTERM stops every rank after the same
  update, and resumes to exactly what the uninterrupted torchrun launch writes.
* a third launch trains EMPSSLStrategy on a stream whose experiences end with a batch of one image, so that rank 1
  holds no image in those updates: it still joins every collective, and the run is one process's (also with
  CaSSLe's term, whose mean over no patch must not make the loss NaN).

Every process uses 1 thread; the launches run concurrently, so the file takes about a minute on 2 cores
(most of it is interpreter start-up: importing torch/avalanche in 8 processes).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = os.environ.get("STREAMING_SSL_DATA")
needs_data = pytest.mark.skipif(not DATA or not (Path(DATA) / "cifar10.npz").is_file(),
                                reason="needs the real CIFAR-10: set STREAMING_SSL_DATA to the folder of cifar10.npz")

WORLD = 2
N_PATCHES = 3
MODEL_KW = {"width": 0.125, "feature_dim": 32, "proj_hidden_dim": 32, "proj_dim": 32}
GRAD_CASES = {"even_B8": 8, "uneven_B7": 7, "one_image_B1": 1}  # global batch B of each case
SHARES = {"even_B8": [(0, 4), (4, 8)], "uneven_B7": [(0, 4), (4, 7)], "one_image_B1": [(0, 1), (1, 1)]}
N_FEATURES = 13  # not divisible by the world size
FEATURE_BATCH = 4  # several extraction batches per rank
EVAL_PATCHES = 4
# parameters outside DDP whose gradients average_grads_ averages: two float32 (one without a gradient), one float64
AVG_PARAMS = [((5, 3), torch.float32), ((3,), torch.float32), ((4,), torch.float32), ((2, 2), torch.float64)]
TIMEOUT = 240  # seconds before a hung launch is killed (a deadlock must fail, not hang the suite)

# Tiny stream: 3 experiences of 40/30/30 images, batch 20 -> 2+2+2 updates, evaluated after each.
STREAM_OVERRIDES = ["train.threads=1", "train.precision=fp32", "data.train_per_class=10", "data.test_per_class=5",
                    "eval.probe_epochs=2", "run.tensorboard=false", "run.plot=false", "eval.forward_transfer=true"]
PROGRESS_KEYS = ("experience", "parent_experience", "samples_seen", "updates")


def free_ports(k: int) -> list[int]:
    """k distinct free TCP ports on 127.0.0.1 (all bound at once, then released)."""
    socks = []
    try:
        for _ in range(k):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def launch_env() -> dict:
    env = dict(os.environ)
    path = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=path)
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's peer-to-peer connections on loopback too
    return env


def small_model():
    from streaming_ssl.models import EMPSSLModel

    return EMPSSLModel(**MODEL_KW)


def local_share(patches: torch.Tensor, n: int, lo: int, hi: int) -> torch.Tensor:
    """Images [lo, hi) of a patch-major (n*B, C, H, W) batch, still patch-major: (n*(hi-lo), C, H, W)."""
    blocks = patches.view(n, patches.shape[0] // n, *patches.shape[1:])
    return blocks[:, lo:hi].reshape(-1, *patches.shape[1:])


# ------------------------------------------------------------------------------------------ spawned ranks
def _rank_main(workdir: Path) -> None:
    """One rank under torchrun: DDP loss/gradients for every case, then sharded feature extraction -> rank<r>.pt."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from streaming_ssl import distributed as ddp
    from streaming_ssl.augment import MultiPatchAugment
    from streaming_ssl.objective import emp_ssl_loss
    from streaming_ssl.probe import extract_features

    # avalanche (imported by the training below) makes a logger at import time, which it refuses in a non-main rank
    # once a group exists: import it first, as run_stream.py does
    import streaming_ssl.plugins  # noqa: F401
    import streaming_ssl.runner  # noqa: F401

    torch.set_num_threads(1)
    assert ddp.init_from_env("cpu") and dist.get_backend() == "gloo"
    rank, world = ddp.rank(), ddp.world_size()
    try:
        inputs = torch.load(workdir / "inputs.pt", weights_only=True)
        out: dict = {"grad": {}}
        for name, patches in inputs["patches"].items():
            model = small_model()
            model.load_state_dict(inputs["state"])
            # BatchNorm in eval mode: in train mode each rank would normalise with the statistics of its own
            # share (SyncBatchNorm is CUDA-only in PyTorch, so run_stream.py does not use it on CPU) and the
            # result could not equal one process's.
            model.eval()
            net = DDP(model)
            lo, hi = ddp.shard_bounds(patches.shape[0] // N_PATCHES, rank, world)
            _, z = net(local_share(patches, N_PATCHES, lo, hi))
            loss, _ = emp_ssl_loss(z, N_PATCHES, gather=ddp.gather_patch_blocks)
            loss.backward()
            out["grad"][name] = {"share": (lo, hi), "loss": loss.detach(),
                                 "grads": {k: p.grad.detach().clone() for k, p in model.named_parameters()}}
            # the same with every rank's share given (no exchange of the sizes), as EMPSSLStrategy does
            sizes = ddp.share_sizes([patches.shape[0] // N_PATCHES])
            with torch.no_grad():
                _, z = net(local_share(patches, N_PATCHES, lo, hi))
                known, _ = emp_ssl_loss(z, N_PATCHES, gather=functools.partial(ddp.gather_patch_blocks, sizes=sizes))
            out["grad"][name]["loss_sizes_given"] = known.detach()
            try:  # sizes that do not match this rank's share are refused
                ddp.gather_patch_blocks(z.view(N_PATCHES, -1, z.shape[1]), sizes=[s + 1 for s in sizes])
            except ValueError as e:
                out["grad"][name]["wrong_sizes"] = str(e)
        model = small_model()
        model.load_state_dict(inputs["state"])
        model.train()  # extract_features must switch to eval mode itself and restore this
        augment = MultiPatchAugment(N_PATCHES, 32)
        out["features"] = extract_features(model, inputs["images"], augment, device=torch.device("cpu"),
                                           batch_size=FEATURE_BATCH, channels_last=True, seed=3)
        out["features_patches"] = extract_features(model, inputs["images"], augment, device=torch.device("cpu"),
                                                   batch_size=FEATURE_BATCH, patches=EVAL_PATCHES,
                                                   channels_last=True, seed=3)
        out["still_training"] = model.training
        # coalesced gradient averaging (the CaSSLe predictor's): rank r's gradients are its inputs' slice r
        params = [torch.nn.Parameter(torch.zeros(shape, dtype=dtype)) for shape, dtype in AVG_PARAMS]
        for p, g in zip(params, inputs["avg_grads"]):
            p.grad = None if g is None else g[rank].clone()
        calls = []  # a spy on torch's all_reduce: what average_grads_ really issues
        real = dist.all_reduce
        dist.all_reduce = lambda t, *a, **k: (calls.append(str(t.dtype)), real(t, *a, **k))[1]
        try:
            out["avg_returned"] = ddp.average_grads_(params)
        finally:
            dist.all_reduce = real
        out["avg_calls"], out["avg_grads"] = calls, [p.grad for p in params]
        if DATA and (Path(DATA) / "cifar10.npz").is_file():
            out["stop"] = _stop_and_resume(workdir / "stopped", rank)
        torch.save(out, workdir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _stop_and_resume(run_dir: Path, rank: int) -> dict:
    """run_stream.py's training (runner.train) of the tiny stream in this rank of the group; SIGTERM reaches rank 1
    alone, once the checkpoint of update 2 exists; then every rank resumes the run (run_stream.py --resume)."""
    import threading

    from streaming_ssl import checkpoint as ckpt
    from streaming_ssl import distributed as ddp
    from streaming_ssl.config import load_config
    from streaming_ssl.plugins import Interrupted
    from streaming_ssl.runner import train

    cfg = load_config(ROOT / "configs/smoke.yaml", [f"run.out_dir={run_dir}", *STREAM_OVERRIDES,
                                                    "run.checkpoint_every=1"])
    if rank == 1:
        def signal_me() -> None:
            while not (run_dir / "ckpt_000000002.pt").exists():
                time.sleep(0.005)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=signal_me, daemon=True).start()
    try:
        train(cfg)
        stopped = "not stopped"
    except Interrupted as err:
        stopped = str(err)
    ddp.barrier()  # rank 0 has written the stop's checkpoint
    newest = ckpt.latest(run_dir).name
    last = train(load_config(run_dir / "config.yaml"), resume=True)
    return {"stopped": stopped, "stop_checkpoint": newest, "last_row": last}


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> dict:
    """Inputs, the per-rank outputs of one 2-rank torchrun of this file, and the same computations here."""
    workdir = tmp_path_factory.mktemp("spawn")
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    state = small_model().state_dict()
    patches = {name: torch.randn(N_PATCHES * b, 3, 32, 32, generator=gen) for name, b in GRAD_CASES.items()}
    images = torch.randint(0, 256, (N_FEATURES, 3, 32, 32), generator=gen, dtype=torch.uint8)
    avg_grads = [None if i == 2 else torch.randn(WORLD, *shape, generator=gen).to(dtype)
                 for i, (shape, dtype) in enumerate(AVG_PARAMS)]
    torch.save({"state": state, "patches": patches, "images": images, "avg_grads": avg_grads}, workdir / "inputs.pt")

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr",
           "127.0.0.1", "--master_port", str(free_ports(1)[0]), __file__, str(workdir)]
    with open(workdir / "torchrun.log", "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=launch_env(), stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    rc = _wait({"spawn": proc}, time.monotonic() + TIMEOUT)["spawn"]
    assert rc == 0, (workdir / "torchrun.log").read_text(errors="replace")[-3000:]
    ranks = [torch.load(workdir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    # the same computations in this process, without any process group
    from streaming_ssl.augment import MultiPatchAugment
    from streaming_ssl.objective import emp_ssl_loss
    from streaming_ssl.probe import extract_features

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref: dict = {"grad": {}}
        for name, p in patches.items():
            model = small_model()
            model.load_state_dict(state)
            model.eval()
            _, z = model(p)
            loss, _ = emp_ssl_loss(z, N_PATCHES)
            loss.backward()
            ref["grad"][name] = {"loss": loss.detach(), "grads": {k: q.grad.detach().clone()
                                                                  for k, q in model.named_parameters()}}
        model = small_model()
        model.load_state_dict(state)
        augment = MultiPatchAugment(N_PATCHES, 32)
        ref["features"] = extract_features(model, images, augment, device=torch.device("cpu"),
                                           batch_size=FEATURE_BATCH, channels_last=True, seed=3)
        ref["features_patches"] = extract_features(model, images, augment, device=torch.device("cpu"),
                                                   batch_size=FEATURE_BATCH, patches=EVAL_PATCHES,
                                                   channels_last=True, seed=3)
    finally:
        torch.set_num_threads(threads)
    return {"ranks": ranks, "ref": ref, "workdir": workdir, "avg_grads": avg_grads}


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_ddp_gradients_equal_one_process_on_the_global_batch(spawned, case: str) -> None:
    assert [tuple(spawned["ranks"][r]["grad"][case]["share"]) for r in range(WORLD)] == SHARES[case]
    ref = spawned["ref"]["grad"][case]
    assert torch.isfinite(ref["loss"])
    for r in range(WORLD):
        got = spawned["ranks"][r]["grad"][case]
        assert float(got["loss"]) == pytest.approx(float(ref["loss"]), rel=1e-5), f"loss on rank {r}"
        assert got["grads"].keys() == ref["grads"].keys()
        assert float(got["loss_sizes_given"]) == pytest.approx(float(ref["loss"]), rel=1e-5), f"rank {r}, sizes given"
        assert f"rank {r} holds {SHARES[case][r][1] - SHARES[case][r][0]} images" in got["wrong_sizes"]
        for name, g_ref in ref["grads"].items():
            g = got["grads"][name]
            err = float((g - g_ref).norm())
            scale = float(g_ref.norm())
            assert err <= 1e-5 * scale + 1e-9, f"rank {r}, {name}: |diff| {err:.3g} vs |grad| {scale:.3g}"
    # the check is not vacuous: the gradients are far from zero and DDP really averaged (ranks agree exactly)
    assert sum(float(g.norm()) for g in ref["grads"].values()) > 1e-3
    for name in ref["grads"]:
        assert torch.equal(spawned["ranks"][0]["grad"][case]["grads"][name], spawned["ranks"][1]["grad"][case]["grads"][name])


def test_average_grads_gives_every_rank_the_mean_with_one_collective_per_dtype(spawned) -> None:
    for r in range(WORLD):
        got = spawned["ranks"][r]
        assert sorted(got["avg_calls"]) == ["torch.float32", "torch.float64"], \
            f"rank {r}: one all-reduce for the float32 gradients and one for the float64, not {got['avg_calls']}"
        assert got["avg_returned"] == 2
        for i, (g, given) in enumerate(zip(got["avg_grads"], spawned["avg_grads"])):
            if given is None:
                assert g is None, f"parameter {i} had no gradient and must keep none"
                continue
            assert g.dtype == given.dtype and g.shape == given.shape[1:], f"rank {r}, parameter {i}"
            # two summands: the sum is exact in any order, so the mean is bitwise that of one process
            assert torch.equal(g, (given[0] + given[1]) / WORLD), f"rank {r}, parameter {i}"
    assert not torch.equal(spawned["avg_grads"][0][0], spawned["avg_grads"][0][1])  # the ranks did differ


def test_extract_features_sharded_equals_one_process(spawned) -> None:
    ref = spawned["ref"]["features"]
    assert ref.shape == (N_FEATURES, MODEL_KW["feature_dim"])
    for r in range(WORLD):
        got = spawned["ranks"][r]["features"]
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)  # same rows in the same order
        assert spawned["ranks"][r]["still_training"], "extract_features must restore the training mode"
    # not a trivially ordered input: rows differ from one another
    assert float((ref[1:] - ref[:-1]).abs().max()) > 1e-3


def test_extract_features_with_patches_sharded_equals_one_process(spawned) -> None:
    ref = spawned["ref"]["features_patches"]
    for r in range(WORLD):
        torch.testing.assert_close(spawned["ranks"][r]["features_patches"], ref, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ a rank without images
TAIL_BATCH = 7  # experiences of 22 images: batches of 7, 7, 7 and 1 (rank 0 holds the one image, rank 1 none)
TAIL_CASES = ("plain", "distill", "pfr")  # pfr: the distillation of h (cl.distill.space=h)


def _train_tail(case: str) -> dict:
    """A tiny run whose experiences end with a one-image batch (under DDP when the group exists)."""
    from avalanche.core import SupervisedPlugin

    from streaming_ssl.cl import DistillPlugin
    from streaming_ssl.lars import LARS
    from streaming_ssl.strategy import EMPSSLStrategy
    from tests.streaming_ssl.cl.tiny import TinyNoBN, ddp_run_parts

    torch.manual_seed(0)
    model = TinyNoBN()
    plugins = {"distill": [DistillPlugin(model, dim=16, hidden_dim=8, every=2)],
               "pfr": [DistillPlugin(model, dim=32, hidden_dim=8, every=2, space="h")]}.get(case, [])
    groups, train_model, augment, stream = ddp_run_parts(model, plugins, 11)
    losses: list[float] = []

    class Losses(SupervisedPlugin):
        def after_backward(self, strategy, **kwargs) -> None:
            losses.append(float(strategy.loss.detach()))

    strategy = EMPSSLStrategy(model=train_model, optimizer=LARS(groups, lr=0.3), augment=augment, n_patches=2,
                              batch_size=TAIL_BATCH, total_updates=stream.n_updates(TAIL_BATCH), device="cpu",
                              channels_last=False, plugins=[*plugins, Losses()])
    strategy.train(list(stream), eval_streams=[])
    return {"model": model.state_dict(), "counters": strategy.counters.state_dict(), "losses": losses,
            "updates": strategy.global_step}


def _tail_main(workdir: Path) -> None:
    """One rank of the `tail_runs` launch -> tail<r>.pt."""
    import torch.distributed as dist

    from streaming_ssl import distributed as ddp

    import streaming_ssl.cl  # noqa: F401 - Avalanche refuses to be imported first in a non-main rank
    import streaming_ssl.strategy  # noqa: F401

    torch.set_num_threads(1)
    assert ddp.init_from_env("cpu") and dist.get_backend() == "gloo"
    try:
        torch.save({case: _train_tail(case) for case in TAIL_CASES}, workdir / f"tail{ddp.rank()}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def tail_runs(tmp_path_factory) -> dict:
    workdir = tmp_path_factory.mktemp("tail")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr",
           "127.0.0.1", "--master_port", str(free_ports(1)[0]), __file__, str(workdir), "tail"]
    with open(workdir / "torchrun.log", "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=launch_env(), stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = {case: _train_tail(case) for case in TAIL_CASES}
    finally:
        torch.set_num_threads(threads)
    rc = _wait({"tail": proc}, time.monotonic() + TIMEOUT)["tail"]
    assert rc == 0, (workdir / "torchrun.log").read_text(errors="replace")[-3000:]
    return {"single": single, "ranks": [torch.load(workdir / f"tail{r}.pt", weights_only=True) for r in range(WORLD)]}


def test_a_batch_smaller_than_the_world_leaves_a_rank_empty_and_trains_as_one_process(tail_runs) -> None:
    one, ranks = tail_runs["single"]["plain"], [r["plain"] for r in tail_runs["ranks"]]
    assert one["updates"] == 8 and one["counters"]["stream_images"] == 44
    for r in range(WORLD):
        assert ranks[r]["counters"] == one["counters"], f"rank {r}"
        assert ranks[r]["losses"] == pytest.approx(one["losses"], rel=1e-4), f"rank {r}"
    for name, w in one["model"].items():  # float32 rounding of the all-reduce's order (see test_cl_end_to_end)
        torch.testing.assert_close(ranks[0]["model"][name], w, rtol=1e-4, atol=1e-4 * float(w.abs().max()))
        assert torch.equal(ranks[0]["model"][name], ranks[1]["model"][name])


@pytest.mark.parametrize("case", ["distill", "pfr"])
def test_distillation_on_a_rank_without_images_adds_nothing_and_stays_finite(tail_runs, case: str) -> None:
    """The predictor's BatchNorm normalises each rank's own patches on gloo, so the weights are not one process's
    here; the losses are finite, the ranks agree, and the counters are one process's (of z, CaSSLe, and of h, PFR)."""
    one, ranks = tail_runs["single"][case], [r[case] for r in tail_runs["ranks"]]
    assert one["counters"]["frozen_forwards"] > 0
    for r in range(WORLD):
        assert ranks[r]["counters"] == one["counters"], f"rank {r}"
        assert len(ranks[r]["losses"]) == 8 and all(math.isfinite(v) for v in ranks[r]["losses"]), f"rank {r}"
    for name, w in ranks[0]["model"].items():
        assert torch.equal(w, ranks[1]["model"][name]), name


# ------------------------------------------------------------------------------------------ torchrun launches
def _torchrun(args: list[str], out_dir: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", *args, "--master_addr", "127.0.0.1",
           "run_stream.py", "--config", "configs/smoke.yaml", f"run.out_dir={out_dir}", *STREAM_OVERRIDES]
    with open(log, "wb") as fh:
        return subprocess.Popen(cmd, cwd=ROOT, env=launch_env(), stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _kill(procs: dict[str, subprocess.Popen]) -> None:
    """Stop the launches still running (each is its own session: its workers go too)."""
    for q in procs.values():
        if q.poll() is None:
            os.killpg(q.pid, signal.SIGKILL)
            q.wait()


def _wait(procs: dict[str, subprocess.Popen], deadline: float) -> dict[str, int]:
    codes = {}
    try:
        for name, p in procs.items():
            try:
                codes[name] = p.wait(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                pytest.fail(f"launch {name} did not finish within {TIMEOUT} s")
    finally:
        _kill(procs)
    return codes


@pytest.fixture(scope="module")
def stream_runs(tmp_path_factory) -> dict:
    """The tiny stream: 1 process (here), torchrun 2 processes, and 2 'nodes' x 1 process, all at once."""
    base = tmp_path_factory.mktemp("ddp_runs")
    dirs = {"single": base / "single", "two_procs": base / "two_procs", "two_nodes": base / "two_nodes"}
    port_procs, port_nodes = free_ports(2)
    procs = {
        "two_procs": _torchrun(["--nproc_per_node", "2", "--master_port", str(port_procs)], dirs["two_procs"],
                               base / "two_procs.log"),
        **{f"node{k}": _torchrun(["--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(k),
                                  "--master_port", str(port_nodes)], dirs["two_nodes"], base / f"node{k}.log")
           for k in range(2)},
    }
    deadline = time.monotonic() + TIMEOUT
    import streaming_ssl.cli.train as run_stream

    threads = torch.get_num_threads()
    try:
        single_rc = run_stream.main(["--config", "configs/smoke.yaml", f"run.out_dir={dirs['single']}",
                                     *STREAM_OVERRIDES])
        codes = _wait(procs, deadline)
    finally:
        torch.set_num_threads(threads)
        _kill(procs)
    logs = {name: (base / f"{name}.log").read_text(errors="replace")[-3000:] for name in procs}
    return {"dirs": dirs, "single_rc": single_rc, "codes": codes, "logs": logs}


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _check_same_layout(rows: list[dict], expected: list[dict]) -> None:
    assert len(rows) == len(expected) == 3
    for got, want in zip(rows, expected):
        assert list(got) == list(want)
        assert {k: got[k] for k in PROGRESS_KEYS} == {k: want[k] for k in PROGRESS_KEYS}
        assert all(0 <= got[k] <= 1 for k in ("probe/acc_all", "knn/acc_all"))
    assert [r["samples_seen"] for r in rows] == [40, 70, 100] and rows[-1]["updates"] == 6


_SPLITS: dict = {}


def _reevaluate(ckpt_path: Path) -> dict:
    """probe/acc_all and knn/acc_all of a checkpoint, recomputed in this one process as run_stream.py does."""
    from streaming_ssl.build import build_augment, build_model, load_splits, per_class_subset, probe_kwargs, probe_set
    from streaming_ssl import checkpoint as ckpt
    from streaming_ssl.config import config_from_dict
    from streaming_ssl.evaluation import StreamEvaluator

    state = ckpt.load(ckpt_path)
    cfg = config_from_dict(state["config"])
    key = (cfg.data.dataset, cfg.data.train_per_class, cfg.data.test_per_class)
    if key not in _SPLITS:
        splits = load_splits(cfg)
        splits.train = per_class_subset(splits.train, cfg.data.train_per_class)
        splits.test = per_class_subset(splits.test, cfg.data.test_per_class)
        _SPLITS[key] = splits
    splits = _SPLITS[key]
    model = build_model(cfg, "cifar").to(memory_format=torch.channels_last)
    model.load_state_dict(state["model"])
    # one parent experience holding every class: acc_seen is acc_all, nothing depends on the history
    evaluator = StreamEvaluator(in_domain=probe_set(cfg, splits), transfer=[], parent_classes=[list(range(10))],
                                augment=build_augment(cfg, splits), device=torch.device("cpu"), channels_last=True,
                                patches=cfg.eval.patches, batch_size=cfg.eval.batch_size, knn_k=cfg.eval.knn_k,
                                knn_temperature=cfg.eval.knn_temperature, probe_kwargs=probe_kwargs(cfg),
                                seed=cfg.train.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        row = evaluator.evaluate(model, 1)
    finally:
        torch.set_num_threads(threads)
    return {k: row[k] for k in ("probe/acc_all", "knn/acc_all")}


def _check_checkpoints(run_dir: Path, rows: list[dict], world: int, reevaluate: tuple[int, ...]) -> None:
    from streaming_ssl import checkpoint as ckpt

    paths = ckpt.list_checkpoints(run_dir)
    assert [p.name for p in paths] == [f"ckpt_{r['updates']:09d}.pt" for r in rows]  # one per evaluation
    assert ckpt.latest(run_dir) == paths[-1] and (run_dir / "ckpt.pt").resolve() == paths[-1].resolve()
    for i, (path, row) in enumerate(zip(paths, rows)):
        state = ckpt.load(path)
        assert state["position"]["samples_seen"] == row["samples_seen"]
        assert state["position"]["global_step"] == row["updates"]
        assert len(state["aug_generator"]) == world  # every rank's augmentation generator
        assert state["metrics_rows"] == row["experience"] + 1
        if i in reevaluate:  # the logged evaluation is that of the checkpointed model (all ranks evaluated it)
            again = _reevaluate(path)
            assert again == {k: row[k] for k in again}, f"{path.name}: logged {row} but the checkpoint gives {again}"


@needs_data
def test_two_process_torchrun_writes_what_one_process_writes(stream_runs) -> None:
    assert stream_runs["single_rc"] == 0
    assert stream_runs["codes"]["two_procs"] == 0, stream_runs["logs"]["two_procs"]
    single, two = stream_runs["dirs"]["single"], stream_runs["dirs"]["two_procs"]
    expected = _rows(single)
    rows = _rows(two)
    _check_same_layout(rows, expected)
    # forward transfer's baseline: the initialisation (the same weights on every rank) probed by all ranks together,
    # once, as one process probes it (features computed in shards differ from one process's by float rounding)
    assert rows[0]["probe/fwt"] is None and rows[-1]["probe/fwt"] is not None
    assert abs(rows[0]["probe/init_acc_all"] - expected[0]["probe/init_acc_all"]) <= 0.1
    assert all(r["probe/init_acc_matrix_row"] == rows[0]["probe/init_acc_matrix_row"] for r in rows)
    assert (two / "train.log").read_text().count("forward transfer's baseline") == 1
    # rank 0 alone writes: the same files as one process, one metrics row per evaluation, one log
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in single.iterdir())
    assert json.loads((two / "summary.json").read_text()) == rows[-1]
    from streaming_ssl import provenance

    (start,) = provenance.read_rows(two)  # every rank's machine, gathered; written once
    assert (start["world_size"], start["machines"], start["precision"]) == (2, {start["machine"]: 2}, "fp32")
    train_log = (two / "train.log").read_text()
    # torchrun's workers re-executed themselves with the CPU allocator setting (same pid, so torchrun still tracks them)
    assert train_log.count("(precision fp32, world 2, allocator tuned)") == 1 and train_log.count("INFO done:") == 1
    # 1 process: the re-evaluation reproduces the logged numbers exactly (the check itself is sound) ...
    _check_checkpoints(single, expected, world=1, reevaluate=(2,))
    # ... and so it must under DDP: without SyncBatchNorm the ranks' BatchNorm running statistics differ after
    # the last update, and the probes read features each rank computed for its share of the images
    _check_checkpoints(two, rows, world=2, reevaluate=(0, 1, 2))
    # the checkpoints fit the model of the config (and two processes trained the same architecture)
    from streaming_ssl import checkpoint as ckpt

    s1, s2 = ckpt.load(ckpt.latest(single))["model"], ckpt.load(ckpt.latest(two))["model"]
    assert {k: v.shape for k, v in s1.items()} == {k: v.shape for k, v in s2.items()}


@needs_data
def test_two_node_static_launch_on_loopback(stream_runs) -> None:
    for k in range(2):
        assert stream_runs["codes"][f"node{k}"] == 0, stream_runs["logs"][f"node{k}"]
    run_dir = stream_runs["dirs"]["two_nodes"]
    rows = _rows(run_dir)
    single = stream_runs["dirs"]["single"]
    _check_same_layout(rows, _rows(single))
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(p.name for p in single.iterdir())  # rank 0 only
    assert (run_dir / "train.log").read_text().count("(precision fp32, world 2, allocator tuned)") == 1
    _check_checkpoints(run_dir, rows, world=2, reevaluate=())


@needs_data
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_update_and_resumes_exactly(spawned,
                                                                                         stream_runs) -> None:
    """SIGTERM that reaches rank 1 alone (ranks see a signal at different updates; a rank that stopped alone left
    the other in its next collective): both ranks stop after the same update and its checkpoint is written, and
    the resumed run (run_stream.py's training in the `spawned` launch, _stop_and_resume) ends with the very rows
    and weights of the uninterrupted two-process torchrun of stream_runs."""
    from streaming_ssl import checkpoint as ckpt

    got = [spawned["ranks"][r]["stop"] for r in range(WORLD)]
    updates = [int(re.fullmatch(r"stopped by (signal 15|a signal to another rank) at update (\d+)", g["stopped"])[2])
               for g in got]
    assert got[1]["stopped"].startswith("stopped by signal 15") and "another rank" in got[0]["stopped"]
    assert updates[0] == updates[1] and 2 <= updates[0] < 6, updates  # the same update, before the end
    assert got[1]["stop_checkpoint"] == f"ckpt_{updates[0]:09d}.pt"

    def without_time(rows):
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]

    run_dir, full = spawned["workdir"] / "stopped", stream_runs["dirs"]["two_procs"]
    said = (spawned["workdir"] / "torchrun.log").read_text(errors="replace")
    assert said.count(f"stopped by signal at update {updates[0]}; continue with: the same torchrun command with "
                      f"run_stream.py --resume {run_dir}") == 1  # rank 0 says it
    assert without_time(_rows(run_dir)) == without_time(_rows(full))
    assert without_time([got[0]["last_row"]]) == without_time(_rows(full)[-1:])
    a, b = ckpt.load(ckpt.latest(full))["model"], ckpt.load(ckpt.latest(run_dir))["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@needs_data
def test_every_rank_continues_the_run_rank_0_finds_after_waiting_for_the_lock(stream_runs, tmp_path) -> None:
    """--auto-resume --wait-lock under torchrun, while a predecessor still holds the run (a process holding its lock
    for 15 s, which moves the run's config.yaml and a newer checkpoint into it before letting go, as a job still
    saving does): rank 1 lists the directory at once and finds no run (so it would start one, and would refuse the
    directory as not empty), rank 0 lists it holding the lock and finds the run and the newer checkpoint. Every
    rank continues from rank 0's choice, and the run ends with the rows and weights of the uninterrupted launch.
    Before, each rank went on with what it had found and they could not finish."""
    import shutil

    from streaming_ssl import checkpoint as ckpt
    from tests.conftest import lock_held_elsewhere

    full, run_dir, aside = stream_runs["dirs"]["two_procs"], tmp_path / "run", tmp_path / "aside"
    shutil.copytree(full, run_dir, symlinks=True)
    aside.mkdir()
    first, newer, last = ckpt.list_checkpoints(run_dir)
    for path in (newer, last, run_dir / "config.yaml"):
        path.rename(aside / path.name)
    (run_dir / "ckpt.pt").unlink()
    # the holder lets go once rank 1 has listed the directory (it is joining the group) and rank 0 waits for the lock
    log = tmp_path / "launch.log"
    log.write_text("")
    then = ("said = ''\nwhile 'rank 1 of 2: joining' not in said or 'waiting up to 120 s for the lock' not in said:\n"
            "    time.sleep(0.1)\n    said = open(sys.argv[2]).read()\n"
            "for src in sys.argv[3:]:\n    shutil.move(src, sys.argv[1])")
    with lock_held_elsewhere(run_dir, 0, then, log, aside / newer.name, aside / "config.yaml") as holder, \
            open(log, "w") as fh:
        launch = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--master_addr", "127.0.0.1",
                                   "--nproc_per_node", "2", "--master_port", str(free_ports(1)[0]), "run_stream.py",
                                   "--config", "configs/smoke.yaml", f"run.out_dir={run_dir}", *STREAM_OVERRIDES,
                                   "--auto-resume", "--wait-lock", "120"], cwd=ROOT, env=launch_env(), stdout=fh,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = launch.wait(TIMEOUT)
        finally:
            _kill({"launch": launch})
        assert holder.wait(10) == 0
    out = log.read_text(errors="replace")
    assert rc == 0, out[-3000:]
    assert f"rank 1 found no checkpoint in {run_dir}, but continues from rank 0's choice, {newer.name}" in out, \
        out[-3000:]
    assert f"--auto-resume: continuing the run in {run_dir}" in out
    assert f"resumed at update {ckpt.step_of(newer)}" in (run_dir / "train.log").read_text()

    def without_time(rows):
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]

    assert without_time(_rows(run_dir)) == without_time(_rows(full))
    a, b = ckpt.load(ckpt.latest(full))["model"], ckpt.load(ckpt.latest(run_dir))["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ run directory
def test_overwrite_deletes_only_once_the_inputs_are_good(tmp_path, monkeypatch) -> None:
    """prepare_run_dir (before the process group exists, on every rank) never deletes; create_run_dir,
    called after data, stream and model are built and the group exists, deletes on rank 0 only."""
    from streaming_ssl.config import load_config
    from streaming_ssl.runner import create_run_dir, prepare_run_dir

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "old.txt").write_text("x")
    cfg = load_config(ROOT / "configs/smoke.yaml", [f"run.out_dir={run_dir}"])
    for rank in ("1", "0"):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", rank)
        assert prepare_run_dir(cfg, overwrite=True) == (run_dir, None)
        assert (run_dir / "old.txt").exists()
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    create_run_dir(cfg, run_dir, fresh=True)  # outside DDP this process is rank 0
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]


def _launch(args: list[str], timeout: float, **kwargs) -> tuple[int | None, str]:
    """torchrun ARGS in its own session; (exit code, output), or (None, output) when it ran past `timeout`: then the
    whole launch is killed (a hang must fail the test, not wait for the collective timeout)."""
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--master_addr", "127.0.0.1", *args],
                            cwd=ROOT, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kwargs)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return None, proc.communicate()[0]


def test_a_run_directory_rank_0_refuses_stops_every_rank(tmp_path) -> None:
    """Rank 0 alone prepares the run directory; when it refuses (here: another run wrote there while this one was
    built), the other ranks get the reason at once and stop with it, instead of waiting in a barrier."""
    run_dir = tmp_path / "run"
    script = tmp_path / "prepare.py"
    script.write_text(
        "import sys\nfrom pathlib import Path\nsys.path.insert(0, sys.argv[1])\n"
        "from streaming_ssl import distributed as d\nfrom streaming_ssl.config import load_config\n"
        "from streaming_ssl.runlock import RunLock\nfrom streaming_ssl.runner import create_run_dir\n"
        "d.init_from_env('cpu')\nrun_dir = Path(sys.argv[2])\n"
        "cfg = load_config(Path(sys.argv[1]) / 'configs/smoke.yaml', [f'run.out_dir={run_dir}'])\n"
        "if d.rank() == 0:\n    run_dir.mkdir()\n    (run_dir / 'other.txt').write_text('x')\n"
        "try:\n    create_run_dir(cfg, run_dir, fresh=False, lock=RunLock(run_dir) if d.rank() == 0 else None)\n"
        "    print(f'rank{d.rank()} created', flush=True)\n"
        "except Exception as err:\n    print(f'rank{d.rank()} {type(err).__name__}: {err}', flush=True)\n"
        "d.leave()\n")
    rc, out = _launch(["--nproc_per_node", "2", "--master_port", str(free_ports(1)[0]), str(script), str(ROOT),
                       str(run_dir)], timeout=120)
    assert rc == 0, out[-3000:]
    assert f"rank0 RunError: run directory {str(run_dir)!r} was written by another run" in out, out[-3000:]
    assert (f"rank1 RunError: rank 0 could not prepare the run directory {str(run_dir)!r} (RunError: run directory "
            f"{str(run_dir)!r} was written by another run") in out, out[-3000:]
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "other.txt"]  # nothing written


@needs_data
def test_a_checkpoint_rank_0_cannot_write_stops_every_rank_with_the_fix(tmp_path) -> None:
    """A real short write on rank 0 (the launch's file-size limit: the smoke model's checkpoint is about 1.8 MB):
    both ranks stop after the same update with exit 2 and the fix, rank 1 told by rank 0 (no barrier left waiting),
    and the run holds no partial checkpoint."""
    import resource

    def file_size_limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))

    run_dir = tmp_path / "run"
    rc, out = _launch(["--nproc_per_node", "2", "--master_port", str(free_ports(1)[0]), "run_stream.py", "--config",
                       "configs/smoke.yaml", f"run.out_dir={run_dir}", f"data.root={Path(DATA).resolve()}",
                       *STREAM_OVERRIDES], timeout=240, preexec_fn=file_size_limit)
    assert rc not in (None, 0), out[-3000:]
    fix = f"free disk space (or move run.out_dir), then the same torchrun command with run_stream.py --resume {run_dir}"
    errors = [line for line in out.splitlines() if "CheckpointWriteError" in line]
    assert any("could not write a checkpoint into" in e and "MB free there" in e and e.endswith(fix) for e in errors), \
        out[-3000:]
    assert any(f"rank 0 could not write a checkpoint into {str(run_dir)!r}" in e and e.endswith(fix) for e in errors), \
        out[-3000:]
    # the first write (before the first evaluation) failed: no checkpoint, no row
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "config.yaml", "log.txt", "run_info.jsonl",
                                                         "train.log"]


@needs_data
def test_a_non_finite_state_on_one_rank_stops_every_rank_and_saves_nothing(tmp_path) -> None:
    """Some training state is one rank's own (MinRed's stored features live on rank 0): here rank 1 alone holds a
    NaN momentum buffer when the first checkpoint is due. Both ranks stop before saving, rank 1 naming the tensor
    and rank 0 pointing at the other rank's log, and no checkpoint is written."""
    script = tmp_path / "nan_on_rank1.py"
    script.write_text(
        "import sys\nsys.path.insert(0, sys.argv[1])\nimport torch\n"
        "from streaming_ssl import distributed as d\nfrom streaming_ssl.strategy import EMPSSLStrategy\n"
        "check = EMPSSLStrategy.check_finite\n"
        "def check_finite(self):  # called right before a checkpoint's state is read\n"
        "    check(self)\n"
        "    if d.rank() == 1:\n"
        "        for state in self.optimizer.state.values():\n"
        "            for t in state.values():\n"
        "                if torch.is_tensor(t) and t.is_floating_point() and t.dim():\n"
        "                    t.fill_(float('nan'))\n"
        "EMPSSLStrategy.check_finite = check_finite\n"
        "from streaming_ssl.cli import train\nsys.exit(train.main(sys.argv[2:]))\n")
    run_dir = tmp_path / "run"
    rc, out = _launch(["--nproc_per_node", "2", "--master_port", str(free_ports(1)[0]), str(script), str(ROOT),
                       "--config", "configs/smoke.yaml", f"run.out_dir={run_dir}",
                       f"data.root={Path(DATA).resolve()}", *STREAM_OVERRIDES], timeout=240)
    assert rc not in (None, 0), out[-3000:]
    errors = [line for line in out.splitlines() if "NonFiniteLossError: the training state became non-finite" in line]
    assert any(re.search(r"\(first: optimizer\.\S+\)", e) for e in errors), out[-3000:]
    assert any("the training state of another rank than rank 0 cannot be saved at update" in line
               for line in out.splitlines()), out[-3000:]
    assert not list(run_dir.glob("ckpt*")), sorted(p.name for p in run_dir.iterdir())

if __name__ == "__main__":  # a rank of the `spawned` (or, with "tail", the `tail_runs`) fixture's torchrun launch
    # avalanche-lib installs a package named `tests`, which would shadow this folder here (pytest maps it itself)
    sys.modules["tests"] = types.ModuleType("tests")
    sys.modules["tests"].__path__ = [str(ROOT / "tests")]
    if sys.argv[2:] == ["tail"]:
        _tail_main(Path(sys.argv[1]))
    else:
        _rank_main(Path(sys.argv[1]))


def test_torchrun_with_one_process_makes_a_group(tmp_path) -> None:
    """torchrun --nproc_per_node 1 joins a (one-process) group, so DDP, SyncBatchNorm and NCCL run as at scale;
    a plain process does not."""
    script = tmp_path / "probe_group.py"
    script.write_text("import sys; sys.path.insert(0, sys.argv[1])\n"
                      "from streaming_ssl import distributed as d\n"
                      "print('group', d.init_from_env('cpu'), d.is_dist(), d.world_size())\n")
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                               "--master_port", str(free_ports(1)[0]), str(script), str(ROOT)],
                              capture_output=True, text=True, timeout=120)
    assert "group True True 1" in launched.stdout, launched.stderr[-2000:]
    plain = subprocess.run([sys.executable, str(script), str(ROOT)], capture_output=True, text=True, timeout=120)
    assert "group False False 1" in plain.stdout, plain.stderr[-2000:]
