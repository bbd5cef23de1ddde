"""bench/speed.py runs end to end in --tiny mode and writes a complete, well-formed JSON (no timing thresholds)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEED = ROOT / "bench" / "speed.py"
DATA = os.environ.get("STREAMING_SSL_DATA")
pytestmark = pytest.mark.skipif(not DATA or not (Path(DATA) / "cifar10.npz").is_file(),
                                reason="needs the real CIFAR-10: set STREAMING_SSL_DATA to the folder of cifar10.npz")

CASES = ("reference", "ours", "model_only", "ours_lean", "ours_lowmem", "objective", "augment", "online", "probe",
         "memory")
OPT_IN = ("ours_fp32", "ours_fp16", "ours_fp16_hostread", "ours_replay", "ours_minred", "ours_trainlog")


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SPEED), *args], cwd=str(ROOT), capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "STREAMING_SSL_DATA": DATA})


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("speed") / "speed.json"
    # one thread: on a shared, loaded machine two OpenMP threads can stall on each other for seconds per step;
    # every default case and the opt-in ones of OPT_IN (one start for all)
    proc = _run(["--tiny", "--only", ",".join(CASES + OPT_IN), "--out", str(out), "--device", "cpu",
                 "--threads", "1"])
    assert proc.returncode == 0, f"speed.py --tiny failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert "ours_over_reference_patches_per_s" in proc.stdout  # the table was printed
    return json.loads(out.read_text())


def test_every_case_ran_without_error(tiny_result):
    rows = tiny_result["rows"]
    assert sorted(r["case"] for r in rows) == sorted(CASES + OPT_IN)
    for r in rows:
        assert "error" not in r, f"{r['case']}: {r.get('error')}\n{r.get('traceback')}"
        assert r["width"] == 0.125 and r["device"] == "cpu" and r["threads"] == 1
    assert tiny_result["meta"]["mode"] == "tiny"
    assert tiny_result["meta"]["sizes"]["batch"] == 8 and tiny_result["meta"]["sizes"]["patches"] == 4


def test_step_cases_report_positive_throughput(tiny_result):
    rows = {r["case"]: r for r in tiny_result["rows"]}
    for case in ("reference", "ours", "model_only", "ours_lean", "ours_lowmem"):
        r = rows[case]
        assert _positive(r["seconds_per_step"]) and _positive(r["patches_per_s"]) and _positive(r["images_per_s"])
        assert _positive(r["peak_rss_MB"]), case
        assert r["steps"] == 2 and _positive(r["step_seconds"]["min"]) and r["warmup_steps"] == 1
        assert r["patches_per_s"] == pytest.approx(8 * 4 / r["seconds_per_step"])
    assert rows["reference"]["channels_last"] is False and rows["reference"]["dataloader_workers"] >= 1
    assert _positive(rows["reference"]["workers_peak_rss_MB"])
    assert rows["ours_lowmem"]["recompute_stages"] == 2 and rows["ours"]["recompute_stages"] == 0
    assert rows["ours_lean"]["recompute_stages"] == 0
    assert [rows[c]["recompute_bn_relu"] for c in ("ours", "ours_lean", "ours_lowmem")] == [False, True, True]
    for key in ("seconds_per_call", "reference_seconds_per_call", "reference_over_ours"):
        assert _positive(rows["objective"][key]), key
    for key in ("seconds_per_batch", "patches_per_s", "reference_serial_seconds_per_batch"):
        assert _positive(rows["augment"][key]), key
    kornia = rows["augment"]["kornia"]  # optional: measured when installed, otherwise says so
    try:
        import kornia as _  # noqa: F401
    except ImportError:
        assert kornia == "not measured (optional, not installed)"
    else:
        assert _positive(kornia["patches_per_s"]) and _positive(kornia["kornia_over_ours_seconds"])


def test_stream_probe_and_memory_cases(tiny_result):
    rows = {r["case"]: r for r in tiny_result["rows"]}
    online = rows["online"]
    assert _positive(online["online"]["samples_per_s"]) and _positive(online["one_experience"]["samples_per_s"])
    assert online["online"]["training_experiences"] > online["one_experience"]["training_experiences"] == 1
    assert _positive(online["online_over_one_experience"])
    probe = rows["probe"]
    for key in ("extract_train_seconds", "extract_test_seconds", "probe_fit_seconds", "eval_seconds",
                "train_step_seconds", "train_pass_seconds", "eval_over_pass"):
        assert _positive(probe[key]), key
    assert _positive(probe["cifar10_extrapolated"]["eval_over_pass"])
    memory = rows["memory"]
    assert memory["experiences"] == 5 and len(memory["per_experience"]) == 5
    for reading in memory["per_experience"]:
        assert _positive(reading["VmHWM_kB"]) and _positive(reading["VmRSS_kB"])
    assert math.isfinite(memory["peak_growth_pct"]) and math.isfinite(memory["rss_growth_pct"])


def test_summary_has_every_ratio(tiny_result):
    groups = tiny_result["summary"]["by_group"]
    assert list(groups) == ["cpu|width=0.125|inherited"]
    ratios = groups["cpu|width=0.125|inherited"]["ratios"]
    expected = {"ours_over_reference_patches_per_s": (">=", 4.0), "ours_over_model_only": (">=", 0.92),
                "objective_share_of_step": ("<=", 0.02), "online_over_one_experience": (">=", 0.8),
                "probe_eval_over_one_pass": ("<=", 0.1), "memory_growth_pct_exp1_to_exp5": ("<=", 5.0)}
    for name, (op, target) in expected.items():
        r = ratios[name]
        assert (r["op"], r["target"]) == (op, target) and r["n"] == 1 and isinstance(r["met"], bool)
        assert math.isfinite(r["median"]) and (name.startswith("memory") or r["median"] > 0), name
    assert _positive(ratios["augment_share_of_step"]["median"])
    for name in ("peak_rss_ours_over_reference", "peak_rss_ours_lean_over_reference",
                 "peak_rss_ours_lowmem_over_reference", "ours_lowmem_over_reference_patches_per_s",
                 "ours_lean_over_ours_patches_per_s"):
        assert _positive(ratios[name]["median"]) and "target" not in ratios[name], name  # targets: full width only


def test_worker_mode_prints_one_json_line(tmp_path):
    """The subprocess protocol of the full mode: --case X --width W prints one result line."""
    proc = _run(["--tiny", "--case", "objective", "--width", "0.125", "--allocator-label", "tuned", "--threads", "1"],
                timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("SPEED_JSON ")]
    assert len(lines) == 1
    row = json.loads(lines[0][len("SPEED_JSON "):])
    assert row["case"] == "objective" and row["allocator"] == "tuned" and _positive(row["seconds_per_call"])


def test_unknown_allocator_is_refused_before_any_work():
    proc = _run(["--allocators", "default,mimalloc", "--out", os.devnull], timeout=120)
    assert proc.returncode != 0 and "unknown allocator(s) ['mimalloc']" in proc.stderr
    assert "jemalloc" in proc.stderr and "[1/" not in proc.stderr


def test_case_major_order_puts_the_last_case_last_at_every_width():
    """--order case (the GPU check's): every width of a case before the next case, so a time limit cuts only the
    cases listed last; the default stays width-major; allocators alternate per repeat either way."""
    code = ("import json, sys; sys.path.insert(0, 'bench'); import speed; "
            "print(json.dumps([speed.make_plan(['a', 'b'], [0.25, 1.0], ['cuda'], ['x', 'y'], 2, o) "
            "for o in ('case', 'width')]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    by_case, by_width = json.loads(proc.stdout.splitlines()[-1])
    first = [(w, c, a) for r, _, w, c, a in by_case if r == 0]
    assert first == [(0.25, "a", "x"), (0.25, "a", "y"), (1.0, "a", "x"), (1.0, "a", "y"),
                     (0.25, "b", "x"), (0.25, "b", "y"), (1.0, "b", "x"), (1.0, "b", "y")]
    assert [(w, c) for r, _, w, c, _ in by_width if r == 0][::2] == [(0.25, "a"), (0.25, "b"), (1.0, "a"), (1.0, "b")]
    assert [a for r, *_, a in by_case if r == 1][:2] == ["y", "x"]  # second repeat: allocators reversed
    assert sorted(map(tuple, by_case)) == sorted(map(tuple, by_width))  # the same runs, only reordered


def test_the_fp32_case_turns_autocast_off_and_ours_follows_the_cpu(tiny_result):
    """ours_fp32 (opt-in) is `ours` with train.precision=fp32, so `ours_over_ours_fp32` is what bf16 buys: ours
    takes bf16 exactly where the CPU has it natively, ours_fp32 never."""
    from streaming_ssl.device import cpu_supports_bf16

    result = tiny_result
    rows = {r["case"]: r for r in result["rows"]}
    assert all("error" not in rows[c] for c in ("ours", "ours_fp32"))
    assert rows["ours"]["amp_dtype"] == ("torch.bfloat16" if cpu_supports_bf16() else "None")
    assert rows["ours_fp32"]["amp_dtype"] == "None" and _positive(rows["ours_fp32"]["patches_per_s"])
    ratio = result["summary"]["by_group"]["cpu|width=0.125|inherited"]["ratios"]["ours_over_ours_fp32"]
    assert _positive(ratio["median"]) and ratio["n"] == 1


def test_the_fp16_case_trains_in_float16_with_a_loss_scaler(tiny_result):
    """ours_fp16 (opt-in) is `ours` with train.precision=fp16: float16 autocast and the strategy's loss scaler, whose
    skipped updates the row reports; `ours_over_ours_fp16` is in the summary (on a GPU: what the scaler costs)."""
    rows = {r["case"]: r for r in tiny_result["rows"]}
    r = rows["ours_fp16"]
    assert r["amp_dtype"] == "torch.float16" and _positive(r["patches_per_s"]) and r["loss_finite"]
    assert isinstance(r["skipped_updates"], int) and 0 <= r["skipped_updates"] <= r["warmup_steps"] + r["steps"]
    assert "skipped_updates" not in rows["ours"] and "skipped_updates" not in rows["ours_fp32"]
    ratios = tiny_result["summary"]["by_group"]["cpu|width=0.125|inherited"]["ratios"]
    assert _positive(ratios["ours_over_ours_fp16"]["median"]) and ratios["ours_over_ours_fp16"]["n"] == 1
    # ours_fp16_hostread: the same run with LARS's amp contract off (GradScaler decides on the host); on the CPU
    # LARS's loop decides on the host in both, on a GPU ours_fp16 on the device
    host = rows["ours_fp16_hostread"]
    assert host["amp_dtype"] == "torch.float16" and _positive(host["patches_per_s"]) and host["loss_finite"]
    assert r["lars_amp_contract"] and not host["lars_amp_contract"]
    assert r["fp16_skip_on"] == host["fp16_skip_on"] == "host"
    assert host["skipped_updates"] == r["skipped_updates"]  # the same updates overflow, whoever decides
    ratio = ratios["ours_fp16_over_ours_fp16_hostread"]
    assert _positive(ratio["median"]) and ratio["n"] == 1


def test_the_replay_cases_replay_and_choose_in_every_measured_update(tiny_result):
    """ours_replay and ours_minred (opt-in): batch 8, a buffer of 16, one more warm-up update than `ours` (2, then 2
    measured): 8 buffer images join every update from the 2nd, and MinRed computes the features of its 24 candidates
    (16 held + 8 offered) at updates 3 and 4, so at the warm-up's last update and at every measured one; the
    reservoir computes none. Their ratio is in the summary."""
    rows = {r["case"]: r for r in tiny_result["rows"]}
    for case, policy, forwards in (("ours_replay", "reservoir", 0), ("ours_minred", "minred", 2 * 24)):
        r = rows[case]
        assert (r["replay_policy"], r["replay_size"], r["replay_batch"]) == (policy, 16, 8)
        assert r["warmup_steps"] == 2 and r["steps"] == 2 and _positive(r["patches_per_s"])
        assert r["counters"] == {"buffer_images": 3 * 8, "extra_forwards": forwards, "updates": 4}, case
    assert "counters" not in rows["ours"]
    ratio = tiny_result["summary"]["by_group"]["cpu|width=0.125|inherited"]["ratios"]["ours_minred_over_ours_replay"]
    assert _positive(ratio["median"]) and ratio["n"] == 1


def test_the_trainlog_case_logs_every_update_and_is_compared_with_ours(tiny_result):
    """ours_trainlog (opt-in): TrainLog writes one row per update, warm-up included (1 + 2 in --tiny), and its
    throughput over `ours` is in the summary."""
    row = {r["case"]: r for r in tiny_result["rows"]}["ours_trainlog"]
    assert row["train_log_rows"] == row["warmup_steps"] + row["steps"] == 3 and _positive(row["patches_per_s"])
    ratio = tiny_result["summary"]["by_group"]["cpu|width=0.125|inherited"]["ratios"]["ours_trainlog_over_ours"]
    assert _positive(ratio["median"]) and ratio["n"] == 1


def test_a_worker_that_hangs_after_printing_its_row_keeps_the_row(tmp_path):
    """A worker killed at --timeout keeps the row it printed before hanging (say, in a compile pool's or a loader's
    shutdown); one that printed nothing is a timeout error. The workers here are real processes that hang."""
    row = {"case": "ours", "width": 0.25, "patches_per_s": 5.0}
    hangers = {}
    for name, text in (("printed", f"echo 'SPEED_JSON {json.dumps(row)}'\n"), ("silent", "")):
        hangers[name] = tmp_path / f"{name}.sh"
        hangers[name].write_text(f"#!/bin/sh\n{text}exec sleep 60\n")
        hangers[name].chmod(0o755)
    code = ("import argparse, json, sys; sys.path.insert(0, 'bench'); import speed; out = []\n"
            f"for hanger in {[str(p) for p in hangers.values()]!r}:\n"
            "    sys.executable = hanger\n"
            "    args = argparse.Namespace(steps=None, warmup=None, batch=None, patches=None, ref_workers=None,"
            " threads=None, data=None, timeout=2)\n"
            "    out.append(speed.subprocess_row('ours', 0.25, 'cuda', 'default', 0, args))\n"
            "print(json.dumps(out))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed, silent = json.loads(proc.stdout.splitlines()[-1])
    assert printed["patches_per_s"] == 5.0 and "hung until killed at 2 s" in printed["note"] and "error" not in printed
    assert silent["error"] == "timed out after 2 s" and silent["case"] == "ours"


def test_reference_workers_fit_in_dev_shm(tmp_path):
    """DataLoader workers collate into /dev/shm: the reference gets no more workers than it holds (a worker needs
    2 x prefetch batches there), down to 0 (the main process loads) for a container's 64 MB, instead of a bus
    error in a worker; the row says so. With room, or without /dev/shm, as many as wanted."""
    batch = 100 * 20 * 3 * 32 * 32 * 4  # the full-size reference batch: 24.6 MB of float32 patches
    out = tmp_path / "speed.json"
    code = ("import json, sys; sys.path.insert(0, 'bench'); import speed; import streaming_ssl.device as sdev\n"
            f"fits = [sdev.workers_within_shm(16, {batch}, f) for f in (64 * 2**20, 2**30, 64 * 2**30, None)]\n"
            "sdev.shm_free_bytes = lambda: 0  # a /dev/shm with no room at all\n"
            f"rc = speed.main(['--tiny', '--only', 'reference', '--ref-workers', '2', '--device', 'cpu', '--threads', "
            f"'1', '--out', {str(out)!r}])\n"
            "print(json.dumps([rc, fits]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), capture_output=True, text=True, timeout=300,
                          env={**os.environ, "STREAMING_SSL_DATA": DATA})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rc, fits = json.loads(proc.stdout.splitlines()[-1])
    assert rc == 0 and fits == [0, 10, 16, 16]
    row = next(r for r in json.loads(out.read_text())["rows"] if r["case"] == "reference")
    assert "error" not in row and _positive(row["patches_per_s"])
    assert row["dataloader_workers"] == 0 and row["dataloader_workers_wanted"] == 2 and row["shm_free_MB"] == 0
    assert "0 DataLoader workers instead of 2" in row["workers_note"]
