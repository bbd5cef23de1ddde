"""The method's pieces on CUDA against the CPU (marker `cuda`; bench/gpu_check.py runs them on the GPU machine).

Skipped without CUDA. STREAMING_SSL_TEST_DEVICE=cpu runs the same assertions with the CPU as the "device"
(bench/gpu_check.py --dry-run), which tests these tests here.

Generators: CPU (Mersenne twister) and CUDA (Philox) generators give different numbers for the same seed,
so the augmentation is compared exactly only with the same uniforms (drawn once on the CPU and used on
both devices); the device's own generator path is checked by shapes and by the frequencies of the random
choices against their probabilities (distributional).
"""

from __future__ import annotations

import copy
import math
import os
import signal
import socket
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from avalanche.core import SupervisedPlugin

from scenarios.datasets import ImageData
from scenarios.streams import build_stream
from streaming_ssl import augment as augment_module
from streaming_ssl import checkpoint as ckpt
from streaming_ssl import distributed as ddp
from streaming_ssl.augment import MultiPatchAugment
from streaming_ssl.cl import DistillPlugin, MixupPlugin, ReplayBufferPlugin, build_cl_plugins
from streaming_ssl.cl.common import gather_global_batch
from streaming_ssl.config import load_config
from streaming_ssl.device import autocast, cpu_supports_bf16, resolve_precision
from streaming_ssl.lars import LARS, param_groups
from streaming_ssl.models import EMPSSLModel
from streaming_ssl.objective import emp_ssl_loss
from streaming_ssl.probe import extract_features, linear_probe_accuracy, recalibrate_batchnorm
from streaming_ssl.strategy import FLOAT16_INIT_SCALE, EMPSSLStrategy, NonFiniteLossError, RowBatchLoader
from tests.streaming_ssl.test_lars import ops_per_step

DEVICE = os.environ.get("STREAMING_SSL_TEST_DEVICE", "cuda")
# PyTorch reads this once, at the process's first cuBLAS call, so the deterministic tests' fixture would set it too
# late: set here, at collection, before any test runs (bench/gpu_check.py also sets it for its pytest process)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")]
MODEL_KW = {"width": 0.25, "feature_dim": 256, "proj_hidden_dim": 256, "proj_dim": 128}
# where the dry run on the CPU needs a narrower model (float16 is emulated there, 5x to 35x slower than float32)
CPU_NARROW_MODEL_KW = {"width": 0.125, "feature_dim": 64, "proj_hidden_dim": 64, "proj_dim": 32}


