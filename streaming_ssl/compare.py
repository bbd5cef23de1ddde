"""Compare finished runs: methods side by side, seeds averaged, accuracy against its compute.

    python compare_runs.py runs/split_cifar10 runs/split_cifar10_replay runs/split_cifar10@seed1 --out runs/cmp
    python compare_runs.py runs/sweep          # a folder of run directories: every run in it

Runs whose configs differ only in `train.seed` (and in settings that do not change what is learned: run.*,
data.root, train.threads, train.device, compiling, channels_last, train.deterministic, train.log_every,
optim.foreach, oom.RESUMABLE, eval.forward_transfer (it adds a figure and one evaluation's time), and the
settings of a continual-learning method that is off) form one group, named by its first run's folder and by the
settings that tell it from the others; its figures are the mean and sample standard deviation over its runs (a
run that lacks a figure, as one saved before it was logged, is left out of that figure's mean). Every figure
comes from the runs' own metrics.jsonl (the evaluation after each experience, as the run logged it):

- `acc_final`: the linear probe's accuracy on the whole test set after the last experience (probe/acc_all);
- `acc_avg_incremental`: the mean, over the evaluations, of the accuracy on the classes seen so far
  (probe/acc_seen; the "average incremental accuracy" of class-incremental papers);
- `forgetting` and `bwt`: the last evaluation's average forgetting and backward transfer (probe/*);
- `fwt`: the last evaluation's forward transfer (probe/fwt; only runs with eval.forward_transfer have it);
- `knn_final`: the kNN accuracy after the last experience (absent where eval.knn_k is 0);
- the cost: images from the stream and from buffers, updates, and `forward_equivalents`, every encoder pass in
  units of one forward of one crop: patches forward + 2 x patches back-propagated (a backward costs about two
  forwards) + a frozen model's forwards (distillation) + the forwards that only choose a buffer's images
  (MinRed). Crops are as large as the images (EMP-SSL resizes each patch to the image size), so one image forward
  counts as one crop forward.

Where each run trained (its run_info.jsonl: machine kind and precision, provenance.py) is listed under the table,
with a warning where the runs trained on more than one (machines_warning): a group whose seeds did (`train.precision:
auto` is bf16 on one CPU and float32 on another under the same config, so such runs still share a group) averages
across them; groups that differ only between them compare with that in mind. The code they trained with (git commit,
uncommitted changes, torch and avalanche-lib versions: provenance.code_labels) is listed the same way, with a warning
where the seeds of one group differ in it (code_warning).

Accuracies are only comparable on one test set: runs of different datasets, image sizes or test subsets are
refused (allow_mixed overrides), and so are two runs of one config and seed (a copy of a run would count as a
second seed; allow_same_seed overrides). A run still training (no summary.json) is left out unless
include_incomplete; one with no evaluation yet is always left out.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from streaming_ssl import provenance
from streaming_ssl.config import ConfigError, config_from_dict
from streaming_ssl.evaluation import _is_scalar, read_rows
from streaming_ssl.oom import RESUMABLE
from streaming_ssl.runner import _predates_blur_kernel

# settings that do not change what a run learns: runs differing only in these (and the seed) are one group
NOT_LEARNED = ("run.", "data.root", "data.download", "train.threads", "train.device", "train.compile",
               "train.compile_backend", "augment.compile", "train.channels_last", "train.deterministic",
               "train.log_every", "optim.foreach", "eval.forward_transfer", *RESUMABLE)
SEED = "train.seed"
# settings that change the test set, on which every accuracy is measured
TEST_SET = ("data.dataset", "data.image_size", "test images per class")
METRICS = ("acc_final", "acc_avg_incremental", "forgetting", "bwt", "fwt", "knn_final", "stream_images",
           "buffer_images", "updates", "forward_equivalents", "wall_hours")


class CompareError(ValueError):
    """Runs that cannot be compared, or a path that is not a run; the message says what to do."""


@dataclass
class Run:
    """One run directory: its resolved config (flattened keys), its evaluation rows, and whether it finished."""

    path: Path
    config: dict
    rows: list[dict]
    complete: bool
    metrics: dict = field(default_factory=dict)
    machines: list[str] = field(default_factory=list)  # provenance.machine_labels ([NOT_RECORDED]: no row)
    record_problem: str = ""  # why its run_info.jsonl could not be read ("" when it could, or there is none)
    code: list[str] = field(default_factory=list)  # provenance.code_labels: the code it trained with ([]: none known)


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def forward_equivalents(row: dict) -> int | None:
    """Encoder passes up to `row`, in forwards of one crop (module docstring); None for a row without the compute
    counters (a run saved before they were logged)."""
    if "compute/patches_backward" not in row:
        return None
    return (row.get("compute/patches_forward", 0) + 2 * row["compute/patches_backward"]
            + row.get("compute/frozen_forwards", 0) + row.get("compute/extra_forwards", 0))


def _finite(value):
    """A logged number, None for a missing or non-finite one (NaN: a class with no test image)."""
    return value if _is_scalar(value) and math.isfinite(value) else None


def run_metrics(rows: list[dict]) -> dict:
    """The figures of one run from its evaluation rows (oldest first); None where the rows lack them."""
    if not rows:
        raise ValueError("no evaluation rows")
    last = {k: _finite(v) for k, v in rows[-1].items()}
    seen = [v for r in rows if (v := _finite(r.get("probe/acc_seen"))) is not None]
    wall = last.get("time/wall_seconds")
    return {
        "acc_final": last.get("probe/acc_all"),
        "acc_avg_incremental": sum(seen) / len(seen) if seen else None,
        "forgetting": last.get("probe/avg_forgetting"),
        "bwt": last.get("probe/bwt"),
        "fwt": last.get("probe/fwt"),
        "knn_final": last.get("knn/acc_all"),
        "stream_images": last.get("compute/stream_images", last.get("samples_seen")),
        "buffer_images": last.get("compute/buffer_images"),
        "updates": last.get("updates"),
        "forward_equivalents": forward_equivalents(rows[-1]),
        "wall_hours": None if wall is None else wall / 3600,
    }


def read_run(path: str | Path) -> Run:
    """A run directory: its config.yaml and metrics.jsonl (CompareError when it is not a run; `rows` is empty for a
    run with no evaluation yet)."""
    path = Path(path)
    cfg_path = path / "config.yaml"
    if not cfg_path.is_file():
        raise CompareError(f"{str(path)!r} is not a run directory (it holds no config.yaml): pass the run.out_dir of "
                           "runs, or a folder whose sub-folders are runs")
    try:  # resolved as a resume reads it: settings added since the run was saved take their defaults ...
        raw = yaml.safe_load(cfg_path.read_text())
        config = config_from_dict(raw, import_methods=False, saved=True).to_dict()
    except (ConfigError, yaml.YAMLError, TypeError, AttributeError) as err:
        raise CompareError(f"{str(cfg_path)!r} is not a config this version reads ({err}); leave that run out") \
            from None
    if _predates_blur_kernel(raw) and config["augment"]["blur_kernel"] is None:
        config["augment"]["blur_kernel"] = 0  # ... except the blur, which such a run trained with (runner.py)
    try:
        rows = read_rows(path / "metrics.jsonl")
    except json.JSONDecodeError as err:
        raise CompareError(f"{str(path / 'metrics.jsonl')!r} is damaged ({err}); resume the run "
                           f"(python run_stream.py --resume {path}), which rewrites it from its checkpoint") from None
    complete = bool(rows) and (path / "summary.json").is_file()
    # where it trained: the starts before its last evaluated update (a start that only evaluated trained nothing); a
    # damaged record is no reason to refuse a run whose figures do not depend on it: its readable rows, and why
    info, problems = provenance.salvage_rows(path)
    last = rows[-1].get("updates") if rows else None
    machines = provenance.machine_labels(info, before_update=last if isinstance(last, int) else None)
    if problems:
        machines = list(dict.fromkeys([provenance.NOT_RECORDED, *machines]))
    return Run(path=path, config=flatten(config), rows=rows, complete=complete,
               metrics=run_metrics(rows) if rows else {}, machines=machines or [provenance.NOT_RECORDED],
               record_problem=problems[0] if problems else "",
               code=provenance.code_labels(info, before_update=last if isinstance(last, int) else None))


def find_runs(paths: list[str | Path]) -> list[Path]:
    """The run directories named: each path itself if it is a run (holds config.yaml), else its sub-folders that
    are runs, sorted. CompareError for a path that is neither, or a run named twice."""
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / "config.yaml").is_file():
            found.append(p)
        elif p.is_dir() and (subs := sorted(q for q in p.iterdir() if (q / "config.yaml").is_file())):
            found.extend(subs)
        else:
            raise CompareError(f"{str(p)!r} is neither a run directory (with config.yaml) nor a folder of run "
                               "directories; check the path")
    resolved = [p.resolve() for p in found]
    twice = sorted({str(p) for p in found if resolved.count(p.resolve()) > 1})
    if twice:
        raise CompareError(f"run named twice: {', '.join(twice)}; name each run once (a seed counts once)")
    return found


# how an online stream cuts its mini-experiences: read by no other stream mode
ONLINE_ONLY = ("stream.online_base", "stream.online_experience_size", "stream.access_task_boundaries")


def inert_settings(config: dict) -> set[str]:
    """Settings of a flattened config that change nothing in its run: those of a continual-learning method that is
    off (`cl.<method>.enabled` false, or `cl.replay.policy` none), MinRed's with another replay policy, and the
    online stream's outside stream mode online."""
    inert = set()
    for key, value in config.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "cl" and ((parts[2] == "enabled" and value is False)
                                                     or (key == "cl.replay.policy" and value == "none")):
            inert |= {k for k in config if k.startswith(f"cl.{parts[1]}.") and k != key}
    if config.get("cl.replay.policy") != "minred":
        inert |= {k for k in config if k.startswith("cl.replay.minred_")}
    if config.get("stream.mode") != "online":
        inert |= {k for k in ONLINE_ONLY if k in config}
    return inert


