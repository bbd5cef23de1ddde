"""Tests of streaming_ssl.allocator: which allocator a CLI re-executes itself with, and that it does so once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from streaming_ssl import allocator
from streaming_ssl.allocator import APPLIED, ENV, TUNED, AllocatorError, plan

ROOT = Path(__file__).resolve().parents[2]


def test_auto_tunes_glibc_on_cpu_only():
    assert plan({}, "cpu") == ("tuned", {"GLIBC_TUNABLES": TUNED, APPLIED: "tuned"})
    assert plan({}, "cuda") == ("system", {})
    assert plan({}, "cpu", glibc=False) == ("system", {})


def test_user_settings_win():
    assert plan({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "cpu")[1] == {}
    assert plan({"LD_PRELOAD": "/x/libjemalloc.so.2"}, "cpu")[1] == {}
    assert plan({ENV: "system"}, "cpu") == ("system", {})
    assert plan({ENV: "tuned"}, "cuda")[1]["GLIBC_TUNABLES"] == TUNED  # asked for explicitly: also on CUDA
    assert plan({APPLIED: "tuned"}, "cpu") == ("tuned", {})  # already re-executed: never again


def test_in_effect_names_what_the_process_runs_with():
    assert allocator.in_effect({APPLIED: "tcmalloc"}) == "tcmalloc"
    assert allocator.in_effect({"GLIBC_TUNABLES": "x"}).startswith("user")
    assert allocator.in_effect({}) == "system"


def test_bad_choice_and_missing_library_name_the_fix(monkeypatch):
    with pytest.raises(AllocatorError, match=r"STREAMING_SSL_ALLOCATOR='mimalloc' .* valid: auto, system, tuned"):
        plan({ENV: "mimalloc"}, "cpu")
    monkeypatch.setattr(allocator, "LIB_DIRS", ("/nonexistent",))
    with pytest.raises(AllocatorError, match="apt-get install libjemalloc2"):
        plan({ENV: "jemalloc"}, "cpu")


def test_preload_keeps_an_existing_preload(monkeypatch, tmp_path):
    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    monkeypatch.setattr(allocator, "LIB_DIRS", (str(tmp_path),))
    effect, add = plan({ENV: "jemalloc", "LD_PRELOAD": "/opt/other.so"}, "cpu")
    assert effect == "jemalloc" and add["LD_PRELOAD"] == f"{lib}:/opt/other.so" and add[APPLIED] == "jemalloc"


def _script(tmp_path: Path) -> Path:
    script = tmp_path / "cli.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from streaming_ssl.allocator import reexec_if_needed\n"
        "print('start', flush=True)\n"
        "effect = reexec_if_needed('cpu')\n"
        "print('effect', effect, os.environ.get('GLIBC_TUNABLES'), sys.argv[1:], sys.flags.optimize)\n")
    return script


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables are a Linux matter")
def test_reexecutes_once_with_the_tunables_and_the_same_arguments(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", ENV, APPLIED)}
    out = subprocess.run([sys.executable, "-O", str(_script(tmp_path)), "--flag", "a b"], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout.splitlines()
    # printed 'start' twice (before and after the exec), the rest once, with the same arguments and interpreter flags
    assert out == ["start", "start", f"effect tuned {TUNED} ['--flag', 'a b'] 1"]
    out = subprocess.run([sys.executable, str(_script(tmp_path))], env={**env, ENV: "system"}, capture_output=True,
                         text=True, timeout=60, check=True).stdout.splitlines()
    assert out == ["start", "effect system None [] 0"]
