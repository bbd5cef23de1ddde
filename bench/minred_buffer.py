#!/usr/bin/env python
"""Why MinRed's buffer holds a few classes: what it keeps from a balanced pool, after one update, and over the
whole stream with the features held fixed. Not a test.

    STREAMING_SSL_DATA=../shared/data .venv/bin/python bench/minred_buffer.py \
        runs/acc_bf16/online_cifar10_minred runs/acc_bf16/online_cifar10_replay runs/acc_bf16/offline_1epoch

MinRed's buffer on a class-incremental stream ends up holding a few classes, those of the latest experience
(bench/buffer_classes.py). Is that what the model's features make redundant, or the stream's order? For each
checkpoint (a run directory's newest, or a file), three analyses with its model.

1. A balanced pool. A seeded pool of `--per-class` training images of every class (the same pool for every
checkpoint), their whole-image features as MinRed computes them (`model_features`: eval mode, z or h), and

* per class, the mean cosine similarity of an image to its nearest neighbour in the pool (what MinRed drops:
  the image whose nearest neighbour is closest);
* the class histogram of the `--keep` images `minred_keep` retains from the pool (a balanced pool: a choice
  blind to classes keeps about `keep / classes` of each).

When the run's stream is class-incremental (or online over a class-incremental split), classes are also grouped
by the experience that brought them, and the experience the checkpoint was in is named. `--random-init` adds
the first checkpoint's architecture, untrained: what the architecture alone prefers.

2. One update. The stream's own situation, `--draws` times from the same checkpoint: a balanced buffer of
`--keep` images, 10 fresh images of one class of the current experience (new stream images) and 10 buffer images
(as if replayed) get one EMP-SSL update (the run's augmentation, objective and LARS with the checkpoint's
optimizer state, so its learning rate and momentum); MinRed drops 10 of the buffer plus the fresh images before
and after that update, as the plugin does right after each update. Reported: how many fresh and replayed images
it drops, and how many of the images it drops before the update it still drops after it (and, as the floor of
numerical noise, with the same weights' features in float32 instead of the run's precision). If an update
reshuffles which images look most redundant, MinRed's drops are close to random from one update to the next,
and random eviction keeps only the newest images.

3. The stream with fixed features (`--simulate`, for runs whose stream is split by class). The features of every
training image under this checkpoint's model, computed once; then the replay plugin's buffer process over the
run's class order (experiences in order, each one's images in a seeded order, `batch` stream images per update;
MinRed and, as the control, the reservoir with the plugin's own functions), with the class histogram of the buffer
at the end of every experience. A recency that appears here too comes from MinRed and the order of the stream,
not from the model changing under the buffer.

Writes bench/results/minred_buffer.json and .png (analysis 3's buffers), and prints three tables;
`--report-only` prints and draws an existing JSON again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from streaming_ssl.build import build_optimizer, per_class_subset  # noqa: E402
from streaming_ssl.cl.replay import last_writers, minred_keep, model_features, reservoir_slots  # noqa: E402
from streaming_ssl.device import autocast  # noqa: E402
from streaming_ssl.objective import emp_ssl_loss  # noqa: E402
from streaming_ssl.probe_run import load_checkpoint_model  # noqa: E402


def balanced_pool(targets: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Row indices: `per_class` rows of every class (all of a smaller class), each class's drawn by a seeded
    permutation; sorted by class, then row."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for c in range(int(targets.max()) + 1):
        idx = torch.nonzero(targets == c).flatten()
        rows.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]].sort().values)
    return torch.cat(rows)


def nearest_neighbour_similarity(features: torch.Tensor) -> torch.Tensor:
    """(N,) cosine similarity of each row to its most similar other row."""
    f = F.normalize(features.float(), dim=1)
    sim = f @ f.T
    sim.fill_diagonal_(float("-inf"))
    return sim.max(dim=1).values


def per_group(values: torch.Tensor, labels: torch.Tensor, n: int, reduce: str) -> list[float]:
    out = []
    for c in range(n):
        v = values[labels == c]
        out.append(float(v.mean()) if reduce == "mean" else int(v.sum()))
    return out


def experience_split(cfg, num_classes: int) -> list[list[int]] | None:
    """The classes of each experience of the run's stream when it is split by class, else None."""
    from scenarios.streams import plan_class_split

    s = cfg.stream
    if not (s.mode == "class_incremental" or (s.mode == "online" and s.online_base == "class_incremental")):
        return None
    return plan_class_split(num_classes, n_experiences=s.n_experiences, classes_per_experience=s.classes_per_experience,
                            experience_classes=s.experience_classes, seed=s.class_order_seed)


