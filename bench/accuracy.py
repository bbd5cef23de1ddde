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
    python bench/accuracy.py --rows split_cifar10_replay split_cifar10_distill split_cifar10_mixup \
        split_cifar10_replay_distill split_cifar10_replay_mixup online_cifar10_replay  # cl methods (cl/)
    python bench/accuracy.py --rows split_cifar10 split_cifar10_replay --seed 1  # a second seed: ROW@seed1

The report judges the continual-learning targets on the bag-of-16 probe (mean over seeds): the cheapest split row
that closes half of the plain split's gap to the i.i.d. one pass at <= 2x its patch forwards, and the cheapest
online row within 3 points of the i.i.d. one pass, or says that none does.

--bn-recalibrate N adds probes of the same checkpoints with BatchNorm statistics re-estimated on N training
images (evaluate.py --bn-recalibrate), kept next to the plain ones and reported in a table of their own.

Every row also keeps the run's compute counters (patches forwarded and back-propagated, buffer images,
frozen and extra forwards: streaming_ssl/accounting.py), its samples seen and wall time; accuracy_compute.png
draws each row's final accuracy against its patch forwards. Rows trained before the counters existed are
placed at samples seen x patches per image (hollow markers).

To check that a row runs at all (not for results), shrink it:
    python bench/accuracy.py --rows split_cifar10_replay --runs /tmp/acc_runs --out /tmp/acc/accuracy.json \
        --probes whole --probe-per-class 20 --set data.train_per_class=40 model.width=0.125 augment.n_patches=4
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
    # the same with the blur's kernel spanning +-3 sigma (the default now; every other row blurs with 3 taps)
    "split_cifar10_blur13": "configs/accuracy/split_cifar10_blur13.yaml",
    "online_cifar10": "configs/accuracy/online_cifar10.yaml",
    "offline_3epochs": "configs/accuracy/offline_3epochs.yaml",
    # continual-learning methods on the split_cifar10 / online_cifar10 rows (cl/; same encoder)
    "split_cifar10_replay": "configs/accuracy/split_cifar10_replay.yaml",
    "split_cifar10_distill": "configs/accuracy/split_cifar10_distill.yaml",
    "split_cifar10_distill_w20": "configs/accuracy/split_cifar10_distill_w20.yaml",
    # the same with the frozen copy's BatchNorm on batch statistics (CaSSLe's code)
    "split_cifar10_distill_w20_batchbn": "configs/accuracy/split_cifar10_distill_w20_batchbn.yaml",
    "split_cifar10_mixup": "configs/accuracy/split_cifar10_mixup.yaml",
    "split_cifar10_pfr": "configs/accuracy/split_cifar10_pfr.yaml",  # PFR: the distillation of h, not z
    "split_cifar10_replay_distill": "configs/accuracy/split_cifar10_replay_distill.yaml",
    "split_cifar10_replay_mixup": "configs/accuracy/split_cifar10_replay_mixup.yaml",
    "online_cifar10_replay": "configs/accuracy/online_cifar10_replay.yaml",
    "online_cifar10_b20": "configs/accuracy/online_cifar10_b20.yaml",  # control of online replay's batch of 20
    "online_cifar10_minred": "configs/accuracy/online_cifar10_minred.yaml",  # online replay with MinRed's buffer
    "online_cifar10_minred_h": "configs/accuracy/online_cifar10_minred_h.yaml",  # MinRed comparing h, not z
    "online_cifar10_minred_stored": "configs/accuracy/online_cifar10_minred_stored.yaml",  # MinRed's bookkeeping
}


