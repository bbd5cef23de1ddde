"""bench/minred_buffer.py: its stream simulation is the replay plugin's buffer process, and its policies behave as
MinRed, the reservoir and random eviction must (no model training; CPU, seconds)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("minred_buffer", ROOT / "bench" / "minred_buffer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stream(per_class: int = 60, n_classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets (class-sorted) and uint8 8x8 images whose pixels encode the row index (so rows can be read back)."""
    targets = torch.arange(n_classes).repeat_interleave(per_class)
    rows = torch.arange(len(targets))
    code = torch.stack([rows // 256, rows % 256, torch.full_like(rows, 7)], dim=1).to(torch.uint8)
    images = code[:, :, None, None].expand(-1, -1, 8, 8).clone()
    images = images + torch.randint(0, 60, images.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    images[:, :, 0, 0] = code  # the pixel that says which row this is
    return targets, images


def _rows_of(images: torch.Tensor) -> list[int]:
    return sorted(int(x[0, 0, 0]) * 256 + int(x[1, 0, 0]) for x in images)


def _stream_order(targets: torch.Tensor, split: list[list[int]], seed: int) -> torch.Tensor:
    """The order simulate_buffer offers the rows in (each experience's rows permuted by the seeded generator)."""
    gen = torch.Generator().manual_seed(seed)
    order = []
    for classes in split:
        rows = torch.nonzero(torch.isin(targets, torch.tensor(classes))).flatten()
        order.append(rows[torch.randperm(len(rows), generator=gen)])
    return torch.cat(order)


def test_simulation_is_the_plugins_buffer_process_for_reservoir_and_minred() -> None:
    from streaming_ssl import ComputeCounters, EMPSSLModel, MultiPatchAugment, ReplayBufferPlugin
    from streaming_ssl.cl.replay import model_features

    mb = _module()
    targets, images = _stream()
    split, size, batch, seed = [[2, 0], [3, 1]], 30, 10, 5
    order = _stream_order(targets, split, seed)
    torch.manual_seed(0)
    model = EMPSSLModel(stem="cifar", width=0.125, feature_dim=32, proj_hidden_dim=32, proj_dim=16)
    augment = MultiPatchAugment(2, 8)
    features = model_features(model, images, augment)  # fixed: the model never trains here
    for policy in ("reservoir", "minred"):
        plugin = ReplayBufferPlugin(size=size, batch=batch, policy=policy, seed=seed)
        plugin.insert_gen.manual_seed(seed + 1)  # the simulation's insertion generator
        strategy = SimpleNamespace(core_model=model, augment=augment, amp_dtype=None, counters=ComputeCounters())
        held = []
        for lo in range(0, len(order), batch):
            plugin.insert(images[order[lo:lo + batch]], strategy)
            if lo + batch in (120, 240):  # the end of each experience
                held.append(_rows_of(plugin.buffer.contents()))
        hists = mb.simulate_buffer(features, targets, split, policy=policy, size=size, batch=batch, seed=seed)
        assert hists == [torch.bincount(targets[rows], minlength=4).tolist() for rows in held], policy
        assert all(sum(h) == size for h in hists)


def test_minred_keeps_a_cover_random_eviction_keeps_the_newest_reservoir_keeps_a_sample() -> None:
    mb = _module()
    targets, _ = _stream(per_class=200)
    gen = torch.Generator().manual_seed(1)
    features = torch.eye(4)[targets] + 0.05 * torch.randn(len(targets), 4, generator=gen)  # one tight cluster per class
    split, size, batch = [[0, 1], [2, 3]], 40, 10

    def run(policy: str, share: float = 0.0) -> list[list[int]]:
        return mb.simulate_buffer(features, targets, split, policy=policy, size=size, batch=batch, seed=0,
                                  random_share=share)

    minred, random, reservoir = run("minred"), run("minred", 1.0), run("reservoir")
    # MinRed drops from the densest cluster: every class seen stays, about evenly
    assert min(minred[0][:2]) >= 15 and min(minred[1]) >= 7, minred
    # random eviction: each old image survives an update with probability 40/50, 40 updates of the second half
    assert random[1][:2] == [0, 0] and sum(random[0][:2]) == size, random
    # the reservoir holds a uniform sample of all 800 images: about half from the first experience
    assert 10 <= sum(reservoir[1][:2]) <= 30, reservoir
    # a partly random MinRed lies between the two
    partly = run("minred", 0.5)
    assert sum(random[1][:2]) <= sum(partly[1][:2]) <= sum(minred[1][:2]), (partly, minred)


def test_balanced_pool_current_experience_and_nearest_neighbours() -> None:
    mb = _module()
    targets = torch.tensor([0] * 5 + [1] * 3 + [2] * 6)
    pool = mb.balanced_pool(targets, 4, seed=0)
    assert torch.bincount(targets[pool]).tolist() == [4, 3, 4] and len(set(pool.tolist())) == 11
    assert torch.equal(pool, mb.balanced_pool(targets, 4, seed=0))  # seeded
    split = [[2], [0, 1]]  # experience sizes 6, 8
    assert [mb.current_experience(split, targets, s, 1) for s in (1, 6, 7, 14)] == [0, 0, 1, 1]
    assert mb.current_experience(split, targets, 7, 2) is None
    f = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
    sim = mb.nearest_neighbour_similarity(f)
    assert sim[0] == sim[1] and sim[0] > 0.99 and abs(float(sim[2]) - 0.0995) < 1e-3
