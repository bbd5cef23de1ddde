"""Continual-learning methods on the EMP-SSL stream, one file each: a plugin plus its pure maths.

* replay.py  -- ReplayBufferPlugin: a buffer of past uint8 images (reservoir or MinRed) joining each update.
* distill.py -- DistillPlugin: CaSSLe, a predictor maps current z to a frozen copy's z of the same patches
  (space h: PFR, the same on the encoder's features).
* mixup.py   -- MixupPlugin: LUMP, stream images mixed with buffer images before augmentation.
* registry.py -- register_method: a method of your own, a config section under cl plus a plugin builder.

`build_cl_plugins` turns the config's `cl` section into plugins (the adapter for this package; only
build.py calls it). Every method is off by default; they compose, in the order mixup (mixes the stream
images), replay (appends buffer images, then stores the stream images after the update), distillation
(adds its term to the loss of the whole batch).
"""

from __future__ import annotations

import torch

from streaming_ssl import distributed as ddp
from streaming_ssl.cl.distill import DistillPlugin, build_predictor, distill_loss, frozen_copy
from streaming_ssl.cl.mixup import MixupPlugin, mix_images, sample_mixup
from streaming_ssl.cl.registry import register_method, registered
from streaming_ssl.cl.replay import ImageBuffer, ReplayBufferPlugin, minred_keep, reservoir_slots
from streaming_ssl.config import ConfigError

__all__ = ["DistillPlugin", "ImageBuffer", "MixupPlugin", "ReplayBufferPlugin", "build_cl_plugins", "build_predictor",
           "distill_loss", "frozen_copy", "minred_keep", "mix_images", "register_method", "reservoir_slots",
           "sample_mixup"]


def build_cl_plugins(cfg, *, model: torch.nn.Module, train_size: int, device: torch.device) -> list:
    """The plugins of the continual-learning methods switched on in cfg.cl (none by default).

    Args:
        cfg: the run's Config (cfg.cl, cfg.model.proj_dim, cfg.model.sync_bn, cfg.train.seed are read).
        model: the trained model without its DDP wrapper.
        train_size: training images of the run (a buffer may not be larger).
        device: the training device (buffer images and the predictor live there).

    Returns:
        [mixup?, replay?, distill?] in that order, then the plugins of registered methods (registry.py) in the
        order of their sections. Raises ConfigError for a buffer larger than the data.
    """
    section = getattr(cfg, "cl", None)
    if section is None:
        return []
    r, d, x = section.replay, section.distill, section.mixup
    plugins: list = []
    replay = None
    if r.policy != "none":
        if r.size > train_size:
            raise ConfigError(f"cl.replay.size: a buffer of {r.size} images is larger than the {train_size} training "
                              f"images of this run; set cl.replay.size <= {train_size}")
        replay = ReplayBufferPlugin(size=r.size, batch=r.batch, policy=r.policy, minred_features=r.minred_features,
                                    minred_refresh=r.minred_refresh, minred_ema=r.minred_ema, seed=cfg.train.seed,
                                    device=device)
    if x.enabled:
        if replay is None:
            raise ConfigError("cl.mixup.enabled needs a buffer: set cl.replay.policy=reservoir (or minred)")
        plugins.append(MixupPlugin(replay, alpha=x.alpha, seed=cfg.train.seed))
    if replay is not None:
        plugins.append(replay)
    if d.enabled:
        dim = cfg.model.proj_dim if d.space == "z" else cfg.model.feature_dim
        plugins.append(DistillPlugin(model, dim=dim, hidden_dim=d.hidden_dim, weight=d.weight, space=d.space,
                                     every=d.every, device=device, frozen_bn=d.frozen_bn,
                                     sync_bn=ddp.syncs_batchnorm(cfg.model.sync_bn, device.type)))
    for name, own in getattr(section, "methods", {}).items():  # methods of your own (registry.py), after ours
        method = registered().get(name)
        if method is None or not isinstance(own, method.config):
            raise ConfigError(f"cl.{name}: no method of that name is registered; name the module that registers it "
                              "in cl.imports")
        built = method.build(own, model=model, train_size=train_size, device=device, seed=cfg.train.seed,
                             plugins=list(plugins))
        plugins.extend([] if built is None else built if isinstance(built, (list, tuple)) else [built])
    return plugins
