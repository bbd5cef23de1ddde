"""bench/gpu_check.py and scripts/gpu_check.sh without a GPU: the no-CUDA exit, the time box of a step, the data
subset of scripts/fetch_gpu_wheels.sh, and the whole check in --dry-run (tiny sizes, device cpu, about 2 min here)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "bench" / "gpu_check.py"
DATA = os.environ.get("STREAMING_SSL_DATA")
needs_data = pytest.mark.skipif(not DATA or not (Path(DATA) / "cifar10.npz").is_file(),
                                reason="needs the real CIFAR-10: set STREAMING_SSL_DATA to the folder of cifar10.npz")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")


def load_module():
    spec = importlib.util.spec_from_file_location("gpu_check", CHECK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@no_cuda
def test_script_and_module_exit_2_at_once_without_cuda(tmp_path):
    site_before = (ROOT / ".gpu" / "site").exists()
    for cmd in (["bash", "scripts/gpu_check.sh"], [sys.executable, str(CHECK)]):
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHON": sys.executable})
        assert proc.returncode == 2, (cmd, proc.stdout, proc.stderr)
        assert "no CUDA device visible" in proc.stderr and "--dry-run" in proc.stderr
        assert time.monotonic() - t0 < 60  # before any wheel install or check
    assert (ROOT / ".gpu" / "site").exists() == site_before  # the script stops before installing wheels


def test_a_hung_step_is_killed_at_its_timeout(tmp_path):
    gc = load_module()
    ctx = gc.Ctx(dry=True, device="cpu", precision="bf16", data=str(tmp_path), workdir=tmp_path,
                 deadline=time.monotonic() + 60)
    t0 = time.monotonic()
    step = gc.run_step("sleeper", ["bash", "-c", "echo started; sleep 30 & wait"], ctx, timeout=1.0)
    assert step["timed_out"] and step["rc"] != 0 and "started" in step["output"]
    assert time.monotonic() - t0 < 10  # the group (bash and its sleep child) was killed


def test_a_timeout_also_ends_the_processes_a_step_started_in_sessions_of_their_own(tmp_path):
    """torchrun starts its workers with start_new_session (out of the step's process group): a timed-out step must
    not leave them running (on the GPU they would hold the device through the speed step)."""
    gc = load_module()
    ctx = gc.Ctx(dry=True, device="cpu", precision="bf16", data=str(tmp_path), workdir=tmp_path,
                 deadline=time.monotonic() + 60)
    pid_file = tmp_path / "worker.pid"
    spawn = ("import subprocess, sys, time; "
             "w = subprocess.Popen(['sleep', '60'], start_new_session=True); "
             f"open({str(pid_file)!r}, 'w').write(str(w.pid)); print('started', flush=True); time.sleep(60)")
    proc = gc.start("launcher", [sys.executable, "-c", spawn], ctx)
    end = time.monotonic() + 30
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < end:
        time.sleep(0.05)
    worker = int(pid_file.read_text())
    assert os.getsid(worker) == worker != os.getsid(proc.popen.pid)  # its own session, like a torchrun worker
    assert worker in gc.descendants(proc.popen.pid)
    step = gc.finish(proc, 0.5)
    assert step["timed_out"] and "started" in step["output"]
    end = time.monotonic() + 10
    while time.monotonic() < end and _alive(worker):
        time.sleep(0.05)
    assert not _alive(worker)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_overall_budget_caps_every_step(tmp_path):
    gc = load_module()
    ctx = gc.Ctx(dry=True, device="cpu", precision="bf16", data=str(tmp_path), workdir=tmp_path,
                 deadline=time.monotonic() + 2)
    assert 0 < ctx.timeout(100) <= 2 and ctx.timeout(0.5) == 0.5


@needs_data
def test_write_data_keeps_the_first_images_of_every_class(tmp_path):
    from scenarios.datasets import load_dataset

    dst = tmp_path / "cifar10.npz"
    proc = subprocess.run([sys.executable, str(CHECK), "--write-data", str(Path(DATA) / "cifar10.npz"), str(dst),
                           "--train-per-class", "7", "--test-per-class", "3"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with np.load(Path(DATA) / "cifar10.npz") as src, np.load(dst) as out:
        assert sorted(out.files) == sorted(src.files)
        for split, k in (("train", 7), ("test", 3)):
            y = src[f"y_{split}"]
            assert np.bincount(out[f"y_{split}"]).tolist() == [k] * 10
            first = np.sort(np.concatenate([np.flatnonzero(y == c)[:k] for c in range(10)]))
            np.testing.assert_array_equal(out[f"x_{split}"], src[f"x_{split}"][first])
    splits = load_dataset("cifar10", str(tmp_path))  # the library reads it as it reads the full file
    assert len(splits.train) == 70 and len(splits.test) == 30


def test_first_loss_of_the_recomputed_and_compiled_cases_is_held_to_ours():
    """The speed step's correctness side: a case that trains `ours`'s model on the same patches (recomputed,
    compiled) must start from `ours`'s first loss, width by width; a loss 2% off, or not finite, is a problem, and
    cases without a first loss (the reference, the model alone) or without `ours` at their width are not compared."""
    gc = load_module()
    rows = [{"case": "ours", "width": 0.25, "first_loss": -300.0}, {"case": "ours", "width": 1.0, "first_loss": -250.0},
            {"case": "ours_lowmem", "width": 0.25, "first_loss": -300.0},
            {"case": "ours_compiled", "width": 0.25, "first_loss": -300.3},
            {"case": "ours_lowmem", "width": 1.0, "first_loss": -245.0},
            {"case": "ours_compiled", "width": 1.0, "first_loss": float("nan")},
            {"case": "ours_lowmem", "width": 0.5, "first_loss": -1.0},
            {"case": "reference", "width": 0.25}, {"case": "model_only", "width": 0.25}]
    diffs = gc.first_loss_diffs(rows)
    assert set(diffs) == {"ours_lowmem@0.25", "ours_compiled@0.25", "ours_lowmem@1.0", "ours_compiled@1.0"}
    assert diffs["ours_lowmem@0.25"] == 0 and diffs["ours_compiled@0.25"] == pytest.approx(0.001)
    assert diffs["ours_lowmem@1.0"] == pytest.approx(0.02)
    bad = [k for k, d in diffs.items() if not d <= gc.FIRST_LOSS_RTOL]
    assert sorted(bad) == ["ours_compiled@1.0", "ours_lowmem@1.0"]


def test_the_resumed_runs_record_is_two_starts_on_one_machine(tmp_path):
    """e2e's resumed run must record its two starts in run_info.jsonl, the resume's after update 0, on one machine
    kind and precision; anything else (one start, a resume from 0, two kinds, a torn file) is a problem."""
    gc = load_module()

    def starts(*rows) -> list[str]:
        (tmp_path / "run_info.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return gc.run_starts(tmp_path)[1]

    a0, a5 = {"start_update": 0, "machine": "GPU", "precision": "bf16"}, {"start_update": 5, "machine": "GPU",
                                                                         "precision": "bf16"}
    assert starts(a0, a5) == []
    assert gc.run_starts(tmp_path)[0] == [a0, a5]
    assert starts(a0) == ["run_info.jsonl holds starts at updates [0], expected 0 and the resume's checkpoint"]
    assert starts(a0, {**a5, "start_update": 0})[0].startswith("run_info.jsonl holds starts at updates [0, 0]")
    assert starts(a0, {**a5, "precision": "fp32"})[0].startswith("run_info.jsonl names 2 machine kinds")
    (tmp_path / "run_info.jsonl").write_text('{"start_update": 0, "mach')
    assert gc.run_starts(tmp_path)[1][0].startswith("run_info.jsonl unreadable")


@needs_data
def test_dry_run_passes_every_check(tmp_path):
    out, work = tmp_path / "gpu_check.json", tmp_path / "work"
    # what a first try leaves in the work folder of a warm GPU machine: a second try must start clean (a run
    # directory that is not empty is refused, a stale checkpoint marker would stop the run at once)
    for name in ("plain", "torchrun", "resumed"):
        (work / name).mkdir(parents=True)
        (work / name / "metrics.jsonl").write_text('{"experience": 0, "updates": 99}\n')
    (work / "ckpt_marker.txt").write_text(f"writing {work / 'resumed' / 'ckpt_000000003.pt'}\n")
    (work / "speed.json").write_text('{"rows": [], "summary": {"by_group": {}}}')
    proc = subprocess.run([sys.executable, str(CHECK), "--dry-run", "--out", str(out), "--workdir", str(work)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "STREAMING_SSL_DATA": DATA})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["ok"] and set(report["checks"]) == {"tests", "e2e", "ddp", "speed"}
    assert report["env"]["packages"]["avalanche-lib"] == "0.6.0" and report["env"]["packages"]["numpy"]
    checks = report["checks"]
    assert checks["tests"]["counts"]["passed"] >= 6 and not checks["tests"]["counts"].get("failed")
    e2e = checks["e2e"]
    assert e2e["steps"]["stopped"]["rc"] == 130 and e2e["steps"]["stopped"]["signalled"]
    assert e2e["rows_when_stopped"] < 3 and e2e["steps"]["resume"]["rc"] == 0
    assert set(e2e["diffs_vs_plain"]) >= {"loss_rel", "tcr_rel", "inv_abs"}
    # evaluate.py probed the uninterrupted run's checkpoint beside the resume and gave the run's own last probe
    assert e2e["steps"]["evaluate"]["rc"] == 0 and e2e["evaluate"]["dataset"] == "cifar10"
    assert e2e["evaluate"]["diff"] <= report["tolerances"]["acc_abs"] and 0 < e2e["evaluate"]["linear"] <= 1
    assert checks["ddp"]["world"] == 1 and checks["ddp"]["diffs_vs_plain"]
    assert checks["ddp"]["ddp"] == "DDP over gloo, world 1, SyncBatchNorm off"  # torchrun at world 1 still wraps
    # the compile warm-up ran beside the CLI runs (on the CPU: `ours` at the tiny size) and was done before speed
    assert [w["rc"] for w in checks["speed"]["warmups"].values()] == [0]
    assert {t["name"] for t in checks["speed"]["targets"]} >= {"ours_over_reference_patches_per_s",
                                                               "ours_over_model_only"}
    for name in ("tests", "e2e", "ddp", "speed"):
        assert f"\n{name:<8} pass" in proc.stdout
    # the same report as Markdown next to the JSON: every check, every speed case measured, every target
    md = out.with_suffix(".md").read_text()
    for name in ("tests", "e2e", "ddp", "speed"):
        assert f"| {name} | pass |" in md
    cases = checks["speed"]["cases"]
    assert {c["case"] for c in cases} == {"reference", "ours", "model_only", "ours_lowmem"}
    for c in cases:
        assert f"| {c['case']} | {c['width']} | {c['patches_per_s']:.0f} |" in md
    for t in checks["speed"]["targets"]:
        assert f"| {t['name']} | {t['median']:.3g} |" in md
    # the recomputing case trained the same model on the same patches: the same first loss (the CPU: exactly)
    assert checks["speed"]["first_loss_rel"] == {"ours_lowmem@0.125": 0.0}, checks["speed"]["first_loss_rel"]
    # the information cases in the budget left (the compiled one not on the CPU): ours over each, MinRed over replay
    info = checks["speed"]["info"]
    assert set(info["ratios"]) == {"ours_over_ours_indexed@0.125", "ours_over_ours_trainlog@0.125",
                                   "ours_over_ours_replay@0.125",
                                   "ours_over_ours_minred@0.125", "ours_minred_over_ours_replay@0.125"}, info
    assert all(v > 0 for v in info["ratios"].values()) and info["errors"] == []
    assert "| | ours_minred_over_ours_replay@0.125 |" in md


def _fake_speed(ctx, strict):
    """check_speed's record without running speed.py (for the tests of the report's plumbing)."""
    return {"ok": True, "problems": [], "targets": [], "targets_missed": [], "first_loss_rel": {}, "peak_cuda_MB": {},
            "cases": [], "info": {}}


def _work_with_logs(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    (work / "plain").mkdir(parents=True)
    (work / "e2e_plain.log").write_text("the plain run's console\n")
    (work / "plain" / "train.log").write_text("world 1\n")
    (work / "plain" / "ckpt_000000005.pt").write_bytes(b"0" * 1000)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cifar10.npz").write_bytes(b"")
    return work


def test_report_and_logs_are_copied_to_the_results_dir(tmp_path, monkeypatch):
    """On the GPU machine only what lands in the device tool's $OUT comes back (8 files at most): with
    --results-dir the report, its Markdown and one tar.gz of the logs and small run files (no checkpoints) go there,
    also when a check raised, and never an earlier try's report."""
    import tarfile

    gc = load_module()
    work, out, dest = _work_with_logs(tmp_path), tmp_path / "gpu_check.json", tmp_path / "OUT"
    argv = ["--dry-run", "--only", "speed", "--data", str(tmp_path / "data"), "--workdir", str(work), "--out",
            str(out), "--results-dir", str(dest)]
    monkeypatch.setattr(gc, "check_speed", _fake_speed)
    assert gc.main(argv) == 0
    assert sorted(p.name for p in dest.iterdir()) == ["gpu_check.json", "gpu_check.md", "gpu_check_logs.tar.gz"]
    assert json.loads((dest / "gpu_check.json").read_text())["checks"]["speed"]["ok"]
    with tarfile.open(dest / "gpu_check_logs.tar.gz") as tar:
        names = tar.getnames()
    assert "e2e_plain.log" in names and "plain/train.log" in names and not any(n.endswith(".pt") for n in names)

    def broken(ctx, strict):
        raise RuntimeError("a check's own fault")

    shutil.rmtree(dest)
    monkeypatch.setattr(gc, "check_speed", broken)
    with pytest.raises(RuntimeError):
        gc.main(argv)
    assert sorted(p.name for p in dest.iterdir()) == ["gpu_check_logs.tar.gz"]  # not the first call's report

    # --out already inside the results folder (a command that names $OUT/gpu_check.json): written once, logs too
    shutil.rmtree(dest)
    monkeypatch.setattr(gc, "check_speed", _fake_speed)
    assert gc.main([*argv[:-4], "--out", str(dest / "gpu_check.json"), "--results-dir", str(dest)]) == 0
    assert sorted(p.name for p in dest.iterdir()) == ["gpu_check.json", "gpu_check.md", "gpu_check_logs.tar.gz"]


