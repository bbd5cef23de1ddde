"""Continual-learning methods end to end: exact resume through the CLI, and DDP (gloo on CPU) equals one process.

* run_stream.py with replay, CaSSLe distillation and mixup on, SIGKILLed in the middle of the 2nd experience
  (after the first frozen copy) and resumed, ends bitwise equal to an uninterrupted run: weights, optimizer,
  buffer, generators, predictor, frozen copy, counters and every metrics row.
* one torchrun launch of this file (2 ranks) trains a tiny stream with replay (reservoir, then MinRed) on an
  uneven global batch; every rank holds the buffer one process holds, the replay batches split across ranks
  are those of one process, and the weights equal one process's. A BatchNorm-free model and a deterministic
  augmentation make one process and two comparable; a third run (replay + distillation + mixup) checks that
  the ranks keep identical predictors and buffers.
"""

from __future__ import annotations

import json
import math
import os
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
TIMEOUT = 240

# 3 experiences of 80/60/60 images, batch 20: 4 + 3 + 3 = 10 updates; checkpoints at 3, 4, 6, 7, 9, 10
CL_ARGS = ["cl.replay.policy=reservoir", "cl.replay.size=50", "cl.replay.batch=10", "cl.distill.enabled=true",
           "cl.distill.hidden_dim=32", "cl.mixup.enabled=true"]
RUN_ARGS = ["train.deterministic=true", "train.threads=1", "data.train_per_class=20", "data.test_per_class=5",
            "eval.probe_epochs=2", "run.checkpoint_every=3", "run.keep_last=50", "run.tensorboard=false",
            "run.plot=false", "train.log_every=1", *CL_ARGS]


def _cmd(run_dir: Path, extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, str(ROOT / "run_stream.py"), "--config", str(ROOT / "configs/smoke.yaml"),
            f"run.out_dir={run_dir}", f"data.root={Path(DATA or '.').resolve()}", *RUN_ARGS, *extra]


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def _assert_equal(a, b, where: str = "") -> None:
    """Nested dicts/lists of tensors and plain values, bitwise."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


def _kill_and_resume(zygote, tmp_path: Path, extra: tuple[str, ...] = ()) -> tuple[Path, dict]:
    """A full run and one SIGKILLed after its 6th update's checkpoint then resumed: (the full run's directory,
    the killed run's checkpoint state before resuming); asserts the two end bitwise equal. The three are training
    processes forked by the session's helper (tests/zygote.py: the CLI without a cold start of its imports)."""
    from streaming_ssl import checkpoint as ckpt

    full, killed = tmp_path / "full", tmp_path / "killed"
    logs = {name: tmp_path / f"{name}.log" for name in ("full", "killed", "resume")}
    ref = zygote.start(_cmd(full, extra)[2:], logs["full"])
    pid = zygote.start(_cmd(killed, extra)[2:], logs["killed"])
    deadline = time.time() + TIMEOUT
    try:
        while time.time() < deadline and not (killed / "ckpt_000000006.pt").exists():
            assert zygote.running(pid), "the run ended before it could be killed:\n" + logs["killed"].read_text()[-3000:]
            time.sleep(0.01)
    finally:
        zygote.kill(pid)
    assert zygote.wait(pid, TIMEOUT) == -signal.SIGKILL
    assert zygote.wait(ref, TIMEOUT) == 0, logs["full"].read_text(errors="replace")[-3000:]
    state = ckpt.load(ckpt.latest(killed))
    pos = state["position"]
    assert 6 <= pos["global_step"] < 10, "killed too late: the run had finished"
    assert state["plugins"]["cl.distill"]["frozen"] is not None  # resumed with a frozen copy ...
    assert 0 < len(state["plugins"]["cl.replay"]["buffer"]["images"]) <= 50  # ... and a buffer

    rc = zygote.run(["--resume", str(killed)], logs["resume"], TIMEOUT)
    err = logs["resume"].read_text(errors="replace")
    assert rc == 0, err[-3000:]
    assert f"resumed at update {pos['global_step']}" in err

    rows = _rows(full)
    assert _rows(killed) == rows and len(rows) == 3
    assert rows[-1]["compute/buffer_images"] > 0 and rows[-1]["compute/frozen_forwards"] > 0
    a, b = ckpt.load(ckpt.latest(full)), ckpt.load(ckpt.latest(killed))
    for key in ("position", "model", "optimizer", "counters", "plugins"):
        _assert_equal(a[key], b[key], key)
    assert set(a["plugins"]) == {"cl.replay", "cl.distill", "cl.mixup", "train_log"}
    # the training curves too, each update once, with the distillation term once there is a frozen model
    curves = [[json.loads(line) for line in (d / "train.jsonl").read_text().splitlines()] for d in (full, killed)]
    assert curves[0] == curves[1] and [r["update"] for r in curves[0]] == list(range(1, 11))
    assert [("distill" in r) for r in curves[0]] == [r["experience"] > 0 for r in curves[0]]
    assert a["plugins"]["cl.replay"]["buffer"]["seen"] == 200
    return full, state