def _learned(config: dict) -> dict:
    inert = inert_settings(config)
    return {k: v for k, v in config.items() if k != SEED and not k.startswith(NOT_LEARNED) and k not in inert}


def group_runs(runs: list[Run]) -> list[tuple[str, list[Run]]]:
    """[(settings, runs)] in the order their first run was given: runs whose configs differ only in the seed and in
    settings that do not change what is learned share a group; `settings` names those that tell its group from the
    others ("" when there is one group)."""
    groups: list[tuple[dict, list[Run]]] = []
    for run in runs:
        key = _learned(run.config)
        for other_key, members in groups:
            if other_key == key:
                members.append(run)
                break
        else:
            groups.append((key, [run]))
    keys = sorted({k for g, _ in groups for k in g})
    differing = [k for k in keys if len({json.dumps(g.get(k), sort_keys=True) for g, _ in groups}) > 1]
    return [(", ".join(f"{k}={key.get(k)}" for k in differing if k in key), members) for key, members in groups]


def measured_on(config: dict) -> dict:
    """What a run's accuracies are measured on: the dataset, the image size and the test images per class (the
    fewer of data.test_per_class and eval.test_per_class; None: all of them)."""
    per_class = [v for v in (config.get("data.test_per_class"), config.get("eval.test_per_class")) if v is not None]
    return {"data.dataset": config.get("data.dataset"), "data.image_size": config.get("data.image_size"),
            "test images per class": min(per_class) if per_class else None}


