"""Evaluation after experiences, as Avalanche metrics, and where its results go.

StreamEvaluator computes one evaluation row from frozen features (probe.py): linear-probe accuracy on
all classes and on the classes seen so far, the accuracy-matrix row A[t, j] (accuracy of the all-class
probe on the test images of the classes of parent experience j), average accuracy over seen
experiences, forgetting max_{s<t} A[s, j] - A[t, j], backward transfer, kNN accuracy, and transfer accuracy on
each out-of-domain dataset. With forward_transfer it also probes the model before it trains (its initialisation:
the baseline b) and reports forward transfer, how much training on the experiences before j helped j before j
itself was seen. ProbeMetric publishes the row as Avalanche MetricValues; JSONLLogger writes
one JSON object per evaluation; plot_run draws the accuracy matrix and the curves.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from avalanche.evaluation.metric_definitions import PluginMetric
from avalanche.evaluation.metric_results import MetricValue
from avalanche.logging import BaseLogger, TensorboardLogger, TextLogger

from streaming_ssl import distributed as ddp
from streaming_ssl.augment import MultiPatchAugment
from streaming_ssl.probe import extract_features, knn_predict, linear_probe_accuracy, recalibrate_batchnorm

log = logging.getLogger(__name__)


@dataclass
class ProbeSet:
    """Labelled images a probe is fitted (train) and scored (test) on."""

    name: str
    train_images: object
    train_labels: torch.Tensor
    test_images: object
    test_labels: torch.Tensor
    num_classes: int


def check_probe_set(probe_set: ProbeSet) -> None:
    """ValueError, naming the set and the fix, unless its images are what training takes (tensors of (N, 1|3, H, W),
    uint8 or float in [0, 1]; a lazily decoded source is left to its decoder) and its labels are integer tensors,
    one per image, in 0..num_classes-1. Checked once, before any probe: a normalised set was normalised again by
    the augmentation, and labels out of range failed deep inside the probe, after an experience had trained."""
    from streaming_ssl.strategy import StreamInputError, check_images

    for split in ("train", "test"):
        images, labels = getattr(probe_set, f"{split}_images"), getattr(probe_set, f"{split}_labels")
        where = f"probe set {probe_set.name!r}, {split}_"
        if isinstance(images, torch.Tensor):
            try:
                check_images(images)
            except StreamInputError as err:
                raise ValueError(f"{where}images: {err}") from None
        elif hasattr(images, "__array__"):
            raise ValueError(f"{where}images is a {type(images).__name__}: give torch tensors "
                             "(torch.from_numpy(x), channels first: .permute(0, 3, 1, 2) for (N, H, W, C) arrays)")
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point():
            raise ValueError(f"{where}labels must be a 1-D integer torch tensor, got "
                             f"{type(labels).__name__} {tuple(getattr(labels, 'shape', ()))}: torch.as_tensor(labels)")
        if hasattr(images, "__len__") and len(images) != len(labels):
            raise ValueError(f"{where}images holds {len(images)} images but {where}labels {len(labels)} labels")
        lo, hi = (int(labels.min()), int(labels.max())) if len(labels) else (0, 0)
        if lo < 0 or hi >= probe_set.num_classes:
            raise ValueError(f"{where}labels span {lo}..{hi}, but num_classes is {probe_set.num_classes}: labels must "
                             "be 0..num_classes-1 (subtract the first label)")


def forgetting(history: list[list[float]], row: list[float], n_seen: int) -> list[float | None]:
    """max over earlier rows s (where experience j was already seen) of A[s, j] - A[t, j], per j < n_seen - 1.

    history holds (n_seen_at_s, A[s]) pairs flattened as rows with n_seen stored at the end.
    """
    out: list[float | None] = []
    for j in range(len(row)):
        earlier = [h[j] for h in history if int(h[-1]) > j]
        out.append(max(earlier) - row[j] if earlier and j < n_seen - 1 else None)
    return out


def backward_transfer(history: list[list[float]], row: list[float], n_seen: int) -> float | None:
    """BWT (Lopez-Paz and Ranzato, 2017): mean over j < n_seen - 1 of A[t, j] - A[j, j], where A[j, j] is the
    accuracy on experience j at the last evaluation with j the newest experience seen (its end; online with
    eval_every > 0 and no evaluation there, the last one inside j; history rows as in `forgetting`). Experiences never
    evaluated while they were the newest are left out; None when none is left (t = 0)."""
    gaps = []
    for j in range(min(len(row), n_seen - 1)):
        at_end = [h[j] for h in history if int(h[-1]) == j + 1]
        if at_end:
            gaps.append(row[j] - at_end[-1])
    return sum(gaps) / len(gaps) if gaps else None


def forward_transfer(history: list[list[float]], baseline: list[float] | None, n_seen: int) -> float | None:
    """FWT (Lopez-Paz and Ranzato, 2017): mean over 0 < j < n_seen of A[j-1, j] - b[j], where A[j-1, j] is the
    accuracy on experience j at the last evaluation with j experiences seen (the end of experience j - 1: j not yet
    trained; history rows as in `forgetting`) and b[j] the accuracy on j of the model at initialisation (`baseline`,
    StreamEvaluator.evaluate_baseline). Experiences never evaluated before they trained, or undefined (NaN: no test
    image), are left out; None without a baseline or when nothing is left (t = 0)."""
    if baseline is None:
        return None
    gaps = []
    for j in range(1, min(len(baseline), n_seen)):
        before = [h[j] for h in history if int(h[-1]) == j]
        if before and before[-1] == before[-1] and baseline[j] == baseline[j]:
            gaps.append(before[-1] - baseline[j])
    return sum(gaps) / len(gaps) if gaps else None


class StreamEvaluator:
    """Fits the probes on frozen features and returns one evaluation row (a flat dict).

    forward_transfer: probe the model once before training (evaluate_baseline; ProbeMetric does it before a run's
    first update) and add `probe/fwt` and the baseline's accuracies (`probe/init_acc_all`,
    `probe/init_acc_matrix_row`, `knn/init_acc_all`, `transfer/init_<dataset>`) to every row. The baseline is part
    of the evaluator's state, so a resumed run keeps it.
    """

    def __init__(self, *, in_domain: ProbeSet, transfer: list[ProbeSet], parent_classes: list[list[int]],
                 augment: MultiPatchAugment, device: torch.device, amp_dtype: torch.dtype | None = None,
                 channels_last: bool = True, patches: int = 0, batch_size: int = 256, knn_k: int = 20,
                 knn_temperature: float = 0.07, seen_classes: bool = True, probe_kwargs: dict | None = None,
                 seed: int = 0, bn_recalibrate: int = 0, forward_transfer: bool = False) -> None:
        for probe_set in (in_domain, *transfer):
            check_probe_set(probe_set)
        outside = sorted({c for classes in parent_classes for c in classes if not 0 <= c < in_domain.num_classes})
        if outside:
            raise ValueError(f"parent_classes names the classes {outside}, outside the {in_domain.num_classes} "
                             f"classes of {in_domain.name!r} (0..{in_domain.num_classes - 1}): give each experience's "
                             "classes as the probe set's labels number them")
        self.in_domain, self.transfer, self.parent_classes = in_domain, transfer, parent_classes
        self.augment, self.device, self.amp_dtype, self.channels_last = augment, device, amp_dtype, channels_last
        self.patches, self.batch_size, self.knn_k, self.knn_temperature = patches, batch_size, knn_k, knn_temperature
        self.seen_classes, self.probe_kwargs, self.seed = seen_classes, dict(probe_kwargs or {}), seed
        self.bn_recalibrate, self.forward_transfer = bn_recalibrate, forward_transfer
        self.history: list[list[float]] = []  # A rows, each followed by the number of seen experiences
        # the probes of the model at initialisation (evaluate_baseline): {"acc_all", "acc_matrix_row", "knn_acc_all"}
        self.baseline: dict | None = None

    def state_dict(self) -> dict:
        return {"history": [list(map(float, h)) for h in self.history], "baseline": copy.deepcopy(self.baseline)}

    def load_state_dict(self, state: dict) -> None:
        self.history = [list(h) for h in state["history"]]
        self.baseline = copy.deepcopy(state.get("baseline"))  # (none in checkpoints from before forward transfer)

    def _features(self, model, images, tag: str) -> torch.Tensor:
        return extract_features(model, images, self.augment, device=self.device, batch_size=self.batch_size,
                                patches=self.patches, amp_dtype=self.amp_dtype, channels_last=self.channels_last,
                                seed=self.seed, progress=f"features {tag}")

    def _probed_model(self, model: torch.nn.Module, probe_set: ProbeSet) -> torch.nn.Module:
        """The model, or (eval.bn_recalibrate > 0) a copy with BatchNorm statistics of `probe_set`'s training images."""
        if not self.bn_recalibrate:
            return model
        probed = copy.deepcopy(model)
        recalibrate_batchnorm(probed, probe_set.train_images, self.augment, n_images=self.bn_recalibrate,
                              device=self.device, batch_size=self.batch_size, patches=self.patches,
                              amp_dtype=self.amp_dtype, seed=self.seed, progress=f"batchnorm {probe_set.name}")
        return probed

    def _probe(self, tr, ytr, te, yte, num_classes):
        return linear_probe_accuracy(tr, ytr, te, yte, num_classes, seed=self.seed, **self.probe_kwargs)

    def check_seen(self, n_seen: int) -> None:
        """Refuse an evaluation after `n_seen` parent experiences where parent_classes lists fewer: the row would
        average columns that do not exist and report forgetting of classes not seen yet."""
        if not 1 <= n_seen <= len(self.parent_classes):
            raise ValueError(
                f"an evaluation after {n_seen} experience(s), but parent_classes lists {len(self.parent_classes)}: "
                "on an online stream (split_online_stream, or any stream of more experiences than parent_classes) "
                "add the plugin EvalSchedule(step_parent, every) that maps each training experience to its parent "
                "(streaming_ssl.plugins; README \"Use it from Python\"), or give one parent_classes entry per "
                "training experience")

    def _matrix_row(self, pred: torch.Tensor) -> list[float]:
        """A[t, j] for every parent experience j: the all-class probe's accuracy on the test images of j's classes
        (NaN where j has none)."""
        labels = self.in_domain.test_labels
        correct = (pred == labels)
        a_row = []
        for classes in self.parent_classes:
            mask = torch.isin(labels, torch.as_tensor(classes))
            a_row.append(float(correct[mask].float().mean()) if mask.any() else float("nan"))
        return a_row

    def _transfer(self, model: torch.nn.Module, t: ProbeSet) -> float:
        """The linear probe's accuracy on the out-of-domain set `t`."""
        probed = self._probed_model(model, t)
        ttr = self._features(probed, t.train_images, f"{t.name}/train")
        tte = self._features(probed, t.test_images, f"{t.name}/test")
        return self._probe(ttr, t.train_labels, tte, t.test_labels, t.num_classes)[0]

    def evaluate_baseline(self, model: torch.nn.Module) -> dict:
        """Probe `model` as it is before training (its initialisation) and keep the result as forward transfer's
        baseline b: {"acc_all", "acc_matrix_row", "knn_acc_all" (None without kNN), "transfer" ({dataset: accuracy}
        of the out-of-domain probes)}. Draws no global random number (the probe's layer is built under a forked
        RNG), so training goes on as without it."""
        d = self.in_domain
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            probed = self._probed_model(model, d)
            tr = self._features(probed, d.train_images, f"{d.name}/train (initialisation)")
            te = self._features(probed, d.test_images, f"{d.name}/test (initialisation)")
            acc_all, pred = self._probe(tr, d.train_labels, te, d.test_labels, d.num_classes)
            knn = None
            if self.knn_k:
                knn = knn_predict(tr, d.train_labels, te, d.num_classes, k=self.knn_k,
                                  temperature=self.knn_temperature)
                knn = float((knn == d.test_labels).float().mean())
            transfer = {t.name: self._transfer(model, t) for t in self.transfer}
        self.baseline = {"acc_all": acc_all, "acc_matrix_row": self._matrix_row(pred), "knn_acc_all": knn,
                         "transfer": transfer}
        return copy.deepcopy(self.baseline)

    def evaluate(self, model: torch.nn.Module, n_seen: int) -> dict:
        """One evaluation with `n_seen` parent experiences seen so far."""
        self.check_seen(n_seen)
        d = self.in_domain
        t0 = time.perf_counter()
        probed = self._probed_model(model, d)
        tr = self._features(probed, d.train_images, f"{d.name}/train")
        te = self._features(probed, d.test_images, f"{d.name}/test")
        row: dict = {}
        acc_all, pred = self._probe(tr, d.train_labels, te, d.test_labels, d.num_classes)
        row["probe/acc_all"] = acc_all
        a_row = self._matrix_row(pred)
        row["probe/acc_matrix_row"] = a_row
        seen = sorted({c for classes in self.parent_classes[:n_seen] for c in classes})
        row["probe/avg_acc"] = sum(a_row[:n_seen]) / n_seen
        if self.seen_classes and len(seen) < d.num_classes and len(seen) > 1:
            seen_t = torch.as_tensor(seen)
            mtr, mte = torch.isin(d.train_labels, seen_t), torch.isin(d.test_labels, seen_t)
            remap = torch.full((d.num_classes,), -1, dtype=torch.long)
            remap[seen_t] = torch.arange(len(seen))
            row["probe/acc_seen"], _ = self._probe(tr[mtr], remap[d.train_labels[mtr]], te[mte],
                                                   remap[d.test_labels[mte]], len(seen))
        else:
            row["probe/acc_seen"] = acc_all if len(seen) == d.num_classes else None
        forget = forgetting(self.history, a_row, n_seen)
        row["probe/forgetting"] = forget
        values = [f for f in forget if f is not None]
        row["probe/avg_forgetting"] = sum(values) / len(values) if values else None
        row["probe/bwt"] = backward_transfer(self.history, a_row, n_seen)
        if self.forward_transfer:
            b = self.baseline
            row["probe/fwt"] = forward_transfer(self.history, None if b is None else b["acc_matrix_row"], n_seen)
            if b is not None:
                row["probe/init_acc_all"] = b["acc_all"]
                row["probe/init_acc_matrix_row"] = list(b["acc_matrix_row"])
                if b.get("knn_acc_all") is not None:
                    row["knn/init_acc_all"] = b["knn_acc_all"]
        self.history.append(a_row + [float(n_seen)])
        if self.knn_k:
            knn = knn_predict(tr, d.train_labels, te, d.num_classes, k=self.knn_k, temperature=self.knn_temperature)
            row["knn/acc_all"] = float((knn == d.test_labels).float().mean())
        for t in self.transfer:
            row[f"transfer/{t.name}"] = self._transfer(model, t)
            init = (self.baseline or {}).get("transfer", {}).get(t.name) if self.forward_transfer else None
            if init is not None:
                row[f"transfer/init_{t.name}"] = init
        row["time/eval_seconds"] = time.perf_counter() - t0
        return row