@needs_data
def test_sigkill_with_minred_stored_features_then_resume_is_exact(zygote, tmp_path: Path) -> None:
    _, state = _kill_and_resume(zygote, tmp_path, ("cl.replay.policy=minred", "cl.replay.minred_refresh=stored"))
    replay = state["plugins"]["cl.replay"]
    assert len(replay["features"]) == len(replay["buffer"]["images"]) > 0  # resumed with the stored features


@needs_data
def test_sigkill_with_replay_distill_and_mixup_then_resume_is_exact(zygote, tmp_path: Path) -> None:
    full, _ = _kill_and_resume(zygote, tmp_path)

    # bench/buffer_classes.py reads the label-free buffer's classes back: every image is a training image
    out = tmp_path / "buffer_classes.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "buffer_classes.py"), str(full), "--data", str(DATA),
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr[-3000:]
    buffers = json.loads(out.read_text())["runs"][str(full)]["buffers"]
    hist = buffers["cl.replay/buffer/images"]
    assert hist["images"] == 50 and hist["unmatched"] == 0 and sum(hist["per_class"]) == 50
    assert hist["classes_at_least_10pct_of_uniform"] >= 2 and hist["largest_share"] < 1
    assert sum(hist["per_experience"]) == 50 and len(hist["per_experience"]) == 3  # the split of the run's config
    assert hist["share_current_experience"] == hist["per_experience"][2] / 50

    # bench/minred_buffer.py on the same checkpoint (its model rebuilt by load_checkpoint_model; the optimizer state
    # holds the distillation predictor's groups too): every analysis runs and adds up
    out = tmp_path / "minred_buffer.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "minred_buffer.py"), str(full), "--data", str(DATA),
                          "--per-class", "6", "--keep", "30", "--draws", "1", "--simulate", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())["runs"][str(full)]
    assert r["pool"] == 60 and r["current_experience"] == 2 and r["updates"] == 10
    for w in ("z", "h"):
        e = r["features"][w]
        assert sum(e["kept_per_class"]) == 30 == sum(e["kept_per_experience"])
        assert all(-1 <= s <= 1 for s in e["nn_similarity_per_class"])
        m = r["one_update"]["mean"][w]
        assert 0 <= m["drop_agreement_after_update"] <= 1 and 0 <= m["drop_agreement_float32"] <= 1
        assert m["before"]["fresh_dropped"] + m["before"]["replayed_dropped"] <= 10
    assert all(torch.isfinite(torch.tensor(r["one_update"]["losses"])))
    sim = r["stream_fixed_features"]
    assert sim["size"] == 50 and sim["batch"] == 20
    for key in ("reservoir", "random", "minred_z", "minred_h"):
        assert [sum(h) for h in sim[key]] == [50, 50, 50], key
    assert out.with_suffix(".png").stat().st_size > 0


# ------------------------------------------------------------------------------------------ DDP
WORLD = 2
GLOBAL_BATCH = 7  # uneven shares (4 + 3), and a last batch of 3 (2 + 1) in each experience of 24
REPLAY = {"size": 10, "batch": 3}  # uneven replay shares too (2 + 1)