def current_experience(split: list[list[int]], train_targets: torch.Tensor, samples_seen: int, epochs: int) -> int | None:
    """The experience the stream position `samples_seen` is in (the last one at its end); None with epochs > 1."""
    if epochs != 1:
        return None
    counts = torch.bincount(train_targets, minlength=max(max(e) for e in split) + 1)
    end = 0
    for k, classes in enumerate(split):
        end += int(counts[classes].sum())
        if samples_seen <= end:
            return k
    return len(split) - 1


def one_update(run, images: torch.Tensor, seed: int) -> float:
    """One EMP-SSL update of `run.model` on uint8 `images`, in place, as the strategy makes it: the run's
    augmentation (seeded), the objective with the run's eps2 and lambda, LARS with the checkpoint's optimizer state.
    Returns the loss."""
    opt = build_optimizer(run.cfg, run.model)
    saved, n = run.state["optimizer"], len(opt.param_groups)
    if len(saved["param_groups"]) > n:  # groups of plugins' trainable modules (a distillation predictor) come last
        groups = saved["param_groups"][:n]
        ids = {i for g in groups for i in g["params"]}
        saved = {"state": {i: v for i, v in saved["state"].items() if i in ids}, "param_groups": groups}
    opt.load_state_dict(saved)
    run.model.train()
    gen = torch.Generator(device=run.device).manual_seed(seed)
    patches = run.augment(images, gen)
    with autocast(run.device, run.amp_dtype):
        _, z = run.model(patches)
    loss, _ = emp_ssl_loss(z, run.augment.n_patches, eps2=run.cfg.objective.eps2, lam=run.cfg.objective.lam)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def choices(feats: torch.Tensor, n_buffer: int, replayed: torch.Tensor) -> dict:
    """MinRed over (buffer then fresh) features, dropping as many rows as there are fresh ones (what one update of
    the plugin does): the rows dropped, how many of them are fresh or replayed, and the mean nearest-neighbour
    similarity of the fresh rows and of the buffer's other rows."""
    n_fresh = len(feats) - n_buffer
    alive = torch.zeros(len(feats), dtype=torch.bool)
    alive[minred_keep(feats, n_buffer)] = True
    dropped = (~alive).nonzero().flatten()
    nn_sim = nearest_neighbour_similarity(feats)
    others = torch.ones(n_buffer, dtype=torch.bool)
    others[replayed] = False
    return {"fresh_dropped": int((dropped >= n_buffer).sum()), "replayed_dropped": int(torch.isin(dropped, replayed).sum()),
            "n_fresh": n_fresh, "fresh_nn_similarity": float(nn_sim[n_buffer:].mean()),
            "other_nn_similarity": float(nn_sim[:n_buffer][others].mean()), "dropped": dropped.tolist()}


def agreement(a: list[int], b: list[int]) -> float:
    """Share of the rows dropped in `a` also dropped in `b` (equal sizes)."""
    return len(set(a) & set(b)) / max(1, len(a))


