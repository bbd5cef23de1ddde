"""The cl config section (off by default, bad combinations refused at load), build_cl_plugins, and the compute
counters of a tiny stream against hand-computed numbers."""

from __future__ import annotations

import pytest
import torch

from streaming_ssl.cl import DistillPlugin, MixupPlugin, ReplayBufferPlugin, build_cl_plugins
from streaming_ssl.config import ConfigError, load_config
from tests.streaming_ssl.cl.tiny import BATCH, N_PATCHES, PROJ_DIM, SIZE, build_strategy, tiny_model


def _plugins(*overrides: str, train_size: int = 48) -> list:
    cfg = load_config(None, [f"model.proj_dim={PROJ_DIM}", *overrides])
    return build_cl_plugins(cfg, model=tiny_model(), train_size=train_size, device=torch.device("cpu"))


def test_everything_is_off_by_default() -> None:
    cfg = load_config(None)
    assert cfg.cl.replay.policy == "none" and not cfg.cl.distill.enabled and not cfg.cl.mixup.enabled
    assert _plugins() == []


def test_all_three_compose_in_a_fixed_order() -> None:
    plugins = _plugins("cl.replay.policy=minred", "cl.replay.size=10", "cl.replay.batch=4", "cl.distill.enabled=true",
                       "cl.distill.hidden_dim=8", "cl.mixup.enabled=true", "cl.mixup.alpha=0.5")
    mixup, replay, distill = plugins
    assert isinstance(mixup, MixupPlugin) and isinstance(replay, ReplayBufferPlugin)
    assert isinstance(distill, DistillPlugin)
    assert mixup.replay is replay and mixup.alpha == 0.5 and replay.policy == "minred" and replay.batch == 4
    assert distill.trainable_modules == [distill.predictor] and distill.predictor[0].in_features == PROJ_DIM
    assert distill.frozen_bn == "running"
    assert _plugins("cl.distill.enabled=true", "cl.distill.frozen_bn=batch")[0].frozen_bn == "batch"
    # PFR: the predictor maps the encoder's features h (model.feature_dim) to themselves
    (pfr,) = _plugins("cl.distill.enabled=true", "cl.distill.space=h", "model.feature_dim=32")
    assert pfr.space == "h" and pfr.predictor[0].in_features == pfr.predictor[-1].out_features == 32
    assert len({p.state_key for p in plugins}) == 3


@pytest.mark.parametrize(("overrides", "key", "fix"), [
    (["cl.replay.policy=fifo"], "cl.replay.policy", "reservoir"),
    (["cl.replay.policy=reservoir", "cl.replay.size=-5"], "cl.replay.size", ">= 1"),
    (["cl.replay.policy=reservoir", "cl.replay.batch=-1"], "cl.replay.batch", ">= 0"),
    (["cl.replay.policy=reservoir", "cl.replay.batch=0"], "cl.replay.batch", "cl.mixup.enabled=true"),
    (["cl.mixup.enabled=true"], "cl.mixup.enabled", "cl.replay.policy=reservoir"),
    (["cl.mixup.enabled=true", "cl.replay.policy=reservoir", "cl.mixup.alpha=0"], "cl.mixup.alpha", "> 0"),
    (["cl.distill.enabled=true", "stream.mode=offline"], "cl.distill.every", "cl.distill.every=N"),
    (["cl.distill.enabled=true", "stream.mode=online"], "cl.distill.every", "access_task_boundaries"),
    (["cl.distill.enabled=true", "cl.distill.weight=0"], "cl.distill.weight", "> 0"),
    (["cl.distill.every=-2"], "cl.distill.every", ">= 0"),
    (["cl.replay.minred_features=x"], "cl.replay.minred_features", "z"),
    (["cl.replay.policy=reservoir", "cl.replay.minred_refresh=stored"], "cl.replay.minred_refresh",
     "cl.replay.policy=minred"),
    (["cl.replay.minred_refresh=some"], "cl.replay.minred_refresh", "stored"),
    (["cl.replay.policy=minred", "cl.replay.minred_ema=1"], "cl.replay.minred_ema", "[0, 1)"),
    (["cl.replay.polcy=reservoir"], "cl.replay.polcy", "cl.replay.policy"),
    (["cl.distill.frozen_bn=eval"], "cl.distill.frozen_bn", "batch"),
])
def test_bad_combinations_are_refused_at_load(overrides: list[str], key: str, fix: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert key in str(err.value) and fix in str(err.value)


def test_good_combinations_load() -> None:
    for overrides in (["cl.distill.enabled=true", "stream.mode=offline", "cl.distill.every=50"],
                      ["cl.distill.enabled=true", "stream.mode=online", "stream.access_task_boundaries=true"],
                      ["cl.replay.policy=reservoir", "cl.replay.batch=0", "cl.mixup.enabled=true"]):
        load_config(None, overrides)


def test_a_buffer_larger_than_the_training_set_is_refused_when_built() -> None:
    with pytest.raises(ConfigError, match=r"cl.replay.size.*48 training images.*<= 48"):
        _plugins("cl.replay.policy=reservoir", "cl.replay.size=49")
    assert len(_plugins("cl.replay.policy=reservoir", "cl.replay.size=48")) == 1


@pytest.mark.parametrize(("overrides", "want"), [
    ([], {"buffer_images": 0, "patches": 48, "frozen": 0, "bytes": 0}),
    # replay of 4 images at updates 2..6 (the buffer is empty at the first)
    (["cl.replay.policy=reservoir", "cl.replay.size=10", "cl.replay.batch=4"],
     {"buffer_images": 20, "patches": 48 + 20, "frozen": 0, "bytes": 10 * 3 * SIZE * SIZE}),
    # frozen copy after experience 1: the 3 updates of experience 2 forward their 8 stream + 4 buffer images
    (["cl.replay.policy=reservoir", "cl.replay.size=10", "cl.replay.batch=4", "cl.distill.enabled=true"],
     {"buffer_images": 20, "patches": 48 + 20, "frozen": 3 * (8 + 4), "bytes": 10 * 3 * SIZE * SIZE}),
    (["cl.distill.enabled=true"], {"buffer_images": 0, "patches": 48, "frozen": 3 * 8, "bytes": 0}),
])
def test_counters_equal_the_hand_computed_numbers(overrides: list[str], want: dict) -> None:
    plugins = _plugins("cl.distill.hidden_dim=8", *overrides)
    stream, strategy, _ = build_strategy(plugins)
    strategy.train(list(stream), eval_streams=[])
    c = strategy.counters
    assert strategy.global_step == 48 // BATCH == 6
    assert c.stream_images == 48 and c.buffer_images == want["buffer_images"]
    assert c.patches_forward == c.patches_backward == N_PATCHES * want["patches"]
    assert c.frozen_forwards == N_PATCHES * want["frozen"] and c.extra_forwards == 0
    assert c.buffer_bytes == want["bytes"]