@pytest.fixture
def dev():
    """The device under test, with TF32 off (exact fp32 comparisons) for the test's duration."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield torch.device(DEVICE)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm().clamp_min(1e-12))


def test_augment_same_uniforms_same_patches(dev):
    """Every op (crop-resize, flip, jitter in its random order, gray, blur, solarize, normalise) on the device
    equals the CPU for the same uniforms. Tolerance 1e-4 of the normalised range: float32 kernels only."""
    aug = MultiPatchAugment(6, 32, blur_p=0.5, solarize_p=0.5)
    x = images(16)
    u = aug._uniforms(x, 6, torch.Generator().manual_seed(1))
    ref, _ = aug.patches_from_uniforms(x, u, 6)
    got, _ = aug.to(dev).patches_from_uniforms(x.to(dev), u.to(dev), 6)
    assert got.device.type == dev.type and got.shape == ref.shape == (96, 3, 32, 32)
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-4, atol=1e-4)


def test_compiled_augment_on_device_matches_cpu(dev):
    """augment.compile on the device (its fused kernels: Triton on CUDA) against the eager CPU pipeline for the same
    uniforms, and the parameters exactly. Same tolerance as above."""
    import torch._dynamo

    torch._dynamo.reset()
    kwargs = dict(blur_p=0.5, solarize_p=0.5, gray_p=0.5)
    x = images(16, seed=2)
    u = MultiPatchAugment._uniforms(x, 6, torch.Generator().manual_seed(2))
    ref, ref_params = MultiPatchAugment(6, 32, **kwargs).patches_from_uniforms(x, u, 6)
    aug = MultiPatchAugment(6, 32, compiled=True, **kwargs).to(dev)
    got, params = augment_module._compiled_patches()(aug, x.to(dev), u.to(dev), 6)
    assert got.device.type == dev.type and got.shape == ref.shape == (96, 3, 32, 32)
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-4, atol=1e-4)
    # the parameters to float rounding: Triton fuses a + (b - a) * u into one FMA, which eager kernels round twice
    for k in ref_params:
        torch.testing.assert_close(params[k].cpu(), ref_params[k], rtol=1e-6, atol=1e-6)
    assert torch._dynamo.eval_frame._debug_get_cache_entry_list(augment_module._patches_from_uniforms)  # compiled


def test_augment_generator_on_device_is_distributed_as_configured(dev):
    """The device generator path (what training uses): shapes, finite values in the normalised range of [0, 1]
    pixels, the same patches again for the same seed, and the frequency of each random choice within 5 binomial
    standard deviations of its probability (4000 patches); whole images stay on the device."""
    aug = MultiPatchAugment(20, 32).to(dev)
    out, params = aug(images(200).to(dev), torch.Generator(device=dev).manual_seed(0), return_params=True)
    assert out.shape == (4000, 3, 32, 32) and out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    assert torch.equal(aug(images(200).to(dev), torch.Generator(device=dev).manual_seed(0)), out)
    raw = out * aug.std + aug.mean
    assert float(raw.min()) >= -1e-5 and float(raw.max()) <= 1 + 1e-5
    assert aug.whole_image(images(4).to(dev)).device.type == dev.type
    n = out.shape[0]
    for key, p in (("flip", 0.5), ("jitter", 0.8), ("gray", 0.2), ("blur", 0.1), ("solarize", 0.1)):
        freq = float(params[key].float().mean())
        assert abs(freq - p) < 5 * math.sqrt(p * (1 - p) / n), (key, freq, p)
    area = params["crop_box"][:, 2] * params["crop_box"][:, 3] / (32 * 32)
    assert float((area - 0.25).abs().max()) < 0.1  # the fixed quarter of the image (integer sides)
    assert abs(float(out.mean())) < 0.5  # normalised


def test_model_bf16_autocast_matches_fp32(dev):
    """Forward + backward under bf16 autocast (and under float16 with its first loss scale) against fp32 on the
    device (same weights and patches). bf16 keeps 8 mantissa bits (0.4% rounding per op) through about 20 layers of
    a randomly initialised network; measured on a bf16 CPU: h 3.6%, z 5.4%, loss 0.03%, gradient 37% (norm) /
    cosine 0.93. Tolerances: h within 8% and z within 10% relative (norm), the loss within 0.5%, the gradient of all
    weights with cosine >= 0.85 to fp32's (biases right before a BatchNorm are left out: their true gradient is 0)."""
    torch.manual_seed(0)
    model = EMPSSLModel(**MODEL_KW).to(dev).to(memory_format=torch.channels_last)
    x = MultiPatchAugment(4, 32).to(dev)(images(32).to(dev), torch.Generator(device=dev).manual_seed(0))
    x = x.contiguous(memory_format=torch.channels_last)
    results = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        model.zero_grad(set_to_none=True)
        with autocast(dev, dtype):
            h, z = model(x)
        loss, _ = emp_ssl_loss(z, 4)
        scale = 2.0 ** 10 if dtype == torch.float16 else 1.0  # float16 trains with a loss scale (its first one)
        (loss * scale).backward()
        grad = torch.cat([p.grad.flatten() for k, p in model.named_parameters() if not k.endswith("0.bias")]) / scale
        results[name] = (h.detach().float(), z.detach().float(), float(loss), grad)
    (h32, z32, l32, g32) = results["fp32"]
    for name in ("bf16", "fp16"):  # float16's 11 mantissa bits round less than bf16's 8: the same bounds hold
        h16, z16, l16, g16 = results[name]
        assert rel_err(h16, h32) < 0.08 and rel_err(z16, z32) < 0.10, name
        assert abs(l16 - l32) < 0.005 * abs(l32), name
        assert float(F.cosine_similarity(g16, g32, dim=0)) >= 0.85, name
        assert bool(torch.isfinite(g16).all()), name
    # what precision auto trains in here: bf16 on a GPU with bf16 tensor cores (8.0+; the H200 is 9.0), as on a CPU
    # with native bf16; float32 elsewhere
    native = torch.cuda.get_device_capability(dev)[0] >= 8 if dev.type == "cuda" else cpu_supports_bf16()
    assert resolve_precision("auto", torch.device(dev.type, 0) if dev.type == "cuda" else dev) is (
        torch.bfloat16 if native else None)


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_memory_savers_give_the_plain_models_gradients_on_the_device(dev, amp):
    """model.recompute_stages=2 with model.recompute_bn_relu (the memory savers an out-of-memory error names) against
    the plain model on the device, two training steps of the objective from the same weights and patches. The
    savers' BatchNorm+ReLU+conv Function calls aten's native_batch_norm, its backward and convolution_backward
    itself, where the plain model's BatchNorm takes cuDNN's kernels on CUDA: so not bitwise there (on the CPU it
    is, tests/streaming_ssl/test_models.py). fp32: each parameter's gradient within 1% of the plain one (relative
    norm), the running statistics within 0.1%. bf16 autocast, where a different rounding anywhere spreads through
    the backward: all gradients together with cosine >= 0.9 and within 40% (the spread of bf16 against fp32
    itself, test_model_bf16_autocast_matches_fp32), statistics within 10%. The step counters equal. A saver that
    dropped the ReLU's mask in backward is far off either way (cosine 0.15, 450%, measured on the CPU)."""
    model_kw = MODEL_KW if dev.type == "cuda" else CPU_NARROW_MODEL_KW
    torch.manual_seed(0)
    plain = EMPSSLModel(**model_kw).to(dev).to(memory_format=torch.channels_last).train()
    lean = copy.deepcopy(plain)
    for m in lean.modules():
        if hasattr(m, "recompute_bn_relu"):
            m.recompute_bn_relu = True
    lean.backbone.recompute_stages = 2
    x = MultiPatchAugment(4, 32).to(dev)(images(16).to(dev), torch.Generator(device=dev).manual_seed(0))
    x = x.contiguous(memory_format=torch.channels_last)
    for step in range(2):  # the second step normalises with statistics the first one updated
        grads = []
        for model in (plain, lean):
            model.zero_grad(set_to_none=True)
            with autocast(dev, amp):
                _, z = model(x)
            emp_ssl_loss(z.float(), 4)[0].backward()
            # (biases right before a BatchNorm are left out: their true gradient is 0)
            grads.append({n: p.grad for n, p in model.named_parameters() if not n.endswith("0.bias")})
        assert all(bool(torch.isfinite(g).all()) for g in grads[1].values()), step
        if amp is None:
            for name, g in grads[0].items():
                assert rel_err(grads[1][name], g) < 0.01, (step, name)
        else:
            g0, g1 = (torch.cat([g.flatten().float() for g in gs.values()]) for gs in grads)
            assert float(F.cosine_similarity(g1, g0, dim=0)) >= 0.9 and rel_err(g1, g0) < 0.4, step
        buffers = dict(lean.named_buffers())
        for name, b in plain.named_buffers():
            if b.is_floating_point():
                assert rel_err(buffers[name], b) < (0.001 if amp is None else 0.1), (step, name)
            else:
                assert torch.equal(buffers[name], b), (step, name)
    assert int(dict(lean.named_buffers())["backbone.stages.0.0.bn1.num_batches_tracked"]) == 2