def check_comparable(runs: list[Run]) -> None:
    """CompareError when the runs' accuracies are measured on different test sets (measured_on differs)."""
    sets = [measured_on(r.config) for r in runs]
    for key in TEST_SET:
        values = {json.dumps(t[key]) for t in sets}
        if len(values) > 1:
            which = "; ".join(f"{r.path.name}: {t[key]!r}" for r, t in zip(runs, sets))
            raise CompareError(f"the runs differ in {key} ({which}), so their accuracies are measured on different "
                               "test sets; compare runs of one test set, or pass --allow-mixed to list them anyway")


def mean_std(values: list) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None for fewer than two values) of the values that are not None."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None


def _labels(groups: list[list[Run]]) -> list[str]:
    """Each group's name: its first run's folder without @...; with the folder above it where two groups would
    share a name (runs/plain/seed0 and runs/replay/seed0), and numbered where that is not enough."""
    names = [members[0].path.name.split("@")[0] for members in groups]
    if len(set(names)) < len(names):
        names = [f"{m[0].path.parent.name}/{m[0].path.name.split('@')[0]}" for m in groups]
    if len(set(names)) < len(names):
        names = [f"{name} #{i + 1}" for i, name in enumerate(names)]
    return names


def _check_one_run_per_seed(members: list[Run]) -> None:
    seen: dict = {}
    for run in members:
        other = seen.setdefault(json.dumps(run.config.get(SEED)), run)
        if other is not run:
            raise CompareError(f"{other.path} and {run.path} learn with the same config and seed "
                               f"({run.config.get(SEED)}): a copy of a run would count as a second seed; leave one of "
                               "them out, or pass --allow-same-seed (e.g. the same seed on another device, to average "
                               "them anyway)")


