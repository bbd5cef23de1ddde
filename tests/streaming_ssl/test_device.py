"""cpu_kind: the name every figure carries, read from /proc/cpuinfo's text; the precision `auto` resolves to."""

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from streaming_ssl.device import cpu_kind, cpu_supports_bf16, loader_workers_default, resolve_precision, usable_cores

PRECISION = "bf16" if cpu_supports_bf16() else "fp32"  # torch decides, whatever the flags say


def _cpuinfo(name: str | None, family: str | None, model: str | None, flags: str) -> str:
    """Two processors' blocks (the second different, to show that the first is read), as the kernel writes them."""
    first = ["processor\t: 0", "vendor_id\t: GenuineIntel"]
    first += [f"cpu family\t: {family}"] if family else []
    first += [f"model\t\t: {model}"] if model else []
    first += [f"model name\t: {name}"] if name else []
    first += [f"flags\t\t: {flags}", ""]
    return "\n".join(first + ["processor\t: 1", "model name\t: another CPU", "flags\t\t: sse2", ""])


def test_an_intel_xeon_is_named_by_its_generation_and_amx() -> None:
    text = _cpuinfo("Intel(R) Xeon(R) Processor", "6", "207",
                    "fpu sse2 avx2 avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8")
    assert cpu_kind(text) == (f"Intel(R) Xeon(R) Processor (family 6 model 207), {usable_cores()} cores, "
                              f"AVX2/AVX512/AVX512-BF16/AMX-BF16: {PRECISION}")


def test_a_zen4_has_avx512_bf16_without_amx_and_an_avx2_cpu_says_so() -> None:
    zen4 = cpu_kind(_cpuinfo("AMD EPYC 9R14", "25", "17", "sse2 avx2 avx512f avx512_bf16"))
    assert zen4.startswith("AMD EPYC 9R14 (family 25 model 17), ") and "AVX2/AVX512/AVX512-BF16:" in zen4
    assert "AMX" not in zen4
    avx2 = cpu_kind(_cpuinfo("AMD EPYC 7B13", "25", "1", "sse2 avx2 fma"))
    assert avx2.endswith(f"AVX2: {PRECISION}") and "AVX512" not in avx2


def test_an_arm_cpuinfo_without_model_name_or_flags_still_names_something() -> None:
    text = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\n"
    kind = cpu_kind(text)
    name, rest = kind.split(", ", 1)
    assert name and "family" not in name
    assert rest == f"{usable_cores()} cores, no AVX2: {PRECISION}"


def test_this_machine_reads_its_own_cpuinfo() -> None:
    kind = cpu_kind()
    assert kind.endswith(f": {PRECISION}") and f"{usable_cores()} cores" in kind


@pytest.mark.parametrize("major, minor, expected", [(7, 0, None), (7, 5, None), (8, 0, torch.bfloat16),
                                                    (9, 0, torch.bfloat16)])
def test_auto_precision_on_cuda_is_bf16_only_with_bf16_tensor_cores(monkeypatch, caplog, major, minor, expected):
    """A V100 (7.0) or T4 (7.5) trains in float32 under precision auto, since PyTorch's is_bf16_supported() also
    counts its emulated bf16; an A100 (8.0) or H100 (9.0) in bf16. The GPU is described to torch's queries here
    (this machine has none); tests/test_cuda.py checks a real one."""
    props = types.SimpleNamespace(major=major, minor=minor)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    cuda = torch.device("cuda", 0)
    with caplog.at_level("INFO"):
        assert resolve_precision("auto", cuda) is expected
    assert ("no native bf16: training in float32" in caplog.text) == (expected is None)
    assert resolve_precision("bf16", cuda) is torch.bfloat16 and resolve_precision("fp32", cuda) is None


def test_usable_cores_follow_the_cpu_affinity_a_scheduler_sets():
    """SLURM's --cpus-per-task and containers restrict a process's CPU affinity; os.cpu_count() still counts the
    whole machine. A process held to one core sees one usable core, and its figures name one core."""
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from streaming_ssl.device import cpu_kind, usable_cores; print(usable_cores(), '|', cpu_kind())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    cores, kind = out.stdout.strip().split(" | ")
    assert cores == "1" and ", 1 cores, " in kind
    assert usable_cores() == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("device, cores, local_world, expected", [
    ("cuda", 64, 8, 8), ("cuda", 32, 8, 4), ("cuda", 16, 1, 8), ("cuda", 4, 8, 1), ("cuda", 8, 1, 8),
    ("cpu", 64, 1, 0),
])
def test_loader_workers_share_the_node_cores_among_its_ranks(device, cores, local_world, expected):
    """Every rank of a node decodes at once: 8 ranks on 32 cores get 4 workers each, not 8 (64 decoders on 32
    cores); a CPU run decodes in the main process, whose cores train."""
    assert loader_workers_default(device, cores, local_world) == expected