def _train(case: str) -> dict:
    """One tiny run of `case` in this process (under DDP when the group exists); what the test compares."""
    from avalanche.core import SupervisedPlugin

    from streaming_ssl import distributed as ddp
    from streaming_ssl.cl import DistillPlugin, MixupPlugin, ReplayBufferPlugin
    from streaming_ssl.lars import LARS
    from streaming_ssl.strategy import EMPSSLStrategy
    from tests.streaming_ssl.cl.tiny import TinyNoBN, ddp_run_parts

    fp16 = case.endswith("_fp16")  # float16 autocast with loss scaling, from a scale at which distillation overflows
    case = case.removesuffix("_fp16")
    torch.manual_seed(0)
    model = TinyNoBN()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    replay = ReplayBufferPlugin(policy="reservoir" if case in ("reservoir", "all") else "minred",
                                minred_refresh="stored" if case == "minred_stored" else "all", seed=5, **REPLAY)
    plugins: list = [replay]
    if case == "all":
        torch.manual_seed(ddp.rank())  # each rank builds another predictor: the plugin starts all from rank 0's
        plugins = [MixupPlugin(replay, alpha=0.4, seed=5), replay,
                   DistillPlugin(model, dim=16, hidden_dim=8, every=2)]
        torch.manual_seed(1)

    class Appended(SupervisedPlugin):
        def __init__(self) -> None:
            super().__init__()
            self.images: list[torch.Tensor] = []
            self.shares: list[tuple[list[int] | None, int]] = []

        def after_forward(self, strategy, **kwargs) -> None:
            self.images.append(strategy.mb_x[len(replay.stream_images):].clone())
            self.shares.append((strategy.rank_shares(), len(strategy.mb_x)))  # (every rank's, this rank's)

    appended = Appended()
    groups, train_model, augment, stream = ddp_run_parts(model, plugins, 12)
    # float16 steps LARS's multi-tensor path, CUDA's, which skips an overflowed update on the device
    optimizer = LARS(groups, lr=0.3, foreach=True if fp16 else None)
    strategy = EMPSSLStrategy(model=train_model, optimizer=optimizer, augment=augment, n_patches=2,
                              batch_size=GLOBAL_BATCH, total_updates=stream.n_updates(GLOBAL_BATCH), device="cpu",
                              channels_last=False, plugins=[*plugins, appended],
                              amp_dtype=torch.float16 if fp16 else None, fp16_init_scale=2.0 ** 12)
    strategy.train(list(stream), eval_streams=[])
    out = {"initial": initial, "model": model.state_dict(), "buffer": replay.buffer.contents().clone(),
           "appended": appended.images, "counters": strategy.counters.state_dict(), "shares": appended.shares}
    if case == "all":
        out["predictor"] = {k: v.detach().clone() for k, v in plugins[2].predictor.named_parameters()}
    if fp16:
        out["scaler"] = strategy.grad_scaler.state_dict()
    return out