def test_objective_on_device_matches_cpu(dev):
    """emp_ssl_loss (float32, Gram/Cholesky) and its gradient on the device equal the CPU's (rtol 1e-4)."""
    z = F.normalize(torch.randn(20 * 50, 64, generator=torch.Generator().manual_seed(0)), dim=1)
    out = []
    for d in (torch.device("cpu"), dev):
        zz = z.to(d).requires_grad_(True)
        loss, stats = emp_ssl_loss(zz, 20)
        loss.backward()
        out.append((loss.detach().cpu(), zz.grad.cpu(), {k: float(v) for k, v in stats.items()}))
    (l_cpu, g_cpu, s_cpu), (l_dev, g_dev, s_dev) = out
    torch.testing.assert_close(l_dev, l_cpu, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g_dev, g_cpu, rtol=1e-3, atol=1e-5)
    for k in s_cpu:
        assert s_dev[k] == pytest.approx(s_cpu[k], rel=1e-4, abs=1e-4), k


def test_features_and_probe_on_device_match_cpu(dev):
    """Whole-image and bag-of-patches features extracted on the device (fp32; the bag's crops are drawn on the CPU
    for every device, so they are the same crops) equal the CPU's (1e-3 relative),
    bf16 features stay within 5%; the linear probe (which always fits on the CPU, on the features
    extract_features returns there) gives the same predictions on either device's features (>= 98% agree)."""
    torch.manual_seed(0)
    model = EMPSSLModel(**MODEL_KW)
    aug = MultiPatchAugment(4, 32)
    train_x, test_x = images(200, seed=1), images(100, seed=2)
    train_y, test_y = torch.arange(200) % 4, torch.arange(100) % 4
    feats = {}
    for d, amp in ((torch.device("cpu"), None), (dev, None), (dev, torch.bfloat16)):
        model.to(d)
        key = (d.type, amp)
        feats[key] = [extract_features(model, x, aug.to(d), device=d, batch_size=64, patches=p, amp_dtype=amp,
                                       channels_last=True, seed=3) for x in (train_x, test_x) for p in (0, 4)]
    cpu, dev32, dev16 = feats[("cpu", None)], feats[(dev.type, None)], feats[(dev.type, torch.bfloat16)]
    for a, b, c in zip(cpu, dev32, dev16):
        assert a.device.type == b.device.type == "cpu" and a.shape == b.shape
        assert rel_err(b, a) < 1e-3
        assert rel_err(c, a) < 0.05
    acc_cpu, pred_cpu = linear_probe_accuracy(cpu[0], train_y, cpu[2], test_y, 4, epochs=5)
    acc_dev, pred_dev = linear_probe_accuracy(dev32[0], train_y, dev32[2], test_y, 4, epochs=5)
    assert float((pred_cpu == pred_dev).float().mean()) >= 0.98
    assert abs(acc_cpu - acc_dev) <= 0.02


def test_the_baseline_probe_of_the_initialisation_draws_no_random_number_on_the_device(dev):
    """Forward transfer's baseline (StreamEvaluator.evaluate_baseline, before the first update): with the bag of
    patches, BatchNorm recalibration, kNN and a transfer set on the device, it leaves the CPU's and the device's
    random streams and the model's state as they were (training then draws what it draws without the baseline),
    and probing twice gives the same baseline."""
    from streaming_ssl.evaluation import ProbeSet, StreamEvaluator

    torch.manual_seed(0)
    model = EMPSSLModel(**MODEL_KW).to(dev)
    gen = torch.Generator().manual_seed(1)
    sets = [ProbeSet(name, images(64, seed), torch.randint(0, 4, (64,), generator=gen), images(32, seed + 1),
                     torch.randint(0, 4, (32,), generator=gen), 4) for name, seed in (("a", 3), ("b", 5))]
    evaluator = StreamEvaluator(in_domain=sets[0], transfer=[sets[1]], parent_classes=[[0, 1], [2, 3]],
                                augment=MultiPatchAugment(4, 32).to(dev), device=dev, amp_dtype=torch.bfloat16,
                                patches=4, batch_size=32, knn_k=5, probe_kwargs={"epochs": 3}, seed=2,
                                bn_recalibrate=32, forward_transfer=True)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    cpu_rng = torch.get_rng_state()
    dev_rng = torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None
    first = evaluator.evaluate_baseline(model)
    assert torch.equal(cpu_rng, torch.get_rng_state())
    if dev.type == "cuda":
        assert torch.equal(dev_rng, torch.cuda.get_rng_state(dev))
    assert all(torch.equal(v, before_state[k]) for k, v in model.state_dict().items())
    assert evaluator.evaluate_baseline(model) == first
    assert len(first["acc_matrix_row"]) == 2 and set(first["transfer"]) == {"b"} and first["knn_acc_all"] is not None


def test_lars_default_step_on_device_matches_the_loop(dev):
    """LARS's default on the device (on CUDA its multi-tensor buckets, elsewhere the loop) gives the parameters of
    its per-parameter loop over 3 steps of the small model (fp32: 1e-5 relative; the fused norms may sum in
    another order), and on CUDA it dispatches as many ops for 24 parameters as for 4."""
    torch.manual_seed(0)
    before = EMPSSLModel(**MODEL_KW)
    models = [copy.deepcopy(before).to(dev) for _ in range(2)]
    opts = [LARS(param_groups(m, 1e-4), lr=0.3, foreach=f) for m, f in zip(models, (None, False))]
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen) * 1e-2 for p in models[0].parameters()]
        for model, opt in zip(models, opts):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.to(dev)
            opt.step()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert rel_err(a, b) < 1e-5, name
    # the steps moved the parameters, so the agreement above means something
    assert any(rel_err(a, b) > 1e-3 for a, b in zip(models[0].parameters(), before.parameters()))
    if dev.type == "cuda":
        assert ops_per_step(2, None, "cuda") == ops_per_step(12, None, "cuda")


