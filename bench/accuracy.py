#!/usr/bin/env python
"""Accuracy on the real CIFAR-10: one-pass EMP-SSL offline and as streams (issue: accuracy rows).

Not a test. Each row trains (or resumes) a run through run_stream.py in a subprocess, then probes its
final checkpoint with evaluate.py: linear probe on h, whole image and bag of features over 16
patches, probe fitted on all 50,000 training images, final-epoch accuracy. Results accumulate in
bench/results/accuracy.json (rows already there are kept) and as a Markdown table in
bench/results/accuracy.md. Rerunning continues an interrupted row from its checkpoint.

    python bench/accuracy.py --rows offline_1epoch random_init        # about 1.5 h on 2 CPU cores
    python bench/accuracy.py --rows split_cifar10 online_cifar10 offline_3epochs
    python bench/accuracy.py --rows offline_1epoch split_cifar10 --bn-recalibrate 10000 --probes whole

--bn-recalibrate N adds probes of the same checkpoints with BatchNorm statistics re-estimated on N training
images (evaluate.py --bn-recalibrate), kept next to the plain ones and reported in a table of their own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# every trained row is one config file of configs/accuracy/ (same encoder: ResNet-18 width 1/4, 20 patches)
ROWS = {
    "random_init": None,  # probed on the offline_1epoch architecture with --random-init
    "offline_1epoch": "configs/accuracy/offline_1epoch.yaml",
    "split_cifar10": "configs/accuracy/split_cifar10.yaml",
    "online_cifar10": "configs/accuracy/online_cifar10.yaml",
    "offline_3epochs": "configs/accuracy/offline_3epochs.yaml",
}


def run(cmd: list[str], log_path: Path) -> float:
    t0 = time.time()
    with log_path.open("a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        subprocess.run(cmd, cwd=REPO, check=True, stdout=log, stderr=subprocess.STDOUT)
    return time.time() - t0


def probe(ckpt_dir: Path, patches: int, log_path: Path, random_init: bool = False, bn_recalibrate: int = 0) -> dict:
    """evaluate.py on the run's last checkpoint: the default probe, the held-out-selected one, and kNN. Features are
    cached in the run directory, so a rerun (or another probe setting) does not extract them again."""
    out = ckpt_dir / f"probe_p{patches}{'_random' if random_init else ''}{f'_bn{bn_recalibrate}' * bool(bn_recalibrate)}.json"
    cmd = ["python", "evaluate.py", "--checkpoint", str(ckpt_dir), "--patches", str(patches), "--knn",
           "--probe-select", "--features-cache", str(ckpt_dir / "features"), "--bn-recalibrate", str(bn_recalibrate),
           "--out", str(out)] + (["--random-init"] if random_init else [])
    seconds = run([sys.executable, *cmd[1:]], log_path)
    result = json.loads(out.read_text())["cifar10"]
    return {"linear": result["linear"], "linear_selected": result["linear_selected"], "knn": result.get("knn"),
            "probe": result.get("probe"), "bn_recalibrate": bn_recalibrate, "seconds": seconds,
            "command": " ".join(cmd)}


LABELS = {"random_init": "random-init encoder (floor)", "offline_1epoch": "offline, 1 epoch (i.i.d. one pass)",
          "split_cifar10": "Split CIFAR-10, 5 x 2 classes, one pass", "online_cifar10": "online, mini-experiences of 10",
          "offline_3epochs": "offline, 3 epochs"}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _probe_cell(probe: dict) -> str:
    """'as run / held-out decay (wd ..)' for one probe result."""
    if not probe:
        return "-"
    sel = probe.get("linear_selected") or {}
    held = f" / {_pct(sel.get('accuracy'))} (wd {sel['weight_decay']:g})" if sel else ""
    return f"{_pct(probe.get('linear'))}{held}"


def report(results: dict, out_dir: Path, patches: int = 16) -> None:
    """accuracy.md (the table, then the accuracy matrix of every multi-experience row) and accuracy.png."""
    bag = f"probe_bof{patches}"
    lines = [f"| row | samples seen | linear, whole image: as run / held-out decay | linear, bag of {patches}: as run / "
             "held-out decay | kNN whole / bag | avg forgetting (whole image) | train + stream eval time |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in ROWS:
        if name not in results:
            continue
        r = results[name]
        forget = r.get("avg_forgetting")
        wall = r.get("train_and_stream_eval_seconds")
        knn = f"{_pct(r.get('probe_whole', {}).get('knn'))} / {_pct(r.get(bag, {}).get('knn'))}"
        lines.append(f"| {LABELS[name]} | {r['samples_seen']:,} | {_probe_cell(r.get('probe_whole'))} | "
                     f"{_probe_cell(r.get(bag))} | {knn} | "
                     f"{'-' if forget is None else f'{100 * forget:.1f} pts'} | "
                     f"{'-' if not wall else f'{wall / 60:.0f} min'} |")
    for name in ROWS:
        matrix = results.get(name, {}).get("accuracy_matrix") or []
        if len(matrix) < 2:
            continue
        lines += ["", f"Accuracy matrix of {name} (whole-image probe after each evaluation; row t: after experience "
                  "t, column j: test classes of experience j):", "",
                  "| after | " + " | ".join(f"exp {j + 1}" for j in range(len(matrix[0]))) + " |",
                  "| --- |" + " --- |" * len(matrix[0])]
        lines += [f"| {t + 1} | " + " | ".join(f"{100 * a:.1f}" for a in row) + " |" for t, row in enumerate(matrix)]
    recal = [n for n in ROWS if n in results and ("probe_whole_bn" in results[n] or f"{bag}_bn" in results[n])]
    if recal:
        lines += ["", "Same checkpoints, BatchNorm running statistics re-estimated before probing (`evaluate.py "
                  "--bn-recalibrate N`, N training images in the probed form):", "",
                  f"| row | images | linear, whole image: as run / held-out decay | linear, bag of {patches}: as run / "
                  "held-out decay | kNN whole / bag |", "| --- | --- | --- | --- | --- |"]
        for name in recal:
            r = results[name]
            whole, bof = r.get("probe_whole_bn") or {}, r.get(f"{bag}_bn") or {}
            n = whole.get("bn_recalibrate") or bof.get("bn_recalibrate")
            lines.append(f"| {LABELS[name]} | {n:,} | {_probe_cell(whole)} | {_probe_cell(bof)} | "
                         f"{_pct(whole.get('knn')) if whole else '-'} / {_pct(bof.get('knn')) if bof else '-'} |")
    (out_dir / "accuracy.md").write_text("\n".join(lines) + "\n")
    _plot(results, out_dir / "accuracy.png", bag, patches)


def _plot(results: dict, path: Path, bag: str, patches: int) -> None:
    """Grouped bars: every row's probe accuracy (held-out decay where measured, else as run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ROWS if n in results]
    if not names:
        return

    def acc(probe: dict | None) -> float:
        if not probe:
            return float("nan")
        sel = probe.get("linear_selected") or {}
        return 100 * sel.get("accuracy", probe.get("linear", float("nan")))

    fig, ax = plt.subplots(figsize=(max(6.0, 1.8 * len(names)), 4.5))
    width = 0.38
    for k, (key, label) in enumerate((("probe_whole", "whole image"), (bag, f"bag of {patches} patches"))):
        xs = [i + (k - 0.5) * width for i in range(len(names))]
        ys = [acc(results[n].get(key)) for n in names]
        bars = ax.bar(xs, ys, width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.axhline(75, color="gray", ls="--", lw=1, label="one-pass target (bag)")
    ax.set_xticks(range(len(names)), [LABELS[n].replace(", ", ",\n", 1) for n in names], fontsize=8)
    ax.set_ylabel("linear probe accuracy on CIFAR-10 test (%)")
    ax.set_ylim(0, 100)
    ax.set_title("EMP-SSL on CIFAR-10, ResNet-18 width 1/4, 20 patches\n"
                 "linear probe, weight decay chosen on held-out training images", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--runs", default="runs/accuracy", help="where the runs live (resumed when present)")
    p.add_argument("--out", default="bench/results/accuracy.json")
    p.add_argument("--patches", type=int, default=16, help="bag-of-features patches of the second probe")
    p.add_argument("--probes", nargs="+", default=["whole", "bag"], choices=["whole", "bag"],
                   help="which probes to run (a row's other probes already in the JSON are kept)")
    p.add_argument("--bn-recalibrate", type=int, default=0, metavar="N",
                   help="probe with BatchNorm statistics re-estimated on N training images, stored as *_bn next to "
                        "the plain probes")
    p.add_argument("--report-only", action="store_true",
                   help="only redraw accuracy.md and accuracy.png from the JSON in --out (no training, no probing)")
    args = p.parse_args()
    out = REPO / args.out
    if args.report_only:
        if not out.is_file():
            p.error(f"--report-only: no results at {out}; run some rows first")
        report(json.loads(out.read_text()), out.parent, args.patches)
        print((out.parent / "accuracy.md").read_text())
        return 0
    env_ok = os.environ.get("STREAMING_SSL_DATA")
    if not env_ok:
        p.error("set STREAMING_SSL_DATA to the folder holding cifar10.npz")
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.exists() else {}
    runs = REPO / args.runs
    runs.mkdir(parents=True, exist_ok=True)
    suffix = "_bn" if args.bn_recalibrate else ""

    def probes(ckpt_dir: Path, log_path: Path, random_init: bool = False) -> dict:
        wanted = {"whole": ("probe_whole", 0), "bag": (f"probe_bof{args.patches}", args.patches)}
        return {key + suffix: probe(ckpt_dir, patches, log_path, random_init, args.bn_recalibrate)
                for kind, (key, patches) in wanted.items() if kind in args.probes}

    for name in args.rows:
        log_path = runs / f"{name}.log"
        if name == "random_init":
            base = runs / "offline_1epoch"
            if not (base / "ckpt.pt").exists():
                print("random_init needs the offline_1epoch run first (its architecture)", file=sys.stderr)
                continue
            row = {"samples_seen": 0, "train_seconds": 0.0, "command": "evaluate.py --random-init (same architecture)",
                   **probes(base, log_path, True)}
        else:
            run_dir = runs / name
            fresh = ["python", "run_stream.py", "--config", ROWS[name], f"run.out_dir={run_dir}"]
            seconds = 0.0
            if not (run_dir / "summary.json").exists():  # written when a run has finished
                resume = (run_dir / "config.yaml").exists()
                cmd = ["run_stream.py", "--resume", str(run_dir)] if resume else fresh[1:]
                seconds = run([sys.executable, *cmd], log_path)  # "python" in the recorded command: this interpreter
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            last = rows[-1]
            row = {"command": " ".join(fresh), "config": ROWS[name],
                   "samples_seen": last["samples_seen"], "updates": last["updates"],
                   "train_and_stream_eval_seconds": last["time/wall_seconds"],
                   "stream_final_probe_whole_10k": last["probe/acc_all"],
                   "accuracy_matrix": [r["probe/acc_matrix_row"] for r in rows],
                   "avg_forgetting": last.get("probe/avg_forgetting"), **probes(run_dir, log_path)}
            if seconds:
                row["this_session_seconds"] = seconds
        results[name] = {**results.get(name, {}), **row}  # probes not rerun this time are kept
        out.write_text(json.dumps(results, indent=2))
        print(name, json.dumps({k: v for k, v in row.items() if k != "accuracy_matrix"}), flush=True)
    report(results, out.parent, args.patches)
    print((out.parent / "accuracy.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