def _rank_main(workdir: Path) -> None:
    import torch.distributed as dist

    from streaming_ssl import distributed as ddp

    import streaming_ssl.cl  # noqa: F401 - Avalanche refuses to be imported first in a non-main rank
    import streaming_ssl.strategy  # noqa: F401

    torch.set_num_threads(1)
    assert ddp.init_from_env("cpu") and dist.get_backend() == "gloo"
    try:
        out = {case: _train(case) for case in ("reservoir", "minred", "minred_stored", "all", "all_fp16")}
        torch.save(out, workdir / f"rank{ddp.rank()}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> dict:
    workdir = tmp_path_factory.mktemp("cl_ddp")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr",
           "127.0.0.1", "--master_port", str(port), __file__, str(workdir)]
    with open(workdir / "torchrun.log", "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = {case: _train(case) for case in ("reservoir", "minred", "minred_stored")}
        rc = proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the 2-rank launch did not finish within {TIMEOUT} s")
    finally:
        torch.set_num_threads(threads)
        if proc.poll() is None:  # its own session: the workers go too
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert rc == 0, (workdir / "torchrun.log").read_text(errors="replace")[-3000:]
    ranks = [torch.load(workdir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    return {"single": single, "ranks": ranks}


@pytest.mark.parametrize("case", ["reservoir", "minred", "minred_stored"])
def test_ddp_replay_equals_one_process_on_the_global_batch(ddp_runs, case: str) -> None:
    one, ranks = ddp_runs["single"][case], [r[case] for r in ddp_runs["ranks"]]
    assert len(one["buffer"]) == REPLAY["size"]
    for r in range(WORLD):  # every rank holds exactly the buffer of one process
        assert torch.equal(ranks[r]["buffer"], one["buffer"]), f"rank {r}"
        assert ranks[r]["counters"] == one["counters"], f"rank {r}"
    # each update's global replay batch, split across ranks in rank order, is one process's
    assert len(one["appended"]) == len(ranks[0]["appended"]) == 8
    assert sum(len(a) for a in one["appended"]) == 7 * REPLAY["batch"]
    for u, want in enumerate(one["appended"]):
        assert torch.equal(torch.cat([ranks[r]["appended"][u] for r in range(WORLD)]), want), f"update {u}"
        assert [len(ranks[r]["appended"][u]) for r in range(WORLD)] in ([0, 0], [2, 1])
    # every rank knew every rank's share of each update without asking (the all-gather's sizes: no host sync)
    for r in range(WORLD):
        for u, (shares, mine) in enumerate(ranks[r]["shares"]):
            held = [ranks[q]["shares"][u][1] for q in range(WORLD)]  # what each rank really held
            assert shares == held and shares[r] == mine, f"rank {r}, update {u}: {shares} vs {held}"
    assert all(shares is None for shares, _ in one["shares"])  # one process: nothing to gather
    for name, w in one["model"].items():  # and the training itself is that of one process, to float32 rounding:
        # the all-reduce sums gradients in another order, and 8 LARS steps at lr 0.3 move the biases by ~0.6, so
        # the gap is a few 1e-6 on every element (Xeon 5th gen: 4.6e-6), also near zero; a wrong share or a
        # gradient summed instead of averaged moves whole tensors by 1e-2 or more. Hence atol on the tensor's scale.
        torch.testing.assert_close(ranks[0]["model"][name], w, rtol=1e-4, atol=1e-4 * float(w.abs().max()))
        assert torch.equal(ranks[0]["model"][name], ranks[1]["model"][name])
    assert any(not torch.equal(w, one["initial"][n]) for n, w in one["model"].items())  # it did train


@pytest.mark.parametrize("case", ["all", "all_fp16"])
def test_ddp_ranks_keep_identical_predictor_and_buffer_with_all_three(ddp_runs, case: str) -> None:
    """Replay, mixup and distillation under DDP: the ranks end identical, also though each rank built another
    predictor (the plugin starts every rank from rank 0's). In float16 (all_fp16, from a loss scale of 2^12) the
    first updates with the distillation term overflow (2 here): every rank skips the same ones (the gradients they
    test are the averaged ones; LARS's multi-tensor path, CUDA's, masks the skipped steps on the device), so the
    scale, the counters and the weights still agree."""
    a, b = (r[case] for r in ddp_runs["ranks"])
    assert torch.equal(a["buffer"], b["buffer"]) and len(a["buffer"]) == REPLAY["size"]
    assert a["counters"] == b["counters"] and a["counters"]["frozen_forwards"] > 0
    for name, p in a["predictor"].items():  # gradients averaged over ranks: the same step everywhere
        assert torch.equal(p, b["predictor"][name]), name
    for name, w in a["model"].items():
        assert torch.equal(w, b["model"][name]), name
    if case == "all_fp16":
        assert a["scaler"] == b["scaler"] and a["scaler"]["scale"] < 2.0 ** 12
        assert a["counters"]["skipped_updates"] == math.log2(2.0 ** 12 / a["scaler"]["scale"]) > 0
        # and it trained after the skips
        assert any(not torch.equal(w, a["initial"][n]) for n, w in a["model"].items()), a["scaler"]


if __name__ == "__main__":  # a rank of the `ddp_runs` fixture's torchrun launch
    # avalanche-lib installs a package named `tests`, which would shadow this folder here (pytest maps it itself)
    sys.modules["tests"] = types.ModuleType("tests")
    sys.modules["tests"].__path__ = [str(ROOT / "tests")]
    _rank_main(Path(sys.argv[1]))