def summarize(paths: list[str | Path], *, allow_mixed: bool = False, include_incomplete: bool = False,
              allow_same_seed: bool = False) -> dict:
    """Read, group and average runs (module docstring). Returns {"groups": [...], "left_out": [{"run", "why"}]}, each
    group {"label" (its first run's folder name, without @...), "differs" (the settings that tell it from the other
    groups), "runs", "seeds", "n", "complete", "settings", "machines" (the machine kinds and precisions its runs
    trained on, provenance.NOT_RECORDED among them where a run's training is not wholly recorded), "run_machines"
    (each run's), "curves" (each run's, at its evaluations), <metric>: {"mean", "std",
    "n" (runs that have it), "values"}}; "machines": the recorded ones of every run compared; "unrecorded": the runs
    whose training is not wholly recorded."""
    runs, left_out = [], []
    for run in (read_run(p) for p in find_runs(paths)):
        if not run.rows:
            left_out.append({"run": str(run.path), "why": "no evaluation yet (metrics.jsonl is missing or empty)"})
        elif not (run.complete or include_incomplete):
            left_out.append({"run": str(run.path), "why": "it has not finished (no summary.json; "
                                                          "--include-incomplete takes it)"})
        else:
            runs.append(run)
    if not runs:
        raise CompareError("no run to compare: " + "; ".join(f"{r['run']}: {r['why']}" for r in left_out))
    if not allow_mixed:
        check_comparable(runs)
    grouped = group_runs(runs)
    groups = []
    for (differs, members), label in zip(grouped, _labels([m for _, m in grouped])):
        if not allow_same_seed:
            _check_one_run_per_seed(members)
        group = {"label": label, "differs": differs, "runs": [str(r.path) for r in members],
                 "seeds": [r.config.get(SEED) for r in members], "n": len(members),
                 "complete": all(r.complete for r in members), "settings": _learned(members[0].config),
                 "machines": list(dict.fromkeys(m for r in members for m in r.machines)),
                 "run_machines": [r.machines for r in members],
                 "code": list(dict.fromkeys(c for r in members for c in r.code)), "run_code": [r.code for r in members],
                 "curves": [dict(zip(("samples_seen", "forward_equivalents", "acc"), curves(r))) for r in members]}
        for metric in METRICS:
            values = [r.metrics[metric] for r in members]
            mean, std = mean_std(values)
            group[metric] = {"mean": mean, "std": std, "n": sum(v is not None for v in values), "values": values}
        groups.append(group)
    return {"groups": groups, "left_out": left_out, "machines": _machines(runs),
            "unrecorded": [str(r.path) for r in runs if provenance.NOT_RECORDED in r.machines],
            "record_problems": [r.record_problem for r in runs if r.record_problem],
            "mixed_groups": [g["label"] for g, (_, members) in zip(groups, grouped) if len(_machines(members)) > 1],
            "code": list(dict.fromkeys(c for r in runs for c in r.code)),
            "mixed_code_groups": [g["label"] for g in groups if len(g["code"]) > 1]}


def _machines(runs: list[Run]) -> list[str]:
    """The distinct machine kinds and precisions the runs trained on (provenance.machine_labels), in order; not
    NOT_RECORDED, which is no kind."""
    return list(dict.fromkeys(m for r in runs for m in r.machines if m != provenance.NOT_RECORDED))


