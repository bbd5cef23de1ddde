"""Device and precision: one code path for CPU and CUDA."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import shutil

import torch

from streaming_ssl.config import ConfigError

log = logging.getLogger(__name__)


def resolve_device(name: str = "auto", local_rank: int = 0, *, setting: str = "train.device") -> torch.device:
    """'auto' -> cuda:<local_rank> when CUDA is available, else cpu; 'cuda' without CUDA is an error naming
    `setting`, where the device was asked for (a config key, or a command-line flag such as "--device")."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            sep = " " if setting.startswith("-") else "="
            raise ConfigError(f"{setting} is 'cuda' but no CUDA device is visible; use {setting}{sep}cpu or "
                              f"{setting}{sep}auto")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, which a batch scheduler (SLURM's --cpus-per-task) or a
    container sets and os.cpu_count() ignores; os.cpu_count() where affinity is unknown."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def loader_workers_default(device_type: str, cores: int, local_world: int = 1) -> int:
    """DataLoader workers that decode lazily stored images (ImageNet-100) for one rank: on CUDA the rank's share of
    the cores, since every rank of a node decodes at once (at least 1, at most 8); 0 on the CPU, whose cores
    train."""
    if device_type != "cuda":
        return 0
    return max(1, min(8, cores // max(1, local_world)))


def shm_free_bytes(path: str = "/dev/shm") -> int | None:
    """Free bytes of /dev/shm, through which DataLoader workers hand their batches over; None without it."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def workers_within_shm(wanted: int, batch_bytes: int, free: int | None, prefetch: int = 2) -> int:
    """The most DataLoader workers, up to `wanted`, whose batches in flight fit in `free` bytes of /dev/shm: a
    worker puts its batches into shared memory and keeps up to `prefetch` of them waiting there, so with a factor 2
    of margin (the batches the main process still holds) a worker needs 2 * prefetch * batch_bytes. A container's
    64 MB /dev/shm (Docker's default) holds no worker of 24.6 MB batches: 0, the main process loads them, instead
    of a bus error in a worker. `free` None (no /dev/shm): `wanted`."""
    if free is None:
        return wanted
    return max(0, min(wanted, free // (2 * prefetch * max(batch_bytes, 1))))


def cpu_supports_bf16() -> bool:
    """True when oneDNN has native bf16 kernels on this CPU (AVX512-BF16 / AMX); else bf16 is emulated and slow."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# the instruction sets that decide the CPU's training speed, in the order a reader compares machines by
_CPU_ISA = (("avx2", "AVX2"), ("avx512f", "AVX512"), ("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX-BF16"))


def cpu_kind(cpuinfo: str | None = None) -> str:
    """The CPU as figures must name it: model name, x86 family/model (a bare 'Intel Xeon Processor' says neither
    generation), the ISA that sets the speed, and the precision `train.precision=auto` gives (torch decides native
    bf16). `cpuinfo`: /proc/cpuinfo's text (read when None; any of its fields may be missing, as on ARM)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as fh:
                cpuinfo = fh.read()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:  # the first processor's fields
            fields[key.strip()] = value.strip()
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    flags = set(fields.get("flags", "").split())
    isa = "/".join(label for flag, label in _CPU_ISA if flag in flags) or "no AVX2"
    precision = "bf16" if cpu_supports_bf16() else "fp32"
    return f"{name}, {usable_cores()} cores, {isa}: {precision}"


def compile_backends() -> list[str]:
    """The names torch.compile takes as backend (torch's own test-only ones left out)."""
    from torch._dynamo import list_backends

    return [b for b in list_backends(exclude_tags=()) if "TESTING" not in b]


def cuda_supports_bf16(device: torch.device) -> bool:
    """True when the GPU has bf16 tensor cores: compute capability 8.0 or later (A100, H100, L4, RTX 30xx and
    after), or ROCm (as PyTorch reports it). `torch.cuda.is_bf16_supported()` also says yes on a V100 or T4 (7.x),
    where bf16 is emulated without tensor cores."""
    if torch.version.hip:
        return True
    return torch.cuda.get_device_properties(device).major >= 8


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for float32. 'auto' picks bf16 where it is native: GPUs of compute capability
    8.0 and later, and CPUs with AVX512-BF16 or AMX; float32 elsewhere ('bf16' forces it). 'fp16' is float16,
    trained with dynamic loss scaling (EMPSSLStrategy): never chosen by 'auto', the fast choice on a V100 or T4."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type == "cpu":
            log.warning("precision fp16 on the CPU: most CPUs emulate float16 arithmetic (5x to 35x slower than "
                        "float32 on a Zen 4 EPYC); use train.precision=auto (bf16 where native) for speed")
        return torch.float16
    if device.type == "cuda":
        if cuda_supports_bf16(device):
            return torch.bfloat16
        log.info("precision auto: %s (compute capability %d.%d) has no native bf16: training in float32 "
                 "(train.precision=fp16 uses its tensor cores, with loss scaling)",
                 torch.cuda.get_device_name(device), *torch.cuda.get_device_capability(device))
        return None
    return torch.bfloat16 if cpu_supports_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` on `device`, or a null context for float32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def no_autocast(device_type: str):
    """Autocast switched off on `device_type` (float32 inside an autocast region); a null context on a device
    without autocast (such as meta, on which tests trace the training step)."""
    if not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor (say, indices drawn by a CPU generator) on `device`, without the host waiting for the device:
    on CUDA it is copied from pinned memory with non_blocking (a pageable copy synchronises the stream);
    elsewhere a plain .to(device)."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