class _HostWaits(torch.utils._python_dispatch.TorchDispatchMode):
    """On the CPU, counts two things that on a GPU make the host wait for the device: reads of a value (.item(),
    bool(), int(), .tolist(): aten._local_scalar_dense, in `reads`) and host scalars written into one element
    (`t[i] = 3` copies a 0-dim tensor into a 0-dim view: `scalar_copies`). The dry run's stand-in for
    torch.cuda.set_sync_debug_mode('error'), which cannot tell the host's tensors from the device's (both are
    on the CPU there): so it leaves out what host-side index arithmetic does (masks, nonzero) and lets the caller
    allow the reads that only the CPU path makes."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = self.scalar_copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        self.scalar_copies += func is torch.ops.aten.copy_.default and args[0].dim() == 0 and args[1].dim() == 0
        return func(*args, **(kwargs or {}))


class _NoSyncWindow(SupervisedPlugin):
    """Arms torch.cuda.set_sync_debug_mode('error') from the start of every update after the first two (its batch
    already fetched: the loader copies an epoch's order once, before the updates) to the end of the update, so
    that any host synchronisation inside an update raises. On the CPU (the dry run), where there is no device to
    wait for, it counts with _HostWaits what would wait on a GPU (`reads`, `scalar_copies`)."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.cuda, self.armed, self.watched = device.type == "cuda", False, 0
        self.recorder: _HostWaits | None = None
        self.reads = self.scalar_copies = 0

    def before_training_iteration(self, strategy, **kwargs):
        # warm-up: the first update at each batch shape (cudnn.benchmark searches kernels for it; with replay the
        # batch grows at update 1, when the buffer first holds images) and the cached constants
        if strategy.global_step >= 2:
            self.armed = True
            if self.cuda:
                torch.cuda.set_sync_debug_mode("error")
            else:
                self.recorder = _HostWaits().__enter__()

    def after_training_iteration(self, strategy, **kwargs):
        if self.armed:
            if self.cuda:
                torch.cuda.set_sync_debug_mode("default")
            else:
                self.stop_recording()
            self.armed, self.watched = False, self.watched + 1

    def stop_recording(self) -> None:
        if self.recorder is not None:
            self.recorder.__exit__(None, None, None)
            self.reads += self.recorder.reads
            self.scalar_copies += self.recorder.scalar_copies
            self.recorder = None


def _train_small_stream(dev: torch.device, methods: Callable[[EMPSSLModel], list], *extra: SupervisedPlugin,
                        online: bool = False, model_kw: dict | None = None, ddp_wrap: bool = False,
                        **strategy_kw) -> tuple[EMPSSLModel, list, EMPSSLStrategy]:
    """EMPSSLStrategy trained on the device (bf16 autocast on CUDA, unless amp_dtype is given) over a
    class-incremental stream of 96 random images in 2 experiences, batch 16 (6 updates), with the plugins
    `methods(model)` makes (their trainable modules in the optimizer) and the `extra` plugins; `online`: the same
    classes as an online stream of 6 mini-experiences of 16; `model_kw`: the model's sizes (default MODEL_KW);
    `ddp_wrap` (inside a process group): the strategy trains the model through DistributedDataParallel, with
    SyncBatchNorm on CUDA, as a torchrun run does. Returns the model, the methods' plugins and the strategy."""
    gen = torch.Generator().manual_seed(0)
    targets = torch.arange(4).repeat_interleave(24)
    data = ImageData(torch.randint(0, 256, (len(targets), 3, 32, 32), dtype=torch.uint8, generator=gen), targets)
    split = {"experience_classes": [[0, 1], [2, 3]]}
    stream = (build_stream(data, 4, mode="online", online_experience_size=16, **split) if online
              else build_stream(data, 4, mode="class_incremental", **split))
    torch.manual_seed(0)
    model = EMPSSLModel(**(model_kw or MODEL_KW)).to(dev).to(memory_format=torch.channels_last)
    if ddp_wrap and dev.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    plugins = methods(model)
    groups = param_groups(model, 1e-4) + [g for p in plugins for m in getattr(p, "trainable_modules", [])
                                          for g in param_groups(m, 1e-4)]
    strategy_kw.setdefault("amp_dtype", torch.bfloat16 if dev.type == "cuda" else None)
    trained = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index or 0] if dev.type == "cuda"
                                                         else None) if ddp_wrap else model)
    strategy = EMPSSLStrategy(model=trained, optimizer=LARS(groups, lr=0.3), augment=MultiPatchAugment(4, 32),
                              batch_size=16, total_updates=stream.n_updates(16), device=dev,
                              plugins=[*plugins, *extra], **strategy_kw)
    strategy.train(list(stream), eval_streams=[])
    return model, plugins, strategy