def update_effect(run, train, buffer: torch.Tensor, *, which: list[str], draws: int, seed: int, classes: list[int],
                  n_fresh: int = 10, n_replayed: int = 10) -> dict:
    """MinRed's choice over a balanced buffer (training-image rows `buffer`) + `n_fresh` fresh images before and
    after one update on fresh + replayed (see the module docstring); `draws` times from the same weights, the fresh
    class cycling through `classes`. Also how many of the rows it drops it still drops after the update, and, as
    the floor of numerical noise, with the features of the same weights in float32 instead of the run's
    precision."""
    start = {k: v.clone() for k, v in run.model.state_dict().items()}
    in_pool = torch.zeros(len(train.targets), dtype=torch.bool)
    in_pool[buffer] = True
    pool_images = train.images[buffer].to(run.device)
    gen = torch.Generator().manual_seed(seed + 1)
    rows = {w: {"before": [], "after": [], "drop_agreement_after_update": [],
                "drop_agreement_float32": []} for w in which}
    losses = []

    def features(images, w, amp):
        return model_features(run.model, images, run.augment, which=w, amp_dtype=amp).cpu()

    for d in range(draws):
        c = classes[d % len(classes)]
        candidates = torch.nonzero((train.targets == c) & ~in_pool).flatten()
        fresh = train.images[candidates[torch.randperm(len(candidates), generator=gen)[:n_fresh]]].to(run.device)
        replayed = torch.randperm(len(buffer), generator=gen)[:n_replayed]
        offered = torch.cat([pool_images, fresh])
        run.model.load_state_dict(start)
        before = {w: choices(features(offered, w, run.amp_dtype), len(buffer), replayed) for w in which}
        fp32 = {w: choices(features(offered, w, None), len(buffer), replayed) for w in which}
        losses.append(one_update(run, torch.cat([fresh, pool_images[replayed.to(run.device)]]), seed + d))
        for w in which:
            after = choices(features(offered, w, run.amp_dtype), len(buffer), replayed)
            rows[w]["before"].append(before[w])
            rows[w]["after"].append(after)
            rows[w]["drop_agreement_after_update"].append(agreement(before[w]["dropped"], after["dropped"]))
            rows[w]["drop_agreement_float32"].append(agreement(before[w]["dropped"], fp32[w]["dropped"]))
    run.model.load_state_dict(start)
    mean = {}
    for w, by in rows.items():
        mean[w] = {when: {k: sum(r[k] for r in by[when]) / len(by[when]) for k in by[when][0] if k != "dropped"}
                   for when in ("before", "after")}
        for k in ("drop_agreement_after_update", "drop_agreement_float32"):
            mean[w][k] = sum(by[k]) / len(by[k])
    return {"draws": draws, "fresh_classes": classes, "buffer": len(buffer), "n_fresh": n_fresh, "n_replayed": n_replayed,
            "lr": float(run.state["optimizer"]["param_groups"][0]["lr"]), "losses": losses, "mean": mean,
            "per_draw": rows}


def simulate_buffer(features: torch.Tensor, targets: torch.Tensor, split: list[list[int]], *, policy: str, size: int,
                    batch: int, seed: int, random_share: float = 0.0) -> list[list[int]]:
    """The buffer's class histogram at the end of every experience of a class-split stream with fixed `features`
    (N, d) of all N training images: the plugin's buffer process (candidates = buffer then new images; MinRed keeps
    `size` by minred_keep, the reservoir places by reservoir_slots), `batch` images per update, each experience's
    images in a seeded order. policy "minred" with `random_share` > 0: each image to drop is, with that
    probability, a uniformly random candidate instead of MinRed's (1: random eviction)."""
    gen = torch.Generator().manual_seed(seed)
    insert_gen = torch.Generator().manual_seed(seed + 1)
    n_classes = int(targets.max()) + 1
    buf = torch.zeros(0, dtype=torch.long)  # training-image indices held
    seen, out = 0, []
    for classes in split:
        rows = torch.nonzero(torch.isin(targets, torch.tensor(classes))).flatten()
        rows = rows[torch.randperm(len(rows), generator=gen)]
        for lo in range(0, len(rows), batch):
            new = rows[lo:lo + batch]
            if policy == "minred":
                cand = torch.cat([buf, new])
                if len(cand) > size and random_share > 0:  # the random drops first, then MinRed's
                    n_random = int(torch.binomial(torch.tensor(float(len(cand) - size)), torch.tensor(random_share),
                                                  generator=gen))
                    cand = cand[torch.randperm(len(cand), generator=gen)[n_random:].sort().values]
                buf = cand if len(cand) <= size else cand[minred_keep(features[cand], size)]
            else:
                slots = reservoir_slots(seen, len(new), size, insert_gen)
                dst, src = last_writers(slots, size)
                grown = torch.full((size,), -1, dtype=torch.long)
                grown[:len(buf)] = buf
                grown[dst] = new[src]
                buf = grown[grown >= 0]
            seen += len(new)
        out.append(torch.bincount(targets[buf], minlength=n_classes).tolist())
    return out