def test_a_package_that_does_not_import_ends_the_check_before_any_step(tmp_path, monkeypatch, capsys):
    """The checks' imports are tried once, in a process started as every step is (here without the checkout on
    sys.path, as `python bench/gpu_check.py` has it): every one of IMPORTS imports; a missing or clashing package
    ends the check in seconds, naming the module and its error, with no step started and no report written."""
    gc = load_module()
    work, out = _work_with_logs(tmp_path), tmp_path / "gpu_check.json"
    ctx = gc.Ctx(dry=True, device="cpu", precision="bf16", data=str(tmp_path / "data"), workdir=work,
                 deadline=time.monotonic() + 120)
    monkeypatch.setenv("PYTHONPATH", "")
    assert gc.failed_imports(ctx, gc.IMPORTS) == []
    monkeypatch.setattr(gc, "IMPORTS", ("torch", "streaming_ssl_no_such_module"))
    monkeypatch.setattr(gc, "run_checks", lambda *a: pytest.fail("a check started"))
    argv = ["--dry-run", "--data", str(tmp_path / "data"), "--workdir", str(work), "--out", str(out)]
    assert gc.main(argv) == 1
    err = capsys.readouterr().err
    assert "streaming_ssl_no_such_module: ModuleNotFoundError" in err and "torch:" not in err
    assert "nothing was started" in err and "scripts/gpu_check.sh" in err and not out.exists()