@pytest.mark.parametrize("methods", ["plain", "replay+mixup", "minred+distill", "minred_stored", "fp16+distill"])
def test_training_updates_never_wait_for_the_device(dev, methods: str):
    """No host synchronisation inside an update of EMPSSLStrategy on CUDA (bf16 autocast, data resident on the
    device, masked augmentation, Gram/Cholesky objective, LARS, cosine schedule, the non-finite check armed;
    with reservoir replay and LUMP mixup, whose indices drawn on the host go over from pinned memory; with MinRed,
    whose greedy choice (12 drops of 32 images at the 2nd update, 16 of 36 from the 3rd) runs on the device, and
    CaSSLe distillation against the copy frozen after the first experience; with MinRed's stored features; in
    float16 with loss scaling, whose skip of an overflowed update LARS decides on the device, with distillation,
    whose predictor shares the optimizer, its frozen copy on each update's BatchNorm statistics): the host queues
    the next update while the device still runs this one. Every update after the first two (the batch shapes'
    warm-up) is watched (4 of 6). The finiteness check is the one allowed sync, every finite_check_every updates
    (here beyond the run); afterwards it still raises on what backward flagged."""
    torch.backends.cudnn.benchmark = dev.type == "cuda"
    window = _NoSyncWindow(dev)
    fp16 = methods.startswith("fp16")
    model_kw = CPU_NARROW_MODEL_KW if fp16 and dev.type != "cuda" else MODEL_KW
    run_kw = {"amp_dtype": torch.float16, "model_kw": model_kw} if fp16 else {}

    def make(model: EMPSSLModel) -> list:
        if methods == "plain":
            return []
        if fp16:
            return [DistillPlugin(model, dim=model_kw["proj_dim"], hidden_dim=64, every=2, device=dev,
                                  frozen_bn="batch")]
        if methods == "replay+mixup":
            replay = ReplayBufferPlugin(size=20, batch=8, seed=0, device=dev)
            return [MixupPlugin(replay, alpha=0.4, seed=0), replay]
        replay = ReplayBufferPlugin(size=20, batch=8, policy="minred", seed=0, device=dev,
                                    minred_refresh="stored" if methods == "minred_stored" else "all")
        if methods == "minred_stored":
            return [replay]
        return [replay, DistillPlugin(model, dim=MODEL_KW["proj_dim"], hidden_dim=64, device=dev)]

    try:
        model, plugins, strategy = _train_small_stream(dev, make, window, finite_check_every=1000, **run_kw)
    finally:
        if dev.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        window.stop_recording()
        torch.backends.cudnn.benchmark = False
    assert strategy.global_step == 6 and window.watched == 4
    # the CPU path reads one value per update, the loss's finiteness (CUDA accumulates it on the device and reads
    # every finite_check_every updates), and in float16 two more: LARS's per-parameter loop reads found_inf (CUDA
    # steps in buckets that skip on the device) and the skipped-update counter is flushed (left on CUDA's device);
    # anything more would wait for the GPU
    cpu_reads = 4 * (3 if fp16 else 1)
    assert (window.reads, window.scalar_copies) == ((0, 0) if dev.type == "cuda" else (cpu_reads, 0))
    counters = strategy.counters
    if fp16:  # the scaler acted: each skipped update (counted unread, summed when train() ended) halved the scale
        assert counters.skipped_updates == math.log2(FLOAT16_INIT_SCALE / strategy.grad_scaler.get_scale())
        assert counters.frozen_forwards > 0 and all(bool(torch.isfinite(p).all()) for p in model.parameters())
    elif plugins:  # the methods acted: 5 updates replayed 8 buffer images each (and mixed their stream images)
        replay = next(p for p in plugins if isinstance(p, ReplayBufferPlugin))
        assert counters.buffer_images == 5 * 8 + (5 * 16 if methods == "replay+mixup" else 0)
        assert len(replay.buffer) == 20 and replay.buffer.seen == 96
    if methods == "minred+distill":  # features of every candidate once the buffer overflows: 16 + 16, then 20 + 16
        assert counters.extra_forwards == 32 + 4 * 36
    if methods == "minred_stored":  # features of each update's 16 new images, and of the 8 replayed after updates 2-6
        assert counters.extra_forwards == 6 * 16 + 5 * 8
        assert replay.features.shape == (20, MODEL_KW["proj_dim"]) and replay.features.device.type == dev.type
    if methods == "minred+distill":  # the copy frozen after the first experience's 3 updates, used in the next 3
        assert plugins[1].frozen is not None and counters.frozen_forwards == 3 * 4 * (16 + 8)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    strategy._nonfinite = torch.tensor(True, device=dev)  # what backward accumulates after a NaN loss
    with pytest.raises(NonFiniteLossError):
        strategy.check_finite()


class _NoSyncFrom(SupervisedPlugin):
    """Arms torch.cuda.set_sync_debug_mode('error') at the end of update `start` and keeps it armed until training
    ends: the updates and all between them (the loader's next epoch, Avalanche's and the plugins' hooks at each
    experience's end and start). On the CPU (the dry run) it only counts the updates it would have watched."""

    def __init__(self, device: torch.device, start: int = 2) -> None:
        super().__init__()
        self.cuda, self.start, self.armed, self.watched = device.type == "cuda", start, False, 0
        self.recorder: _HostWaits | None = None
        self.reads = self.scalar_copies = 0

    def after_training_iteration(self, strategy, **kwargs):
        self.watched += self.armed
        if strategy.global_step == self.start:
            self.armed = True
            if self.cuda:
                torch.cuda.set_sync_debug_mode("error")
            else:
                self.recorder = _HostWaits().__enter__()

    def after_training(self, strategy, **kwargs):
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
        self.stop_recording()
        self.armed = False

    stop_recording = _NoSyncWindow.stop_recording


def test_an_online_stream_never_waits_for_the_device_between_updates(dev):
    """An online stream crosses an experience boundary at every update: the loader of its next mini-experience
    (the order copied to the device) and the per-experience hooks of Avalanche and of the strategy run between
    every two updates. From the end of the 2nd update to the end of training (4 updates and the 4 boundaries
    before them), nothing may make the host wait for the device."""
    torch.backends.cudnn.benchmark = dev.type == "cuda"
    window = _NoSyncFrom(dev)
    try:
        _, _, strategy = _train_small_stream(dev, lambda model: [], window, online=True, finite_check_every=1000)
    finally:
        if dev.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        window.stop_recording()
        torch.backends.cudnn.benchmark = False
    assert strategy.global_step == 6 and strategy.stream_step == 6 and window.watched == 4
    assert (window.reads, window.scalar_copies) == ((0, 0) if dev.type == "cuda" else (4, 0))  # as above


def _methods_run(dev: torch.device, ddp_wrap: bool = False) -> dict:
    """The small stream with MinRed replay, LUMP mixup and CaSSLe distillation (a frozen copy every 2 updates), then
    the probe's features (BatchNorm recalibrated; whole images and bags of 4 patches). Returns the model's and the
    methods' states (copies, taken before the recalibration) and the features. `ddp_wrap`: see
    _train_small_stream."""
    def make(model: EMPSSLModel) -> list:
        replay = ReplayBufferPlugin(size=20, batch=8, policy="minred", seed=0, device=dev)
        return [MixupPlugin(replay, alpha=0.4, seed=0), replay,
                DistillPlugin(model, dim=MODEL_KW["proj_dim"], hidden_dim=64, every=2, device=dev,
                              sync_bn=ddp.syncs_batchnorm(ddp_wrap, dev.type))]

    model, plugins, strategy = _train_small_stream(dev, make, ddp_wrap=ddp_wrap)
    counters = strategy.counters  # the methods acted: 5 updates replayed and mixed, 4 distilled (copies at 2, 4)
    assert strategy.global_step == 6 and counters.buffer_images == 5 * 8 + 5 * 16 and len(plugins[1].buffer) == 20
    assert counters.frozen_forwards > 0 and plugins[2].frozen is not None
    out = copy.deepcopy({"model": model.state_dict(), **{p.state_key: p.state_dict() for p in plugins}})
    probe_x, aug = images(64, seed=6), MultiPatchAugment(4, 32).to(dev)
    amp = torch.bfloat16 if dev.type == "cuda" else None
    recalibrate_batchnorm(model, probe_x, aug, n_images=64, device=dev, batch_size=32, amp_dtype=amp, seed=1)
    out["features"] = {patches: extract_features(model, probe_x, aug, device=dev, batch_size=32, patches=patches,
                                                 amp_dtype=amp, seed=1) for patches in (0, 4)}
    return out


