#!/usr/bin/env python
"""Forward transfer of the accuracy rows, from the accuracy matrices they stored (no training).

Not a test. A row of bench/accuracy.py keeps its run's accuracy matrix A[t, j] (the in-run probe after each
experience). Forward transfer (Lopez-Paz and Ranzato 2017; the third figure of CaSSLe's tables) also needs b[j], the
same probe's accuracy on experience j at initialisation, which those runs did not log (eval.forward_transfer came
later). The model at initialisation depends only on the seed and the architecture, so b is computed here afresh:
streaming_ssl.build.initial_baseline builds each row's model as its run did and probes it with the run's own
evaluator (one evaluation per distinct seed and model, data, augmentation, evaluation and stream settings: the rows
share most). Then FWT = mean over 0 < j < T of A[j-1, j] - b[j] (streaming_ssl.evaluation.forward_transfer), with each
term kept, and the same per seed mean and spread as the accuracy table.

    STREAMING_SSL_DATA=../shared/data python bench/forward_transfer.py \
        --results bench/results/accuracy_bf16.json --out bench/results/forward_transfer_bf16.json

Baselines already in --out are reused (a rerun only computes what is missing; --recompute redoes them). Only rows
with one evaluation per parent experience qualify (class-incremental rows, and online rows evaluated at the parent
boundaries): the offline rows have one experience and no forward transfer.

b is computed with today's code on this machine. It equals the runs' own initialisation where the model's
construction and seeding have not changed since they trained (the Zen 5 check in bench/README.md retrained a row
from then bit for bit), and it is measured in the precision this machine trains in: compare only with rows of the
same kind and precision.

To check that it runs (not for results): --set model.width=0.125 data.train_per_class=20 data.test_per_class=10.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from accuracy import LABELS, ROWS, ordered_keys, split_key  # noqa: E402 - after the repository is on the path

from streaming_ssl.atomic import atomic_write_text  # noqa: E402
from streaming_ssl.evaluation import forward_transfer  # noqa: E402

# the settings b depends on: the model's initialisation, how the run's evaluator probes it, and the stream (its
# class order is the matrix's columns)
BASELINE_SECTIONS = ("data", "model", "augment", "eval", "stream")


def row_config(name: str, seed: int, extra: list[str]):
    from streaming_ssl.config import load_config

    root = os.environ["STREAMING_SSL_DATA"]
    return load_config(REPO / ROWS[name], [f"train.seed={seed}", f"data.root={root}", *extra])


def baseline_key(cfg) -> str:
    """One string per distinct baseline: the seed, precision and the sections b depends on (data.root left out)."""
    d = cfg.to_dict()
    d["data"] = {k: v for k, v in d["data"].items() if k not in ("root", "download")}
    return json.dumps({"seed": cfg.train.seed, "precision": cfg.train.precision, "device": cfg.train.device,
                       **{s: d[s] for s in BASELINE_SECTIONS}}, sort_keys=True)


def row_fwt(matrix: list[list[float]], baseline: list[float]) -> dict:
    """FWT of one run from its matrix (row t: the evaluation after parent experience t) and b: the figure, each
    experience's term A[j-1, j] - b[j], and the accuracies before training on j."""
    history = [list(a) + [float(t + 1)] for t, a in enumerate(matrix)]
    # an undefined accuracy (NaN: an experience without test images) is left out, as forward_transfer leaves it
    terms = [d for j in range(1, len(matrix)) if (d := matrix[j - 1][j] - baseline[j]) == d]
    return {"fwt": forward_transfer(history, baseline, len(matrix)), "terms": terms,
            "before": [matrix[j - 1][j] for j in range(1, len(matrix))], "baseline": list(baseline)}


def qualifies(row: dict) -> str:
    """'' when the row's matrix gives a forward transfer, else why not."""
    matrix = row.get("accuracy_matrix") or []
    if len(matrix) < 2:
        return "one evaluation (one experience): no forward transfer"
    if any(len(a) != len(matrix) for a in matrix):
        return "not one evaluation per parent experience"
    return ""


def report(out: dict) -> str:
    lines = ["| row | seeds | FWT (pts) | per experience j = 1..T-1 (pts, seed 0) |", "| --- | --- | --- | --- |"]
    names = []
    for key in ordered_keys(out["rows"]):
        if split_key(key)[0] not in names:
            names.append(split_key(key)[0])
    for name in names:
        keys = [k for k in ordered_keys(out["rows"]) if split_key(k)[0] == name]
        values = [100 * out["rows"][k]["fwt"] for k in keys if out["rows"][k]["fwt"] is not None]
        if not values:
            continue
        spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
        terms = ", ".join(f"{100 * t:+.1f}" for t in out["rows"][keys[0]]["terms"])
        lines.append(f"| {LABELS[name]} | {len(values)} ({', '.join(f'{v:.1f}' for v in values)}) | "
                     f"{statistics.mean(values):+.1f}{spread} | {terms} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="bench/results/accuracy_bf16.json", help="bench/accuracy.py's JSON")
    p.add_argument("--out", default="bench/results/forward_transfer_bf16.json")
    p.add_argument("--rows", nargs="+", default=None, help="result keys (ROW or ROW@seedN; default: every one)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides for the baselines (a quick check; not for results)")
    p.add_argument("--recompute", action="store_true", help="compute the baselines again")
    args = p.parse_args()
    if not os.environ.get("STREAMING_SSL_DATA"):
        p.error("set STREAMING_SSL_DATA to the folder holding cifar10.npz")
    from streaming_ssl.build import initial_baseline
    from streaming_ssl.device import cpu_kind

    results = json.loads((REPO / args.results).read_text())
    out_path = REPO / args.out
    out = json.loads(out_path.read_text()) if out_path.exists() and not args.recompute else {}
    out.setdefault("baselines", {})
    out["rows"], out["left_out"] = {}, {}
    for key in args.rows or ordered_keys(results):
        name, seed = split_key(key)
        why = qualifies(results[key]) if key in results else "not in --results"
        if why or ROWS.get(name) is None:
            out["left_out"][key] = why or "no config"
            continue
        cfg = row_config(name, seed, args.set)
        bkey = baseline_key(cfg)
        if bkey not in out["baselines"]:
            t0 = time.perf_counter()
            b = initial_baseline(cfg)
            out["baselines"][bkey] = {**b, "seconds": round(time.perf_counter() - t0, 1), "machine": cpu_kind(),
                                      "first_row": key}
            atomic_write_text(out_path, json.dumps(out, indent=2))
            print(f"baseline for {key}: probe {b['acc_all']:.4f}, matrix row {b['acc_matrix_row']}", flush=True)
        b = out["baselines"][bkey]
        out["rows"][key] = {**row_fwt(results[key]["accuracy_matrix"], b["acc_matrix_row"]),
                            "baseline_acc_all": b["acc_all"], "seed": seed, "trained_on": results[key].get("machine")}
        fwt = out["rows"][key]["fwt"]
        print(f"{key}: FWT " + ("undefined" if fwt is None else f"{100 * fwt:+.2f} pts"), flush=True)
    out["command"] = " ".join(["python", "bench/forward_transfer.py", *sys.argv[1:]])
    out["overrides"] = args.set
    atomic_write_text(out_path, json.dumps(out, indent=2))
    table = report(out)
    atomic_write_text(out_path.with_suffix(".md"), table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