def machines_warning(summary: dict) -> str:
    """'' when every run records one machine kind and precision; else what differs: runs averaged in one group that
    trained on more than one (their mean mixes them), or groups that trained on different ones."""
    if len(summary.get("machines") or []) <= 1:
        return ""
    mixed = summary.get("mixed_groups") or []
    if mixed:
        return (f"runs averaged in one group trained on more than one machine kind or precision ({', '.join(mixed)}): "
                "the group's mean mixes them; accuracy and wall time compare only within one kind and precision")
    return ("the groups trained on different machine kinds or precisions: where that is not the setting the groups "
            "compare, their accuracy and wall time do not compare")


def code_warning(summary: dict) -> str:
    """'' unless the runs averaged in one group trained with more than one code version (git commit, uncommitted
    changes, torch or avalanche-lib version): their mean may mix what two versions compute."""
    mixed = summary.get("mixed_code_groups") or []
    if not mixed:
        return ""
    return (f"runs averaged in one group trained with more than one version of the code ({', '.join(mixed)}: git "
            "commit, uncommitted changes, torch or avalanche-lib): the group's mean may mix what they compute")


def code_note(summary: dict) -> list[str]:
    """The code the runs trained with, as lines under the table: one line when every run records the same, else each
    group's (a run resumed with other code names each; code_warning first where seeds of a group differ); none when
    no run records any."""
    every = summary.get("code") or []
    if len(every) <= 1:
        return [f"Code: {every[0]}."] if every else []
    warning = code_warning(summary)
    lines = [f"**{warning[0].upper()}{warning[1:]}**:" if warning else "Code (the groups trained with different "
             "versions; a difference between them may come from the code as well as from their settings):"]
    for g in summary["groups"]:
        names = [Path(r).name for r in g["runs"]]
        lines.append(f"- {g['label']}: " + ("; ".join(
            f"{c} ({', '.join(n for n, cs in zip(names, g['run_code']) if c in cs)})" for c in g["code"])
            if len(g["code"]) > 1 else (g["code"][0] if g["code"] else "not recorded")))
    return lines


def machines_note(summary: dict) -> list[str]:
    """Where the compared runs trained, as lines under the table: one line when every run records one machine kind
    in one precision, else machines_warning and each group's machines (a run that moved names each it trained on);
    the runs whose training is not (wholly) recorded are named (a run started before run_info.jsonl existed)."""
    every, unrecorded = summary.get("machines") or [], summary.get("unrecorded") or []
    where = f" (not recorded for part or all of {', '.join(unrecorded)})" if unrecorded else " (every run)"
    if len(every) <= 1:
        return [f"Trained on: {every[0]}{where}."] if every else (
            ["Where the runs trained is not recorded (no run_info.jsonl, or training before its first row)."]
            if unrecorded else [])
    warning = machines_warning(summary)
    lines = [f"**{warning[0].upper()}{warning[1:]}** (each run's run_info.jsonl says where it trained):"]
    for g in summary["groups"]:
        if g["label"] in (summary.get("mixed_groups") or []):  # which seed ran where
            names = [Path(r).name for r in g["runs"]]
            lines.append(f"- {g['label']}: " + "; ".join(
                f"{m} ({', '.join(n for n, ms in zip(names, g['run_machines']) if m in ms)})" for m in g["machines"]))
        else:
            lines.append(f"- {g['label']}: " + "; ".join(g["machines"]))
    return lines


def _cell(stat: dict, scale: float = 1.0, digits: int = 2, spread: bool = True) -> str:
    if stat["mean"] is None:
        return ""
    text = f"{stat['mean'] * scale:.{digits}f}"
    return text if stat["std"] is None or not spread else f"{text} ± {stat['std'] * scale:.{digits}f}"