class ProbeMetric(PluginMetric):
    """Runs the StreamEvaluator after training experiences and emits the row as Avalanche MetricValues.

    Which experiences: `strategy.eval_due` when an EvalSchedule plugin set it (plugins.py), else every one;
    parent experiences seen: `strategy.eval_seen`, else the experiences trained. The row also carries the
    strategy's compute counters (`compute/...`) when it has them.
    """

    def __init__(self, evaluator: StreamEvaluator, model: torch.nn.Module) -> None:
        super().__init__()
        self.evaluator, self.model = evaluator, model
        self.last_row: dict | None = None
        self.start_time = time.time()
        self.time_offset = 0.0  # seconds of earlier sessions of a resumed run

    def reset(self) -> None:
        self.last_row = None

    def result(self) -> dict | None:
        return self.last_row

    def before_training_exp(self, strategy) -> None:
        # without an EvalSchedule (which sets eval_seen), the evaluation after this experience counts it as a parent
        # experience: refuse before it trains, not after
        from streaming_ssl.plugins import EvalSchedule  # (plugins.py imports this module)

        if not any(isinstance(p, EvalSchedule) for p in getattr(strategy, "plugins", [])):
            self.evaluator.check_seen(strategy.stream_step + 1)
        self._baseline(strategy)

    def _baseline(self, strategy) -> None:
        """Forward transfer's baseline: the model at initialisation, probed once right before a run's first update
        (once the stop signals are handled: GracefulStop installs its handlers before the first experience). A
        resumed run has it in the evaluator's state (runner._fit takes it for a checkpoint saved without it)."""
        ev = self.evaluator
        if not ev.forward_transfer or ev.baseline is not None or strategy.global_step != 0:
            return
        t0 = time.perf_counter()
        b = ev.evaluate_baseline(self.model)
        log.info("before training (forward transfer's baseline): probe %s, kNN %s%s at initialisation (%.0f s)",
                 _pct(b["acc_all"]), _pct(b["knn_acc_all"]),
                 "".join(f", {name} {_pct(v)}" for name, v in b["transfer"].items()), time.perf_counter() - t0)

    def after_training_exp(self, strategy) -> list[MetricValue] | None:
        self.last_row = None
        if not getattr(strategy, "eval_due", True):
            return None
        if hasattr(strategy, "check_finite"):  # on CUDA a loss is checked every N updates: never probe a diverged
            strategy.check_finite()           # model (one host sync per evaluation)
        n_seen = getattr(strategy, "eval_seen", strategy.stream_step)
        row = {"experience": strategy.stream_step - 1, "parent_experience": n_seen - 1,
               "samples_seen": strategy.samples_seen, "updates": strategy.global_step}
        strategy.evaluating = True  # a stop now may cut it short (GracefulStop), when a checkpoint precedes it
        try:
            row.update(self.evaluator.evaluate(self.model, n_seen))
        finally:
            strategy.evaluating = False
        if hasattr(strategy, "counters"):
            row.update(strategy.counters.as_row())
        row["time/wall_seconds"] = self.time_offset + time.time() - self.start_time
        self.last_row = row
        log.info("after experience %d: probe %s (seen %s), kNN %s, avg forgetting %s", row["experience"],
                 _pct(row["probe/acc_all"]), _pct(row.get("probe/acc_seen")), _pct(row.get("knn/acc_all")),
                 _pct(row.get("probe/avg_forgetting")))
        x = strategy.stream_step
        return [MetricValue(self, name, value, x) for name, value in row.items()]