def run(cmd: list[str], log_path: Path) -> float:
    t0 = time.time()
    with log_path.open("a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        subprocess.run(cmd, cwd=REPO, check=True, stdout=log, stderr=subprocess.STDOUT)
    return time.time() - t0


def probe(ckpt_dir: Path, patches: int, log_path: Path, random_init: bool = False, bn_recalibrate: int = 0,
          per_class: int | None = None) -> dict:
    """evaluate.py on the run's last checkpoint: the default probe, the held-out-selected one, and kNN. Features are
    cached in the run directory, so a rerun (or another probe setting) does not extract them again."""
    out = ckpt_dir / f"probe_p{patches}{'_random' if random_init else ''}{f'_bn{bn_recalibrate}' * bool(bn_recalibrate)}.json"
    cmd = ["python", "evaluate.py", "--checkpoint", str(ckpt_dir), "--patches", str(patches), "--knn",
           "--probe-select", "--features-cache", str(ckpt_dir / "features"), "--bn-recalibrate", str(bn_recalibrate),
           "--out", str(out)] + (["--random-init"] if random_init else [])
    if per_class:
        cmd += ["--train-per-class", str(per_class), "--test-per-class", str(per_class)]
    seconds = run([sys.executable, *cmd[1:]], log_path)
    result = json.loads(out.read_text())["cifar10"]
    return {"linear": result["linear"], "linear_selected": result["linear_selected"], "knn": result.get("knn"),
            "probe": result.get("probe"), "bn_recalibrate": bn_recalibrate, "seconds": seconds,
            "command": " ".join(cmd)}


LABELS = {"random_init": "random-init encoder (floor)", "offline_1epoch": "offline, 1 epoch (i.i.d. one pass)",
          "split_cifar10": "Split CIFAR-10, 5 x 2 classes, one pass", "online_cifar10": "online, mini-experiences of 10",
          "offline_3epochs": "offline, 3 epochs",
          "split_cifar10_blur13": "Split CIFAR-10, one pass, blur kernel +-3 sigma (13 taps)",
          "split_cifar10_replay": "Split CIFAR-10 + replay (reservoir 500, 100/update)",
          "split_cifar10_distill": "Split CIFAR-10 + CaSSLe distillation (weight 200)",
          "split_cifar10_distill_w20": "Split CIFAR-10 + CaSSLe distillation (weight 20)",
          "split_cifar10_distill_w20_batchbn": "Split CIFAR-10 + CaSSLe distillation (weight 20, frozen BatchNorm on "
                                               "batch statistics)",
          "split_cifar10_mixup": "Split CIFAR-10 + LUMP mixup (buffer 500)",
          "split_cifar10_pfr": "Split CIFAR-10 + PFR distillation of h (weight 20)",
          "split_cifar10_replay_distill": "Split CIFAR-10 + replay + distillation",
          "split_cifar10_replay_mixup": "Split CIFAR-10 + replay + mixup",
          "online_cifar10_replay": "online + replay (reservoir 500, 10/update)",
          "online_cifar10_b20": "online, mini-experiences of 20 (batch 20)",
          "online_cifar10_minred": "online + replay (MinRed 500, 10/update)",
          "online_cifar10_minred_h": "online + replay (MinRed on h, 500, 10/update)",
          "online_cifar10_minred_stored": "online + replay (MinRed, stored features, 500, 10/update)"}


SEED_MARK = "@seed"  # results key of a row trained with another seed: "split_cifar10@seed1"


def split_key(key: str) -> tuple[str, int]:
    """("split_cifar10", 1) for "split_cifar10@seed1"; seed 0 (the recipe's) for a plain row name."""
    name, _, seed = key.partition(SEED_MARK)
    return name, int(seed) if seed else 0


def ordered_keys(results: dict) -> list[str]:
    """The results' rows in the order of ROWS, each row's other seeds right after it (unknown names dropped)."""
    keys = [k for k in results if split_key(k)[0] in ROWS]
    return sorted(keys, key=lambda k: (list(ROWS).index(split_key(k)[0]), split_key(k)[1]))


def row_label(key: str) -> str:
    name, seed = split_key(key)
    return LABELS[name] + (f", seed {seed}" if SEED_MARK in key else "")


def seed_mean(results: dict, name: str, probe_key: str) -> tuple[float, list[float]]:
    """Mean accuracy (%) of row `name` over every seed measured, and the per-seed values (nan, [] when unmeasured)."""
    values = [_acc(results[k].get(probe_key)) for k in ordered_keys(results) if split_key(k)[0] == name]
    values = [v for v in values if v == v]
    return (sum(values) / len(values) if values else float("nan")), values


def _seeds(values: list[float]) -> str:
    """'1 seed' or '2 seeds: 72.9, 73.5, spread 0.6 pts'."""
    if len(values) < 2:
        return "1 seed"
    return f"{len(values)} seeds: {', '.join(f'{v:.1f}' for v in values)}, spread {max(values) - min(values):.1f} pts"


# methods of the targets: split rows against the plain split, online rows against the i.i.d. one pass
SPLIT_METHODS = ("split_cifar10_replay", "split_cifar10_distill", "split_cifar10_distill_w20",
                 "split_cifar10_distill_w20_batchbn", "split_cifar10_mixup", "split_cifar10_pfr",
                 "split_cifar10_replay_distill",
                 "split_cifar10_replay_mixup")
ONLINE_METHODS = ("online_cifar10", "online_cifar10_replay", "online_cifar10_b20", "online_cifar10_minred",
                  "online_cifar10_minred_h", "online_cifar10_minred_stored")
GAP_SHARE, COMPUTE_RATIO, ONLINE_POINTS = 0.5, 2.0, 3.0


def target_lines(results: dict, bag: str, patches: int) -> list[str]:
    """The issue's two targets, judged on the bag-of-`patches` probe with held-out decay (mean over seeds):
    (1) a split row closes at least half of the plain split's gap to the i.i.d. one pass at no more than twice the
    plain split's patch forwards; (2) an online row within 3 points of the i.i.d. one pass. Names the cheapest row
    (fewest patch forwards) reaching each target, or says plainly that none does."""
    iid, iid_values = seed_mean(results, "offline_1epoch", bag)
    plain, plain_values = seed_mean(results, "split_cifar10", bag)
    if iid != iid:
        return ["", "Targets: not judged yet (no i.i.d. one-pass row, offline_1epoch)."]
    lines = ["", f"Targets (bag of {patches}, held-out decay, mean over the seeds measured; i.i.d. one pass "
             f"{iid:.1f}%, {_seeds(iid_values)}):", ""]
    if plain == plain:
        gap = iid - plain
        base, _ = patch_compute(results.get("split_cifar10") or {})
        reached = []
        lines.append(f"- Split: plain {plain:.1f}% ({_seeds(plain_values)}), gap {gap:.1f} pts; the target is >= "
                     f"{GAP_SHARE * gap:.1f} pts back at <= {COMPUTE_RATIO:g}x the plain split's patch forwards.")
        for name in SPLIT_METHODS:
            acc, values = seed_mean(results, name, bag)
            fwd, _ = patch_compute(results[name]) if name in results else (None, False)
            if acc != acc or not fwd or not base:
                continue
            share, ratio = (acc - plain) / gap if gap > 0 else float("inf"), fwd / base
            ok = share >= GAP_SHARE and ratio <= COMPUTE_RATIO
            reached += [(fwd, name)] if ok else []
            lines.append(f"  - {row_label(name)}: {acc:.1f}% ({_seeds(values)}), "
                         f"{100 * share:.0f}% of the gap closed, {ratio:.2f}x compute: "
                         f"{'reaches' if ok else 'misses'} the target")
        lines.append(f"  - Cheapest reaching it: {row_label(min(reached)[1])}." if reached else
                     "  - None of the measured split rows reaches this target.")
    online = [(patch_compute(results[n])[0] or 0.0, n, *seed_mean(results, n, bag)) for n in ONLINE_METHODS
              if n in results]
    online = [(fwd, n, acc, values) for fwd, n, acc, values in online if acc == acc]
    if online:
        lines.append(f"- Online: within {ONLINE_POINTS:g} pts of the i.i.d. one pass, i.e. >= {iid - ONLINE_POINTS:.1f}%.")
        lines += [f"  - {row_label(n)}: {acc:.1f}% ({_seeds(values)}; {acc - iid:+.1f} pts): "
                  f"{'reaches' if acc >= iid - ONLINE_POINTS else 'misses'} the target" for _, n, acc, values in online]
        hits = sorted((fwd, n) for fwd, n, acc, _ in online if acc >= iid - ONLINE_POINTS)
        lines.append(f"  - Cheapest reaching it: {row_label(hits[0][1])}." if hits else
                     "  - None of the measured online rows reaches this target.")
    return lines


def patch_compute(row: dict) -> tuple[float | None, bool]:
    """(patches forwarded: trained + frozen + extra, estimated?) of a row; rows without counters (trained before
    they existed, no continual-learning method) are estimated as samples seen x the config's patches per image."""
    c = row.get("compute")
    if c:
        return float(c.get("patches_forward", 0) + c.get("frozen_forwards", 0) + c.get("extra_forwards", 0)), False
    if not row.get("samples_seen") or not row.get("config"):
        return None, False
    import yaml

    cfg = yaml.safe_load((REPO / row["config"]).read_text()) or {}
    return float(row["samples_seen"] * (cfg.get("augment") or {}).get("n_patches", 20)), True


def _compute_cells(row: dict) -> str:
    """'patch forwards | buffer images read' cells of the table."""
    fwd, estimated = patch_compute(row)
    c = row.get("compute") or {}
    if fwd is None:
        fwd_cell = "-"
    else:
        fwd_cell = (f"{fwd / 1e6:.1f} M" if fwd >= 1e6 else f"{fwd:,.0f}") + (" (est.)" if estimated else "")
    return f"{fwd_cell} | {c['buffer_images']:,}" if "buffer_images" in c else f"{fwd_cell} | -"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _probe_cell(probe: dict) -> str:
    """'as run / held-out decay (wd ..)' for one probe result."""
    if not probe:
        return "-"
    sel = probe.get("linear_selected") or {}
    held = f" / {_pct(sel.get('accuracy'))} (wd {sel['weight_decay']:g})" if sel else ""
    return f"{_pct(probe.get('linear'))}{held}"


def report(results: dict, out: Path, patches: int = 16) -> None:
    """<out stem>.md (the table, then the accuracy matrix of every multi-experience row), <stem>.png and
    <stem>_compute.png beside the JSON `out` (accuracy.json -> accuracy.md, accuracy.png, accuracy_compute.png)."""
    out_dir = out.parent
    bag = f"probe_bof{patches}"
    keys = ordered_keys(results)
    lines = [f"| row | samples seen | linear, whole image: as run / held-out decay | linear, bag of {patches}: as run / "
             "held-out decay | kNN whole / bag | avg forgetting (whole image) | train + stream eval time | patch forwards "
             "(train + frozen + extra) | buffer images read |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in keys:
        r = results[name]
        forget = r.get("avg_forgetting")
        wall = r.get("train_and_stream_eval_seconds")
        knn = f"{_pct(r.get('probe_whole', {}).get('knn'))} / {_pct(r.get(bag, {}).get('knn'))}"
        lines.append(f"| {row_label(name)} | {r['samples_seen']:,} | {_probe_cell(r.get('probe_whole'))} | "
                     f"{_probe_cell(r.get(bag))} | {knn} | "
                     f"{'-' if forget is None else f'{round(100 * forget, 1) + 0.0:.1f} pts'} | "
                     f"{'-' if not wall else f'{wall / 60:.0f} min'} | {_compute_cells(r)} |")
    lines += target_lines(results, bag, patches)
    for name in keys:
        matrix = results[name].get("accuracy_matrix") or []
        if len(matrix) < 2:
            continue
        lines += ["", f"Accuracy matrix of {name} (whole-image probe after each evaluation; row t: after experience "
                  "t, column j: test classes of experience j; numbered from 0, as in train.log):", "",
                  "| after | " + " | ".join(f"exp {j}" for j in range(len(matrix[0]))) + " |",
                  "| --- |" + " --- |" * len(matrix[0])]
        lines += [f"| {t} | " + " | ".join(f"{100 * a:.1f}" for a in row) + " |" for t, row in enumerate(matrix)]
    recal = [n for n in keys if "probe_whole_bn" in results[n] or f"{bag}_bn" in results[n]]
    if recal:
        lines += ["", "Same checkpoints, BatchNorm running statistics re-estimated before probing (`evaluate.py "
                  "--bn-recalibrate N`, N training images in the probed form):", "",
                  f"| row | images | linear, whole image: as run / held-out decay | linear, bag of {patches}: as run / "
                  "held-out decay | kNN whole / bag |", "| --- | --- | --- | --- | --- |"]
        for name in recal:
            r = results[name]
            whole, bof = r.get("probe_whole_bn") or {}, r.get(f"{bag}_bn") or {}
            n = whole.get("bn_recalibrate") or bof.get("bn_recalibrate")
            lines.append(f"| {row_label(name)} | {n:,} | {_probe_cell(whole)} | {_probe_cell(bof)} | "
                         f"{_pct(whole.get('knn')) if whole else '-'} / {_pct(bof.get('knn')) if bof else '-'} |")
    machines = sorted({r["machine"] for r in results.values() if r.get("machine")})
    if machines:
        lines += ["", "Measured on: " + "; ".join(machines) + "."]
    (out_dir / f"{out.stem}.md").write_text("\n".join(lines) + "\n")
    _plot(results, out_dir / f"{out.stem}.png", bag, patches)
    _plot_compute(results, out_dir / f"{out.stem}_compute.png", bag, patches)


def _acc(probe: dict | None) -> float:
    """A probe's accuracy in percent: held-out decay where measured, else as run (nan when absent)."""
    if not probe:
        return float("nan")
    sel = probe.get("linear_selected") or {}
    return 100 * sel.get("accuracy", probe.get("linear", float("nan")))


def _plot(results: dict, path: Path, bag: str, patches: int) -> None:
    """Grouped horizontal bars, one group per row in the table's order, top to bottom: every row's probe accuracy
    (held-out decay where measured, else as run), its full label readable beside it however many rows there are."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ordered_keys(results)
    if not names:
        return
    fig, ax = plt.subplots(figsize=(11.0, max(4.0, 1.6 + 0.42 * len(names))))
    height = 0.4
    for k, (key, label) in enumerate((("probe_whole", "whole image"), (bag, f"bag of {patches} patches"))):
        ys = [i + (k - 0.5) * height for i in range(len(names))]
        xs = [_acc(results[n].get(key)) for n in names]
        bars = ax.barh(ys, xs, height, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.axvline(75, color="gray", ls="--", lw=1, label="one-pass target (bag)")
    ax.set_yticks(range(len(names)), [row_label(n) for n in names], fontsize=7)
    ax.invert_yaxis()  # the first row on top, as in the table
    ax.set_xlabel("linear probe accuracy on CIFAR-10 test (%)")
    ax.set_xlim(0, 100)
    ax.set_title("EMP-SSL on CIFAR-10, ResNet-18 width 1/4, 20 patches\n"
                 "linear probe, weight decay chosen on held-out training images", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_compute(results: dict, path: Path, bag: str, patches: int) -> None:
    """Final accuracy of every trained row against its patch forwards, one panel per probe (whole image, bag), each
    point named; the i.i.d. one pass (dashed), the plain split (dotted) and the random-init floor as lines. Hollow
    markers: compute estimated from samples seen (rows trained before the counters)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(n, *patch_compute(results[n])) for n in ordered_keys(results)]
    points = [(n, fwd / 1e6, est) for n, fwd, est in points if fwd]
    if not points:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12.0, 5.0))
    for ax, (key, title, color) in zip(axes, (("probe_whole", "whole image", "C0"),
                                              (bag, f"bag of {patches} patches", "C1"))):
        placed: list[tuple[float, float]] = []
        ys = [v for v in (_acc(results[n].get(key)) for n, _, _ in points) if v == v] or [0.0]
        step = 0.05 * max(max(ys) - min(ys), 1.0)  # a label's height in accuracy points
        for name, x, est in sorted(points, key=lambda p: -_acc(results[p[0]].get(key))):
            y = _acc(results[name].get(key))
            if y != y:
                continue
            ax.scatter(x, y, s=40, color=color, facecolors="none" if est else color)
            text_y = y
            while any(abs(px - x) < 0.15 and abs(py - text_y) < step for px, py in placed):
                text_y -= step  # names of nearby points stacked downwards, never on top of each other
            placed.append((x, text_y))
            moved = text_y != y  # a displaced name gets a leader line to its own point
            ax.annotate(name.removeprefix("split_cifar10_").replace("split_cifar10", "split (plain)"), (x, y),
                        xytext=(x + (0.08 if moved else 0.03), text_y), textcoords="data", fontsize=7, va="center",
                        arrowprops=dict(arrowstyle="-", lw=0.5, color="gray", shrinkA=0, shrinkB=3) if moved else None)
        for ref, style, what in (("offline_1epoch", "--", "i.i.d. one pass"), ("split_cifar10", ":", "plain split"),
                                 ("random_init", "-.", "random init")):
            if ref in results and (results[ref].get(key) or {}):
                ax.axhline(_acc(results[ref][key]), color="gray", ls=style, lw=1, label=what)
        ax.set_title(f"linear probe, {title} (held-out decay)", fontsize=9)
        ax.set_xlabel("patches forwarded in training (encoder + frozen copy + buffer features), millions", fontsize=8)
        ax.set_ylabel("final accuracy on CIFAR-10 test (%)")
        ax.set_xlim(min(p[1] for p in points) - 0.1, max(p[1] for p in points) + 0.6)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("Accuracy against compute (hollow: estimated as samples seen x patches)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def trained_row(name: str, run_dir: Path, log_path: Path, overrides: list[str]) -> dict:
    """Train (or resume, or reuse when finished) the run of row `name`; its numbers from metrics.jsonl."""
    fresh = ["python", "run_stream.py", "--config", ROWS[name], f"run.out_dir={run_dir}", *overrides]
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
           "avg_forgetting": last.get("probe/avg_forgetting")}
    compute = {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("compute/")}
    if compute:  # runs trained before the counters existed have none
        row["compute"] = compute
    if seconds:
        row["this_session_seconds"] = seconds
    return row


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
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides for rows trained afresh (e.g. data.train_per_class=40 to check that a row "
                        "runs); not for results: the row then is not the recipe")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="train the rows with train.seed=N (N > 0: kept as ROW@seedN beside the recipe's seed-0 row; the "
                        "report gives the spread and judges the targets on the mean over seeds)")
    p.add_argument("--probe-per-class", type=int, default=None, metavar="N",
                   help="probe on the first N training and test images per class (a quick check; default: all)")
    p.add_argument("--report-only", action="store_true",
                   help="only redraw accuracy.md and accuracy.png from the JSON in --out (no training, no probing)")
    args = p.parse_args()
    out = REPO / args.out
    if args.report_only:
        if not out.is_file():
            p.error(f"--report-only: no results at {out}; run some rows first")
        report(json.loads(out.read_text()), out, args.patches)
        print(out.with_suffix(".md").read_text())
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
        return {key + suffix: probe(ckpt_dir, patches, log_path, random_init, args.bn_recalibrate,
                                    args.probe_per_class)
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
            key = f"{name}{SEED_MARK}{args.seed}" if args.seed else name
            log_path = runs / f"{key}.log"
            seed_set = [f"train.seed={args.seed}"] if args.seed else []
            row = trained_row(name, runs / key, log_path, [*args.set, *seed_set])
            row.update(probes(runs / key, log_path), seed=args.seed)
            name = key
        row["machine"] = machine()
        results[name] = {**results.get(name, {}), **row}  # probes not rerun this time are kept
        out.write_text(json.dumps(results, indent=2))
        print(name, json.dumps({k: v for k, v in row.items() if k != "accuracy_matrix"}), flush=True)
    report(results, out, args.patches)
    print(out.with_suffix(".md").read_text())
    return 0


def machine() -> str:
    """CPU model and generation, cores, ISA, and the precision `train.precision=auto` gives on it (rows compare
    only within one)."""
    from streaming_ssl.device import cpu_kind

    return cpu_kind()


if __name__ == "__main__":
    sys.exit(main())
