"""A tiny real EMP-SSL run for the continual-learning plugins: 8x8 images, 4 classes, a narrow ResNet-18.

`build_strategy(plugins)` gives (stream, strategy, data): a class-incremental stream of 2 experiences of 24
images (classes {0, 1} then {2, 3}), batch 8 (3 updates per experience), 2 patches per image.
"""

from __future__ import annotations

import torch
from avalanche.core import SupervisedPlugin

from scenarios.datasets import ImageData
from scenarios.streams import SSLStream, build_stream
from streaming_ssl import distributed as ddp
from streaming_ssl.augment import MultiPatchAugment
from streaming_ssl.lars import LARS, param_groups
from streaming_ssl.models import EMPSSLModel
from streaming_ssl.strategy import EMPSSLStrategy

PER_CLASS, BATCH, N_PATCHES, SIZE = 12, 8, 2, 8
PROJ_DIM = 16


class TinyNoBN(torch.nn.Module):
    """(h, z) without BatchNorm: one process and N processes on shares of a batch compute the same function (DDP
    tests compare them)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 32), torch.nn.ReLU())
        self.proj = torch.nn.Linear(32, 16)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.enc(x)
        return h, torch.nn.functional.normalize(self.proj(h), dim=-1)


def ddp_run_parts(model: torch.nn.Module, plugins: list, per_class: int
                  ) -> tuple[list[dict], torch.nn.Module, MultiPatchAugment, SSLStream]:
    """What the DDP tests train with: LARS groups of `model` and of the plugins' trainable modules, the model in DDP
    when a group exists, an augmentation that only cuts 2 whole-image patches of 8x8 images, and a class-incremental
    stream of 2 experiences of 4 classes x `per_class` seeded images."""
    groups = param_groups(model, 1e-4) + [g for p in plugins for m in getattr(p, "trainable_modules", [])
                                          for g in param_groups(m, 1e-4)]
    train_model = torch.nn.parallel.DistributedDataParallel(model) if ddp.is_dist() else model
    augment = MultiPatchAugment(2, 8, crop_area=1.0, flip_p=0, jitter_p=0, gray_p=0, blur_p=0, solarize_p=0)
    gen = torch.Generator().manual_seed(0)
    data = ImageData(torch.randint(0, 256, (4 * per_class, 3, 8, 8), dtype=torch.uint8, generator=gen),
                     torch.arange(4).repeat_interleave(per_class))
    stream = build_stream(data, 4, mode="class_incremental", experience_classes=[[0, 1], [2, 3]])
    return groups, train_model, augment, stream


def tiny_model() -> EMPSSLModel:
    return EMPSSLModel(width=0.125, feature_dim=32, proj_hidden_dim=32, proj_dim=PROJ_DIM)


def tiny_data(seed: int = 0) -> ImageData:
    gen = torch.Generator().manual_seed(seed)
    targets = torch.arange(4).repeat_interleave(PER_CLASS)
    return ImageData(torch.randint(0, 256, (len(targets), 3, SIZE, SIZE), dtype=torch.uint8, generator=gen), targets)


class Recorder(SupervisedPlugin):
    """What each update trained on: the stream images, mb_x after every plugin's before_forward, patches."""

    def __init__(self) -> None:
        super().__init__()
        self.stream: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.mb_x: list[torch.Tensor] = []
        self.patch_rows: list[int] = []

    def before_training_iteration(self, strategy, **kwargs) -> None:
        self.stream.append(strategy.mbatch[0].clone())
        self.labels.append(strategy.mbatch[1].clone())

    def after_forward(self, strategy, **kwargs) -> None:
        self.mb_x.append(strategy.mb_x.clone())
        self.patch_rows.append(len(strategy.mb_patches))


def build_strategy(plugins: list, *, model: EMPSSLModel | None = None, data: ImageData | None = None,
                   mode: str = "class_incremental", lr: float = 0.3):
    torch.manual_seed(0)
    data = tiny_data() if data is None else data
    stream = build_stream(data, 4, mode=mode, experience_classes=[[0, 1], [2, 3]], n_experiences=2)
    model = tiny_model() if model is None else model
    groups = param_groups(model, 1e-4)
    for p in plugins:
        for m in getattr(p, "trainable_modules", []):
            groups += param_groups(m, 1e-4)
    opt = LARS(groups, lr=lr)
    strategy = EMPSSLStrategy(model=model, optimizer=opt, augment=MultiPatchAugment(N_PATCHES, SIZE),
                              n_patches=N_PATCHES, batch_size=BATCH, total_updates=stream.n_updates(BATCH),
                              device="cpu", channels_last=False, plugins=plugins)
    return stream, strategy, data