def _pct(v) -> str:
    """'12.34%'; '-' where there is no value yet (None) and 'n/a' where it is undefined (NaN: no test image)."""
    if v is None:
        return "-"
    return "n/a" if v != v else f"{100 * v:.2f}%"


def _is_scalar(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class JSONLLogger(BaseLogger):
    """Appends one JSON object per evaluation (the values of one ProbeMetric call) to a file."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)

    def log_metrics(self, metric_values: list[MetricValue]) -> None:
        row = {mv.name: mv.value for mv in metric_values if isinstance(mv.origin, ProbeMetric)}
        if row and ddp.is_main():
            with self.path.open("a") as fh:  # on disk before the checkpoint that counts it (a crash keeps the row)
                fh.write(json.dumps(row, allow_nan=True) + "\n")
                fh.flush()
                os.fsync(fh.fileno())


class ExperienceTextLogger(TextLogger):
    """Avalanche's TextLogger (log.txt), printing each evaluation under the experience it follows.

    TextLogger prints what it holds at the end of each epoch, but ProbeMetric reports after the experience, later:
    each row came out under the next experience's header, and the last one never. Here the row is printed, and
    the file flushed, after the experience (one evaluation per experience, or per evaluated one online)."""

    def after_training_epoch(self, strategy, metric_values, **kwargs) -> None:
        pass  # the epoch's line and the metrics held are printed after the experience

    def after_training_exp(self, strategy, metric_values, **kwargs) -> None:
        super().after_training_exp(strategy, metric_values, **kwargs)
        if self.metric_vals:
            print(f"-- Evaluation after training experience {strategy.experience.current_experience} --",
                  file=self.file)
            self.print_current_metrics()
            self.metric_vals = {}
        self.file.flush()


class ResumedTensorboardLogger(TensorboardLogger):
    """Avalanche's TensorboardLogger whose writer starts with `purge_step`: TensorBoard hides what the directory
    holds at steps >= purge_step (a resumed run: the evaluations logged after its checkpoint, logged again)."""

    def __init__(self, tb_log_dir: str | Path, purge_step: int | None = None) -> None:
        self.purge_step = purge_step
        super().__init__(tb_log_dir)

    def _make_writer(self, tb_log_dir, filename_suffix):
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(tb_log_dir, filename_suffix=filename_suffix, purge_step=self.purge_step)
        weakref.finalize(self, SummaryWriter.close, writer)  # as Avalanche's: closed when collected
        return writer


class ScalarTensorboardLogger(BaseLogger):
    """Avalanche's TensorboardLogger, given only scalars (matrix rows become one scalar per column)."""

    def __init__(self, inner: BaseLogger) -> None:
        super().__init__()
        self.inner = inner

    def log_metrics(self, metric_values: list[MetricValue]) -> None:
        flat = []
        for mv in metric_values:
            if _is_scalar(mv.value):
                flat.append(mv)
            elif isinstance(mv.value, list):
                flat += [MetricValue(mv.origin, f"{mv.name}/exp{j}", v, mv.x_plot)
                         for j, v in enumerate(mv.value) if _is_scalar(v)]
        self.inner.log_metrics(flat)

    def close(self) -> None:
        writer = getattr(self.inner, "writer", None)
        if writer is not None:
            writer.flush()
            writer.close()


def read_rows(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(rows: list[dict], path: str | Path, title: str = "") -> None:
    """Accuracy-matrix heatmap beside the accuracy-vs-experience curves, saved as PNG. A run with forward transfer's
    baseline (eval.forward_transfer) gets it as the first row, "init", and as the curves' first point, at -1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    if not rows:
        return
    init = rows[-1].get("probe/init_acc_matrix_row")
    matrix = [init] if init else []
    mat = torch.tensor(matrix + [r["probe/acc_matrix_row"] for r in rows], dtype=torch.float32) * 100
    xs = [r["experience"] for r in rows]  # numbered from 0, as metrics.jsonl, log.txt and train.log number them
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.8))
    im = ax0.imshow(mat.numpy(), cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax0.set_xlabel("test classes of experience j")
    ax0.set_ylabel("after experience (evaluation) t")
    ax0.set_yticks(range(len(matrix) + len(xs)), ["init"] * len(matrix) + [str(x) for x in xs])
    ax0.set_xticks(range(mat.shape[1]), [str(j) for j in range(mat.shape[1])])
    ax0.set_title("accuracy matrix A[t, j] (%)")
    if matrix:
        ax0.axhline(0.5, color="w", linewidth=2)  # the initialisation above, the evaluations below
    if mat.numel() <= 400:
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                ax0.text(j, i, f"{mat[i, j]:.0f}", ha="center", va="center", color="w", fontsize=7)
    fig.colorbar(im, ax=ax0)
    keys = ["probe/acc_all", "probe/acc_seen", "probe/avg_acc", "knn/acc_all"] + sorted(
        {k for r in rows for k in r if k.startswith("transfer/") and not k.startswith("transfer/init_")})
    for key in keys:
        ys = [r.get(key) for r in rows]
        pts = [(x, y * 100) for x, y in zip(xs, ys) if _is_scalar(y)]
        has_init = key in ("probe/acc_all", "knn/acc_all") or key.startswith("transfer/")
        start = rows[-1].get(key.replace("/", "/init_", 1)) if has_init else None
        if pts and _is_scalar(start):  # the initialisation, before experience 0
            pts.insert(0, (-1, start * 100))
        if pts:
            ax1.plot(*zip(*pts), marker="o", label=key)
    ax1.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax1.set_xlabel("after experience (-1: initialisation)" if init else "after experience")
    ax1.set_ylabel("accuracy (%)")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax1.set_title("accuracy after each evaluation")
    _save_figure(fig, path, title)


def boundary_updates(rows: list[dict], parent_ends: list[int]) -> list[float]:
    """The updates at which the stream passed each of `parent_ends` (samples seen at the end of a parent experience),
    from train.jsonl rows (update, samples_seen): interpolated between the logged rows around it, so exact where
    updates take equal batches and within one update otherwise; ends outside the logged rows are left out."""
    out = []
    pts = [(r["samples_seen"], r["update"]) for r in rows if "samples_seen" in r and "update" in r]
    for end in parent_ends:
        for (s0, u0), (s1, u1) in zip(pts, pts[1:]):
            if s0 < end <= s1:
                out.append(u0 + (end - s0) * (u1 - u0) / (s1 - s0))
                break
    return out


def plot_train(rows: list[dict], path: str | Path, title: str = "", parent_ends: list[int] | None = None) -> None:
    """The training curves of train.jsonl (plugins.TrainLog): one panel per logged value (loss, coding rate,
    invariance, the learning rate and any a method adds) against the update, boundaries dotted: those of the parent
    experiences given `parent_ends` (samples seen at the end of each, e.g. the cumulative `SSLStream.parent_sizes`;
    an online stream's classes change there), else those of the experiences where there are at most 50."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skip = {"update", "experience", "samples_seen"}
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in skip and k != "lr"]
    keys += ["lr"] if any(_is_scalar(r.get("lr")) for r in rows) else []
    if not rows or not keys:
        return
    cols = min(len(keys), 3)
    nrows = -(-len(keys) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    xs = [r["update"] for r in rows]
    if parent_ends is not None:
        bounds = boundary_updates(rows, parent_ends)
    else:
        bounds = [r["update"] for prev, r in zip(rows, rows[1:]) if r.get("experience") != prev.get("experience")]
    for ax, key in zip(axes.flat, keys):
        pts = [(x, r[key]) for x, r in zip(xs, rows) if _is_scalar(r.get(key))]
        if pts:
            ax.plot(*zip(*pts), lw=1)
        for b in bounds if len(bounds) <= 50 else []:  # online: a boundary every update or few, not drawn
            ax.axvline(b, color="0.7", ls=":", lw=0.8)
        ax.set_title(key)
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    _save_figure(fig, path, title)


def _save_figure(fig, path: str | Path, title: str) -> None:
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
