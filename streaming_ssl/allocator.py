"""The memory allocator of CPU runs, chosen once at the start of the command-line tools.

glibc's malloc hands large buffers (a step's activations) back to the kernel when they are freed and
faults them in again the next step: on CPU a third of the time can go to system time and page
faults. glibc reads its tunables, and LD_PRELOAD takes effect, only when a process starts, so
run_stream.py and evaluate.py re-execute themselves once, before any work, with the setting in their
environment. STREAMING_SSL_ALLOCATOR picks it:

    auto      (default) "tuned" on CPU runs on Linux/glibc; nothing on CUDA runs or elsewhere
    system    leave the process as it was started
    tuned     glibc with mmap_threshold 4 GiB and trim_threshold 64 GiB: freed memory stays in the
              process (faster steps; resident memory stays at its peak, see README "Speed")
    jemalloc  LD_PRELOAD of libjemalloc.so.2 (Debian/Ubuntu: libjemalloc2)
    tcmalloc  LD_PRELOAD of libtcmalloc_minimal.so.4 (Debian/Ubuntu: libtcmalloc-minimal4)

A GLIBC_TUNABLES or LD_PRELOAD already in the environment is the user's choice: auto leaves it alone.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

ENV = "STREAMING_SSL_ALLOCATOR"
APPLIED = "STREAMING_SSL_ALLOCATOR_APPLIED"  # set in the re-executed process: never twice
CHOICES = ("auto", "system", "tuned", "jemalloc", "tcmalloc")
TUNED = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=68719476736"
LIBS = {"jemalloc": ("libjemalloc.so.2", "libjemalloc2"), "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc-minimal4")}
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


class AllocatorError(ValueError):
    """A bad STREAMING_SSL_ALLOCATOR, or an allocator library that is not installed."""


def find_library(name: str) -> str | None:
    for d in LIB_DIRS:
        if Path(d, LIBS[name][0]).is_file():
            return str(Path(d, LIBS[name][0]))
    return None


def plan(env: dict, device_type: str, *, glibc: bool = True) -> tuple[str, dict[str, str]]:
    """(what is in effect, environment variables to add by re-executing); pure, for the tests."""
    choice = env.get(ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise AllocatorError(f"{ENV}={env.get(ENV)!r} is not an allocator; valid: {', '.join(CHOICES)}")
    if env.get(APPLIED):
        return env[APPLIED], {}
    if choice == "system":
        return "system", {}
    if choice == "auto":
        if device_type != "cpu" or not glibc:
            return "system", {}
        if env.get("GLIBC_TUNABLES") or env.get("LD_PRELOAD"):
            return "user (GLIBC_TUNABLES/LD_PRELOAD)", {}
        choice = "tuned"
    if choice == "tuned":
        return "tuned", {"GLIBC_TUNABLES": TUNED, APPLIED: "tuned"}
    lib = find_library(choice)
    if lib is None:
        raise AllocatorError(f"{ENV}={choice}: {LIBS[choice][0]} not found in {', '.join(LIB_DIRS)}; install it "
                             f"(Debian/Ubuntu: apt-get install {LIBS[choice][1]}) or use {ENV}=tuned")
    preload = ":".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    return choice, {"LD_PRELOAD": preload, APPLIED: choice}


def reexec_if_needed(device_type: str) -> str:
    """Re-execute this script with the allocator of plan() when it adds anything; returns what is in effect.

    Call only from a script's `if __name__ == "__main__":` block, before any work (never from a library)."""
    effect, add = plan(dict(os.environ), device_type, glibc=platform.libc_ver()[0] == "glibc")
    if add:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, {**os.environ, **add})  # the interpreter options too
    return effect


def in_effect(env: dict) -> str:
    """What this process runs with, for the run header: our choice, the user's settings, or glibc as is."""
    if env.get(APPLIED):
        return env[APPLIED]
    if env.get("GLIBC_TUNABLES") or env.get("LD_PRELOAD"):
        return "user (GLIBC_TUNABLES/LD_PRELOAD)"
    return "system"


def device_type_of(setting: str) -> str:
    """'cpu' or 'cuda' for a train.device setting (auto: cuda when a GPU is visible)."""
    if setting in ("cpu", "cuda"):
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