def test_float16_trains_with_loss_scaling_on_the_device(dev):
    """train.precision=fp16 (for V100 and T4) on the device: the strategy's GradScaler scales the loss, unscales the
    gradients of the model and of CaSSLe's predictor (one optimizer) before LARS, and the small stream trains to
    finite weights; every update the scaling skipped halved the scale, and most updates were applied. (On the CPU,
    the dry run, a narrower model: float16 is emulated there, 5x to 35x slower than float32.)"""
    model_kw = MODEL_KW if dev.type == "cuda" else CPU_NARROW_MODEL_KW
    torch.manual_seed(0)
    initial = EMPSSLModel(**model_kw).state_dict()  # what _train_small_stream's model starts from (same seed)

    def make(model: EMPSSLModel) -> list:
        return [DistillPlugin(model, dim=model_kw["proj_dim"], hidden_dim=64, every=2, device=dev)]

    model, plugins, strategy = _train_small_stream(dev, make, model_kw=model_kw, amp_dtype=torch.float16)
    scaler = strategy.grad_scaler
    assert scaler is not None and scaler.is_enabled() and strategy.global_step == 6
    skipped = strategy.counters.skipped_updates
    assert skipped == math.log2(FLOAT16_INIT_SCALE / scaler.get_scale()) and skipped <= 2, skipped
    assert strategy.counters.frozen_forwards > 0
    for part in (model, plugins[0].predictor):
        assert all(bool(torch.isfinite(p).all()) for p in part.parameters())
    moved = [k for k, w in model.state_dict().items() if w.is_floating_point() and not torch.equal(w.cpu(), initial[k])]
    assert len(moved) > len(initial) // 2


def test_every_method_trains_deterministically_on_the_device(dev, deterministic_algorithms):
    """train.deterministic on the device: under torch.use_deterministic_algorithms, strict as setup_runtime sets it
    (an op with no deterministic kernel on CUDA raises), the strategy with MinRed replay, LUMP mixup and CaSSLe
    distillation trains (bf16 on CUDA), and two runs from one seed end bitwise equal: weights, BatchNorm
    statistics, the predictor, the frozen copy, the buffer and its generators, and the probe's features after
    BatchNorm recalibration (a generator seeded from the clock in the replay plugin fails this test)."""
    from tests.test_cl_end_to_end import _assert_equal

    first, again = _methods_run(dev), _methods_run(dev)
    assert set(first) == {"model", "cl.mixup", "cl.replay", "cl.distill", "features"}
    # finite, every float tensor (the mode fills uninitialised memory with NaN: a read of it would show here, by
    # name, not as a mere difference)
    distill = first["cl.distill"]
    floats = {f"{part}/{k}": v for part, state in (("model", first["model"]), ("predictor", distill["predictor"]),
                                                   ("frozen", distill["frozen"]), ("features", first["features"]))
              for k, v in state.items()}
    assert [k for k, v in floats.items() if not bool(torch.isfinite(v).all())] == []
    _assert_equal(first, again)


@pytest.fixture
def deterministic_algorithms():
    """torch.use_deterministic_algorithms, strict, as setup_runtime sets it for train.deterministic: cuBLAS's fixed
    workspace (set at import, see above), no timed pick of convolution kernels."""
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") in (":4096:8", ":16:8")
    old = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    yield
    torch.use_deterministic_algorithms(old[0])
    torch.backends.cudnn.benchmark = old[1]


def test_every_method_trains_in_a_process_group_as_without_one(dev, deterministic_algorithms):
    """MinRed replay, LUMP mixup and CaSSLe distillation in a one-process group, as torchrun runs them (NCCL,
    DistributedDataParallel and SyncBatchNorm on CUDA; gloo and DDP on the CPU): each of the methods' collectives
    runs on the backend (the buffer's gather of the global batch, MinRed's choice broadcast from rank 0, the rank
    shares, the predictor's coalesced all-reduce, the objective's differentiable gather, DDP's reduction), and with
    one rank every one of them is an identity, so under deterministic algorithms the run ends bitwise equal to the
    same run without a group: weights, BatchNorm statistics, predictor, frozen copy, buffer, probe features. On CUDA
    the predictor's BatchNorm is a SyncBatchNorm there, as build_cl_plugins makes it for a torchrun run."""
    import torch.distributed as dist

    from tests.test_cl_end_to_end import _assert_equal

    plain = _methods_run(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        assert ddp.is_dist() and dist.get_backend() == backend
        cfg = load_config(None, [f"model.proj_dim={MODEL_KW['proj_dim']}", "cl.distill.enabled=true",
                                 "cl.distill.hidden_dim=8"])
        distill, = build_cl_plugins(cfg, model=EMPSSLModel(**MODEL_KW).to(dev), train_size=96, device=dev)
        synced = [isinstance(m, torch.nn.SyncBatchNorm) for m in distill.predictor.modules()]
        assert any(synced) == (dev.type == "cuda")  # PyTorch's SyncBatchNorm is CUDA-only
        grouped = _methods_run(dev, ddp_wrap=True)
    finally:
        dist.destroy_process_group()
    _assert_equal(plain, grouped)


def test_each_epoch_of_a_resident_loader_starts_without_waiting_for_the_device(dev):
    """An online stream starts an epoch (a mini-experience of one batch) at every update, and the loader of data
    resident on the device copies each epoch's order there: from pinned memory, so that the host does not wait for
    the device's queued work (a copy from pageable memory would, once per update). Four epochs under
    set_sync_debug_mode("error") while the device is busy; each gives its batch, rows in the epoch's order."""
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=gen).to(dev)
    targets = (torch.arange(40) % 4).to(dev)

    def fetch(idx: torch.Tensor):
        return data[idx], targets[idx]

    busy = torch.randn((2048, 2048) if dev.type == "cuda" else (64, 64), generator=gen).to(dev)
    for lo in range(0, 40, 10):
        loader = RowBatchLoader(torch.arange(lo, lo + 10), fetch, 10, seed=0, key=("exp", lo), index_device=dev)
        for _ in range(8):  # device work queued ahead of the copy (the debug mode flags the call either way)
            busy = torch.tanh(busy @ busy)
        if dev.type == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        try:
            batches = [(x, y) for x, y, _ in loader]
        finally:
            if dev.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        order = loader.order()
        assert len(batches) == 1 and sorted(order.tolist()) == list(range(lo, lo + 10))
        assert torch.equal(batches[0][0].cpu(), data.cpu()[order]) and torch.equal(batches[0][1].cpu(), order % 4)
    assert bool(torch.isfinite(busy).all())