def test_gpu_check_sh_hands_the_device_out_folder_to_the_check(tmp_path):
    """scripts/gpu_check.sh passes $OUT (set by the device tool) as --results-dir, and nothing without it. Run on a
    copy of the script in a scratch tree whose wheels are already installed, with a python that records its
    arguments."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "gpu_check.sh", tmp_path / "scripts")
    (tmp_path / ".gpu" / "wheels").mkdir(parents=True)
    (tmp_path / ".gpu" / "wheels" / "demo-1.0-py3-none-any.whl").write_text("")
    (tmp_path / ".gpu" / "site").mkdir()
    stamp = subprocess.run("ls .gpu/wheels | sha256sum | cut -d' ' -f1", shell=True, cwd=tmp_path, text=True,
                           capture_output=True, check=True).stdout
    (tmp_path / ".gpu" / "site" / ".installed").write_text(stamp)
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\nfor a in \"$@\"; do echo \"$a\"; done >> {tmp_path / 'argv'}\necho -- >> "
                    f"{tmp_path / 'argv'}\n")
    fake.chmod(0o755)
    for out in ("", str(tmp_path / "out dir")):
        (tmp_path / "argv").unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "OUT"}
        env.update({"PYTHON": str(fake), **({"OUT": out} if out else {})})
        proc = subprocess.run(["bash", str(tmp_path / "scripts" / "gpu_check.sh"), "--only", "tests"], env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        preflight, check = (call.strip("\n").split("\n") for call in
                            (tmp_path / "argv").read_text().split("--\n") if call)
        assert preflight == ["bench/gpu_check.py", "--preflight", "--only", "tests"]
        assert check == ["bench/gpu_check.py", *(["--results-dir", out] if out else []), "--only", "tests"]


def test_fetch_gpu_wheels_replaces_the_wheels_of_an_earlier_fetch(tmp_path):
    """Two versions of one package in .gpu/wheels stop gpu_check.sh's install on the GPU machine (pip:
    ResolutionImpossible): a new fetch leaves only its own wheels. Run on a copy of the script, with a python that
    fakes pip and the versions of the .venv."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "fetch_gpu_wheels.sh", tmp_path / "scripts")
    (tmp_path / ".gpu" / "wheels").mkdir(parents=True)
    (tmp_path / ".gpu" / "wheels" / "requests-0.9-py3-none-any.whl").write_text("")  # an earlier fetch's
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cifar10.npz").write_text("")
    fake = tmp_path / "python"
    fake.write_text(f"#!{sys.executable}\n" + "\n".join([
        "import pathlib, sys",
        "a = sys.argv[1:]",
        "if a[0] == '-c':",
        "    print('1.0')",
        "elif a[:2] == ['-m', 'pip']:",
        "    folder = a[a.index('-d' if a[2] == 'download' else '-w') + 1]",
        "    for pin in [x for x in a if '==' in x]:",
        "        name, version = pin.split('==')",
        "        pathlib.Path(folder, f\"{name.replace('-', '_')}-{version}-py3-none-any.whl\").write_text('')",
        "elif a[0] == 'bench/gpu_check.py':",
        "    pathlib.Path(a[a.index('--write-data') + 2]).write_text('npz')",
        "else:",
        "    sys.exit(f'unexpected {a}')"]) + "\n")
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "STREAMING_SSL_DATA": str(tmp_path / "data")}
    proc = subprocess.run(["bash", str(tmp_path / "scripts" / "fetch_gpu_wheels.sh")], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    wheels = sorted(p.name for p in (tmp_path / ".gpu" / "wheels").iterdir())
    assert "requests-1.0-py3-none-any.whl" in wheels and "requests-0.9-py3-none-any.whl" not in wheels, wheels
    assert len(wheels) == 24 and all(w.endswith("-1.0-py3-none-any.whl") for w in wheels), wheels
    assert (tmp_path / ".gpu" / "data" / "cifar10.npz").read_text() == "npz"