def markdown_table(summary: dict) -> str:
    """The groups as a Markdown table: accuracies in %, forgetting, BWT and FWT in points, compute relative to the
    first group's that has it; an empty cell where no run of the group has the figure (the FWT column only where a
    group has it)."""
    groups = summary["groups"]
    base = next((g["forward_equivalents"]["mean"] for g in groups if g["forward_equivalents"]["mean"]), None)
    fwt = any(g["fwt"]["mean"] is not None for g in groups)
    lines = ["| group | differs in | runs | final acc % | avg incremental acc % | forgetting (pts) | BWT (pts) | "
             + ("FWT (pts) | " if fwt else "") + "kNN % | stream + buffer images | updates | compute (x first) |",
             "| --- " * (11 + fwt) + "|"]
    for g in groups:
        images = _cell(g["stream_images"], digits=0, spread=False)
        if g["buffer_images"]["mean"]:
            images += f" + {g['buffer_images']['mean']:.0f}"
        cost = g["forward_equivalents"]["mean"]
        compute = "" if base is None or cost is None else f"{cost / base:.2f}"
        n = f"{g['n']}" + ("" if g["complete"] else " (incomplete)")
        lines.append(f"| {g['label']} | {g['differs']} | {n} | {_cell(g['acc_final'], 100)} | "
                     f"{_cell(g['acc_avg_incremental'], 100)} | {_cell(g['forgetting'], 100)} | "
                     f"{_cell(g['bwt'], 100)} | " + (f"{_cell(g['fwt'], 100)} | " if fwt else "")
                     + f"{_cell(g['knn_final'], 100)} | {images} | "
                     f"{_cell(g['updates'], digits=0, spread=False)} | {compute} |")
    note = machines_note(summary) + code_note(summary)
    return "\n".join(lines + ([""] + note if note else [])) + "\n"


def curves(run: Run) -> tuple[list[float], list[float], list[float]]:
    """(stream images seen, forward equivalents, probe accuracy) at each of a run's evaluations."""
    xs = [r.get("samples_seen", 0) for r in run.rows]
    cost = [forward_equivalents(r) for r in run.rows]
    acc = [_finite(r.get("probe/acc_all")) for r in run.rows]
    return xs, cost, acc


def group_curve(curves_: list[dict], x_key: str) -> list[tuple[float, float, float, float]]:
    """(x, mean, lowest, highest) of the probe accuracy at each evaluation index over a group's runs: x and the
    accuracy are averaged over the runs that have that evaluation and the value (a run stopped early has fewer;
    a run saved before the compute counters has no compute), so no run's later evaluations are cut."""
    out = []
    for i in range(max(len(c["acc"]) for c in curves_)):
        pts = [(c[x_key][i], c["acc"][i]) for c in curves_
               if i < len(c["acc"]) and c["acc"][i] is not None and c[x_key][i] is not None]
        if pts:
            accs = [a for _, a in pts]
            out.append((sum(x for x, _ in pts) / len(pts), sum(accs) / len(accs), min(accs), max(accs)))
    return out


def plot_compare(summary: dict, path: str | Path, title: str = "") -> None:
    """Probe accuracy against stream images seen and against compute, one line per group (the mean over its runs
    at each evaluation, group_curve; the band or bar spans its runs' lowest to highest), saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = summary["groups"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for g in groups:
        label = f"{g['label']} (n={g['n']}{'' if g['complete'] else ', incomplete'})"
        for ax, x_key in zip(axes, ("samples_seen", "forward_equivalents")):
            pts = group_curve(g["curves"], x_key)
            if not pts:
                continue
            xs, mean, lo, hi = ([p[k] for p in pts] for k in range(4))
            line, = ax.plot(xs, [100 * m for m in mean], marker="o", ms=3, label=label if x_key == "samples_seen"
                            else None)
            if g["n"] > 1 and len(pts) > 1:
                ax.fill_between(xs, [100 * v for v in lo], [100 * v for v in hi], color=line.get_color(), alpha=0.2)
            elif g["n"] > 1:  # one evaluation: a bar, not a band of no width
                ax.errorbar(xs, [100 * m for m in mean], yerr=[[100 * (m - v) for m, v in zip(mean, lo)],
                                                              [100 * (v - m) for m, v in zip(mean, hi)]],
                            color=line.get_color(), capsize=3, ls="none")
    axes[0].set_xlabel("stream images seen")
    axes[1].set_xlabel("compute (forwards of one crop; backward = 2)")
    for ax in axes:
        ax.set_ylabel("linear probe accuracy, all test classes (%)")
        ax.grid(alpha=0.3)
    fig.legend(loc="lower center", ncol=min(3, len(groups)), fontsize=8, frameon=False)
    runs = sum(g["n"] for g in groups)
    fig.suptitle(title or f"{len(groups)} groups of {runs} runs: mean over each group's seeds, band: lowest to highest")
    fig.tight_layout(rect=(0, 0.08 + 0.04 * ((len(groups) - 1) // 3), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