@pytest.mark.parametrize("deterministic", [False, True])
def test_runtime_benchmarks_convolutions_unless_deterministic(dev, deterministic: bool):
    """setup_runtime on the device: cudnn.benchmark on (fixed shapes), except under train.deterministic, where a
    timed pick of kernels could differ between a run and its resume. Nothing of it on the CPU."""
    from streaming_ssl.build import setup_runtime

    cfg = load_config(None, [f"train.device={dev.type}", f"train.deterministic={str(deterministic).lower()}"])
    old = (torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled())
    try:
        device, _ = setup_runtime(cfg)
        assert device.type == dev.type
        assert torch.backends.cudnn.benchmark == (dev.type == "cuda" and not deterministic)
        assert torch.are_deterministic_algorithms_enabled() == deterministic
    finally:
        torch.backends.cudnn.benchmark = old[0]
        torch.use_deterministic_algorithms(old[1])


def test_lazy_folder_decoded_in_workers_into_pinned_memory_trains_like_the_main_process(dev, tmp_path):
    """ImageNet-100's path on the device: images decoded in DataLoader workers into pinned memory (on CUDA), copied
    without blocking while the device trains, give the weights of decoding in the main process (fp32; to 1e-5: two
    CUDA runs may sum in another order, a wrong or reordered batch moves the weights by percents)."""
    from torchvision.io import encode_png, write_file

    from scenarios.datasets import LazyImageFolder

    x = images(24, seed=5)[:, :, :20, :24]  # not square: decoding resizes and crops to 16 x 16
    paths = []
    for i, img in enumerate(x):
        paths.append(tmp_path / f"{i}.png")
        write_file(str(paths[-1]), encode_png(img))
    data = ImageData(LazyImageFolder(paths, 16), torch.arange(24) % 4)
    weights = []
    for workers in (0, 2):
        torch.manual_seed(0)
        model = EMPSSLModel(**{**MODEL_KW, "width": 0.125}).to(dev)
        strategy = EMPSSLStrategy(model=model, optimizer=LARS(param_groups(model, 1e-4), lr=0.1),
                                  augment=MultiPatchAugment(2, 16), batch_size=8, total_updates=3, device=dev,
                                  channels_last=False, loader_workers=workers)
        strategy.train(list(build_stream(data, 4, mode="offline"))[0], eval_streams=[])
        assert strategy.global_step == 3
        weights.append({k: v.float().cpu() for k, v in model.state_dict().items()})
    for k in weights[0]:
        torch.testing.assert_close(weights[1][k], weights[0][k], rtol=1e-5, atol=1e-6)