def stream_with_fixed_features(run, train, split: list[list[int]], *, size: int, batch: int, which: list[str],
                               seed: int, random_shares: dict[str, float]) -> dict:
    """simulate_buffer for the reservoir, random eviction, and MinRed under this model's features (each of `which`;
    also with the share `random_shares[w]` of its drops random, when given)."""
    sim = dict(size=size, batch=batch, seed=seed)
    none = torch.zeros(len(train.targets), 1)
    out = {"size": size, "batch": batch, "experience_classes": split,
           "reservoir": simulate_buffer(none, train.targets, split, policy="reservoir", **sim),
           "random": simulate_buffer(none, train.targets, split, policy="minred", random_share=1.0, **sim)}
    for w in which:
        feats = model_features(run.model, train.images.to(run.device), run.augment, which=w,
                               amp_dtype=run.amp_dtype).cpu()
        out[f"minred_{w}"] = simulate_buffer(feats, train.targets, split, policy="minred", **sim)
        if random_shares.get(w):
            out[f"minred_{w}_random_share"] = random_shares[w]
            out[f"minred_{w}_partly_random"] = simulate_buffer(feats, train.targets, split, policy="minred",
                                                               random_share=random_shares[w], **sim)
    return out


def analyse(checkpoint: str, *, per_class: int, keep: int, which: list[str], seed: int, data: str | None,
            device: str, draws: int = 0, simulate: dict | None = None, sim_features: list[str] | None = None,
            random_init: bool = False) -> dict:
    """The three analyses of one checkpoint (the module docstring). `simulate`: None, or {"size", "batch", and
    "split" for a run whose stream is not split by class (the stream of another run)}; the run's own split, buffer
    size and batch win when it has them."""
    run = load_checkpoint_model(checkpoint, data_root=data, device=device, random_init=random_init)
    cfg = run.cfg
    train = per_class_subset(run.train_splits.train, cfg.data.train_per_class)  # the images the run trained on
    n_classes = run.train_splits.num_classes
    pool = balanced_pool(train.targets, per_class, seed)
    labels = train.targets[pool]
    images = train.images[pool].to(run.device)
    if keep >= len(pool):
        raise SystemExit(f"--keep {keep} must be below the pool's {len(pool)} images (--per-class x classes)")
    out = {"checkpoint": str(run.path), "random_init": random_init, "class_names": run.train_splits.class_names,
           "updates": int(run.state["position"]["global_step"]),
           "samples_seen": int(run.state["position"]["samples_seen"]),
           "stream": cfg.stream.mode, "pool": len(pool), "keep": keep, "features": {}}
    split = experience_split(cfg, n_classes)
    if split is not None:
        out["experience_classes"] = split
        out["current_experience"] = current_experience(split, train.targets, out["samples_seen"], cfg.stream.epochs)
    for w in which:
        feats = model_features(run.model, images, run.augment, which=w, amp_dtype=run.amp_dtype).cpu()
        nn_sim = nearest_neighbour_similarity(feats)
        kept = torch.zeros(len(pool), dtype=torch.long)
        kept[minred_keep(feats, keep)] = 1
        entry = {"nn_similarity_per_class": per_group(nn_sim, labels, n_classes, "mean"),
                 "kept_per_class": per_group(kept, labels, n_classes, "sum")}
        entry["kept_largest_share"] = max(entry["kept_per_class"]) / keep
        if split is not None:
            entry["kept_per_experience"] = [sum(entry["kept_per_class"][c] for c in e) for e in split]
            if out["current_experience"] is not None:
                entry["kept_share_current_experience"] = entry["kept_per_experience"][out["current_experience"]] / keep
        out["features"][w] = entry
    if draws and not random_init:
        cur = out.get("current_experience")
        classes = split[cur] if split is not None and cur is not None else list(range(n_classes))
        buffer = balanced_pool(train.targets, keep // n_classes, seed)  # a buffer of `keep` images, as the plugin's
        out["one_update"] = update_effect(run, train, buffer, which=which, draws=draws, seed=seed, classes=classes)
    sim_split = split if split is not None else (simulate or {}).get("split")
    if simulate is not None and sim_split is not None:
        r = cfg.cl.replay
        size, batch = (r.size, cfg.train.batch_size) if split is not None and r.policy != "none" else (
            simulate["size"], simulate["batch"])
        # the share of MinRed's drops one update changes (analysis 2), as a per-drop chance of a random one
        shares = {w: 1 - m["drop_agreement_after_update"] for w, m in out.get("one_update", {}).get("mean", {}).items()}
        out["stream_fixed_features"] = stream_with_fixed_features(run, train, sim_split, size=size, batch=batch,
                                                                  which=sim_features or which, seed=seed,
                                                                  random_shares=shares)
    return out


def print_tables(results: dict) -> None:
    print(f"{'run':44} f  kept per class (nearest-neighbour similarity)  largest  current exp.")
    for name, r in results.items():
        for w, e in r["features"].items():
            cells = " ".join(f"{k:3d}({s:.2f})" for k, s in zip(e["kept_per_class"], e["nn_similarity_per_class"]))
            cur = e.get("kept_share_current_experience")
            print(f"{name[-44:]:44} {w}  {cells}  {e['kept_largest_share']:.2f}  {'-' if cur is None else f'{cur:.2f}'}")
    print(f"\n{'run':44} f  of the 10 MinRed drops from a balanced buffer + 10 fresh images: fresh / replayed, "
          "before -> after one update on fresh + 10 replayed")
    for name, r in results.items():
        for w, by in r.get("one_update", {}).get("mean", {}).items():
            b, a = by["before"], by["after"]
            print(f"{name[-44:]:44} {w}  {b['fresh_dropped']:.1f} / {b['replayed_dropped']:.1f} -> "
                  f"{a['fresh_dropped']:.1f} / {a['replayed_dropped']:.1f}   of its drops: "
                  f"{by['drop_agreement_after_update']:.2f} still after the update, "
                  f"{by['drop_agreement_float32']:.2f} in float32")
    print("\nthe stream with fixed features: the buffer's class histogram at the end of each experience")
    for name, r in results.items():
        sim = r.get("stream_fixed_features")
        for key in [k for k in (sim or {}) if isinstance(sim[k], list) and k != "experience_classes"]:
            for k, hist in enumerate(sim[key]):
                print(f"{name[-40:]:40} {key:22} after exp. {k}: {' '.join(f'{c:4d}' for c in hist)}")


def plot(results: dict, path: Path) -> None:
    """One row of panels per run with a simulated stream: the buffer's classes at the end of every experience,
    per policy, with the share of the experience just ended written above each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(name, r) for name, r in results.items() if r.get("stream_fixed_features")]
    if not rows:
        return
    keys = [k for k in rows[0][1]["stream_fixed_features"] if isinstance(rows[0][1]["stream_fixed_features"][k], list)
            and k != "experience_classes"]
    fig, axes = plt.subplots(len(rows), len(keys), figsize=(2.6 * len(keys), 2.8 * len(rows)), squeeze=False,
                             sharey=True)
    colours = plt.get_cmap("tab10")
    for i, (name, r) in enumerate(rows):
        sim = r["stream_fixed_features"]
        split, names = sim["experience_classes"], r.get("class_names") or [str(c) for c in range(10)]
        for j, key in enumerate(keys):
            ax, hists = axes[i][j], torch.tensor(sim[key], dtype=torch.float)
            bottom = torch.zeros(len(hists))
            for c in range(hists.shape[1]):
                ax.bar(range(len(hists)), hists[:, c], bottom=bottom, color=colours(c % 10),
                       label=names[c] if i == j == 0 else None)
                bottom += hists[:, c]
            for k, classes in enumerate(split):
                ax.text(k, float(bottom[k]) * 1.01, f"{float(hists[k, classes].sum() / bottom[k]):.0%}",
                        ha="center", va="bottom", fontsize=7)
            ax.set_ylim(0, float(bottom.max()) * 1.12)
            label = key
            if key.endswith("_partly_random"):
                share = sim[key.replace("_partly_random", "_random_share")]
                label = key.replace("_partly_random", f" + {share:.0%} random")
            ax.set_title(f"{label}\n{Path(name).name[:28]}", fontsize=8, pad=4)
            ax.set_xticks(range(len(split)), [f"e{k}" for k in range(len(split))], fontsize=7)
    axes[0][0].set_ylabel("buffer images")
    fig.legend(loc="lower center", ncol=10, fontsize=7, frameon=False)
    fig.suptitle("the buffer at the end of each experience, features fixed; above a bar: the share of that "
                 "experience's classes", fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (newest checkpoint) or checkpoint files")
    p.add_argument("--per-class", type=int, default=100, help="pool images per class (default 100)")
    p.add_argument("--keep", type=int, default=500, help="images MinRed keeps of the pool (default 500)")
    p.add_argument("--features", nargs="+", choices=("z", "h"), default=["z", "h"])
    p.add_argument("--draws", type=int, default=4, help="one-update experiments per checkpoint (0: none)")
    p.add_argument("--simulate", action="store_true", help="also the stream with fixed features (analysis 3)")
    p.add_argument("--sim-features", nargs="+", choices=("z", "h"), default=None,
                   help="the features analysis 3 simulates MinRed with (default: --features)")
    p.add_argument("--random-init", action="store_true", help="also the first run's architecture, untrained")
    p.add_argument("--seed", type=int, default=0, help="seeds the pool (the same for every checkpoint)")
    p.add_argument("--data", default=None, help="data root (default: the runs' config / $STREAMING_SSL_DATA)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "minred_buffer.json")
    p.add_argument("--report-only", action="store_true", help="print and plot the JSON at --out again")
    args = p.parse_args(argv)
    if args.report_only:
        results = json.loads(args.out.read_text())["runs"]
        print_tables(results)
        plot(results, args.out.with_suffix(".png"))
        return 0
    kw = dict(per_class=args.per_class, keep=args.keep, which=args.features, seed=args.seed, data=args.data,
              device=args.device)
    simulate = {"size": 500, "batch": 10} if args.simulate else None
    results = {}
    for r in args.runs:  # a run without a class split simulates the stream of the first run before it that has one
        results[str(r)] = analyse(r, draws=args.draws, simulate=simulate, sim_features=args.sim_features, **kw)
        if simulate is not None and "split" not in simulate and "experience_classes" in results[str(r)]:
            sim = results[str(r)].get("stream_fixed_features", {})
            simulate.update(split=results[str(r)]["experience_classes"], size=sim.get("size", 500),
                            batch=sim.get("batch", 10))
    if args.random_init:
        results[f"{args.runs[0]} (random init)"] = analyse(args.runs[0], random_init=True, **kw)
    report = {"per_class": args.per_class, "keep": args.keep, "seed": args.seed, "runs": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_tables(results)
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