def test_out_of_memory_on_the_device_names_the_fix_and_the_run_resumes_with_it(dev, tmp_path, monkeypatch, caplog):
    """A real CUDA out-of-memory error in a training update (the process held to its memory plus 32 MiB with
    set_per_process_memory_fraction; an update needs more than a hundred): run_stream.py exits 2 with a message that
    names the device, its memory, PyTorch's own words and the memory savers, and writes no checkpoint; resumed
    with the savers it names and the memory back, the run trains the whole stream. In the CPU dry run, PyTorch's
    error is raised at the first backward instead (the CPU has no such limit)."""
    import numpy as np

    import streaming_ssl.cli.train as run_stream

    rng = np.random.default_rng(0)
    npz = tmp_path / "tiny.npz"
    np.savez(npz, x_train=rng.integers(0, 256, (200, 32, 32, 3), dtype=np.uint8), y_train=np.arange(200) % 10,
             x_test=rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8), y_test=np.arange(50) % 10)
    run_dir = tmp_path / "run"
    n_patches = 32 if dev.type == "cuda" else 4  # 1600 patches of 32 x 32 an update on CUDA; the CPU run kept small
    argv = ["--config", "configs/smoke.yaml", f"data.dataset=npz:{npz}", "data.train_per_class=null",
            "data.test_per_class=null", "stream.n_experiences=2", f"train.device={dev.type}", "train.batch_size=50",
            f"augment.n_patches={n_patches}", "eval.probe_epochs=2", "run.tensorboard=false", "run.plot=false",
            f"run.out_dir={run_dir}"]
    benchmark = torch.backends.cudnn.benchmark  # setup_runtime turns it on
    gpu = torch.device("cuda", torch.cuda.current_device()) if dev.type == "cuda" else dev
    try:
        if dev.type == "cuda":  # the fraction's device must carry an index (torch.device("cuda") is refused)
            torch.cuda.empty_cache()
            total = torch.cuda.get_device_properties(gpu).total_memory
            torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved(gpu) + 32 * 2 ** 20) / total, gpu)
        else:
            def backward(self, *args, **kwargs):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB (raised on the CPU)")
            monkeypatch.setattr(torch.Tensor, "backward", backward)
        with caplog.at_level("ERROR"):
            assert run_stream.main(argv) == 2
    finally:
        if dev.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, gpu)
            torch.cuda.empty_cache()
        monkeypatch.undo()
        torch.backends.cudnn.benchmark = benchmark
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1, errors
    err = errors[0]
    assert err.startswith(f"OutOfMemory: out of memory on {dev.type}") and "out of memory. Tried to allocate" in err
    if dev.type == "cuda":
        assert torch.cuda.get_device_name(dev) in err and " GiB, this process's peak " in err
    assert "in training update 0 (experience 0)" in err
    assert f"train.batch_size=50 x augment.n_patches={n_patches}" in err
    assert "no checkpoint was written yet" in err and ckpt.list_checkpoints(run_dir) == []
    savers = ["model.recompute_stages=2", "model.recompute_bn_relu=true"]
    assert err.endswith(f"python run_stream.py --resume {run_dir} {' '.join(savers)}")
    try:
        assert run_stream.main(["--resume", str(run_dir), *savers]) == 0
    finally:
        torch.backends.cudnn.benchmark = benchmark
    state = ckpt.load(ckpt.latest(run_dir))
    assert state["position"]["global_step"] == 4 and state["config"]["model"]["recompute_stages"] == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nccl_syncbn_ddp_world1(dev):
    """A one-process group (NCCL on CUDA, gloo on the CPU) with SyncBatchNorm (CUDA only) and DDP: the loss and
    gradients through ddp.gather_patch_blocks equal those of the plain model (rtol 1e-4, fp32). Gathers of
    tensors held on the CPU (probe features, replay's stream images), which NCCL cannot move by itself, come
    back on the CPU, equal; so do the probe's features extracted in the group."""
    import torch.distributed as dist

    torch.manual_seed(0)
    plain = EMPSSLModel(**MODEL_KW).to(dev)
    probe_images, aug = images(40, seed=4), MultiPatchAugment(2, 32).to(dev)
    feature_kw = dict(device=dev, batch_size=16, patches=2, channels_last=False, seed=1)
    x = torch.randn(4 * 16, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(dev)
    _, z = plain(x)
    loss_plain, _ = emp_ssl_loss(z, 4)
    loss_plain.backward()
    feats_plain = extract_features(plain, probe_images, aug, **feature_kw)  # its statistics after that forward
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        assert ddp.is_dist() and dist.get_backend() == backend
        rows = torch.arange(12.0).view(6, 2)
        for got in (ddp.all_gather_cat(rows), gather_global_batch(rows, 6)):
            assert got.device.type == "cpu" and torch.equal(got, rows)
        model = EMPSSLModel(**MODEL_KW).to(dev)
        model.load_state_dict(plain.state_dict())
        if dev.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
        feats = extract_features(model, probe_images, aug, **feature_kw)
        assert feats.device.type == "cpu"
        torch.testing.assert_close(feats, feats_plain, rtol=1e-5, atol=1e-5)
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index or 0] if dev.type == "cuda"
                                                        else None)
        _, z = net(x)
        loss, _ = emp_ssl_loss(z, 4, gather=ddp.gather_patch_blocks)
        loss.backward()
        torch.testing.assert_close(loss.detach(), loss_plain.detach(), rtol=1e-4, atol=1e-4)
        grads = dict(model.named_parameters())
        for name, p in plain.named_parameters():
            assert rel_err(grads[name].grad, p.grad) < 1e-3, name
    finally:
        dist.destroy_process_group()


class _SignalAt(SupervisedPlugin):
    """Sends this process SIGTERM at the end of update `step` (1-based), as a scheduler or Ctrl-C would."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def after_training_iteration(self, strategy, **kwargs):
        if strategy.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("signal_at, eval_every, on_cuda", [(4, 1, 5), (3, 1, 3), (3, 2, 4)])
def test_a_signal_in_a_process_group_stops_after_the_agreed_update(dev, signal_at, eval_every, on_cuda):
    """GracefulStop in a process group (NCCL on CUDA, gloo in the dry run), where every rank must stop after the
    same update: the ranks all-reduce whether any was signalled after each update. Over gloo the flag is read at
    once: the stop comes after the signalled update. On CUDA it is read `lag` (1) updates later, from pinned memory,
    so that the host never waits for the update it just launched: SIGTERM at update 4 stops after 5 (a flag never
    read would stop at the experience's end, after 6). At the end of an evaluated experience it is read at once
    (the evaluation synchronised anyway): SIGTERM at update 3, the first experience's last, stops after 3; where
    that experience is not evaluated (stream.eval_every 2; online mini-experiences end after about every update)
    nothing is read there, and it stops after 4."""
    import torch.distributed as dist

    from streaming_ssl.plugins import EvalSchedule, GracefulStop, Interrupted

    stop = GracefulStop(lag=1)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    old = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(Interrupted, match="stopped by signal 15 at update (\\d)") as info:
            _train_small_stream(dev, lambda model: [], EvalSchedule([0, 1], eval_every), _SignalAt(signal_at), stop)
    finally:
        stop.close()
        dist.destroy_process_group()
    assert signal.getsignal(signal.SIGTERM) is old  # the handler is put back
    assert str(info.value).endswith(f"at update {on_cuda if dev.type == 'cuda' else signal_at}")


def test_a_new_streams_tensor_is_copied_to_the_device_even_where_the_old_ones_id_is_reused(dev):
    """The strategy keeps one copy of the stream's tensor on the device (a batch is an index there). Each of these
    streams' tensors is freed before the next is made, so Python may give the next one the same id(): the copy
    must still be the new tensor's, and asking again for the same tensor must not copy it again."""
    model = EMPSSLModel(**CPU_NARROW_MODEL_KW)
    strategy = EMPSSLStrategy(model=model, optimizer=LARS(param_groups(model, 1e-4), lr=0.3),
                              augment=MultiPatchAugment(2, 8), batch_size=4, device=dev, channels_last=False)
    for seed in range(12):
        host = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
        targets = torch.full((6,), seed)
        x, y, index_device = strategy._on_device(host, targets)
        assert torch.equal(x.cpu(), host) and torch.equal(y.cpu(), targets)
        again = strategy._on_device(host, targets)
        assert again[0] is x and again[1] is y
        if dev.type == "cuda":
            assert x.device.type == "cuda" and index_device == dev
        else:
            assert x is host and index_device is None  # on the CPU the tensor is used where it is
        del host, targets, x, y, again
