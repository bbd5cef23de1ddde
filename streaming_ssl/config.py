"""Typed run configuration: dataclasses loaded from YAML, dotted command-line overrides, validation.

Every key is checked when the config is loaded: an unknown key names the closest valid one and lists
all valid keys of its section; a wrong type or an out-of-range value names the key and what it accepts.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from scenarios.datasets import DataError, check_dataset_name
from scenarios.streams import MODES, ONLINE_BASES  # the stream-mode registry (cheap: no Avalanche import)
from streaming_ssl.atomic import atomic_write_text

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
STEMS = ("auto", "cifar", "tiny", "imagenet")
ARCHS = ("resnet18",)


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key and the fix."""


def _choices(*values: str) -> dict:
    return {"choices": values}


@dataclass
class DataConfig:
    dataset: str = "cifar10"  # a name of the registry scenarios/datasets.py DATASETS, or folder:PATH / npz:PATH
    root: str | None = None  # folder holding the data; None: $STREAMING_SSL_DATA
    download: bool = False  # CIFAR only: fetch through torchvision when missing (needs internet)
    image_size: int | None = None  # side images are resized to: ImageNet-100 (default 224) and folder:/npz: sources
    # (default: their own size; needed when their sizes differ); CIFAR / Tiny ImageNet accept only their own
    train_per_class: int | None = None  # keep the first N training images of each class (tests, quick runs)
    test_per_class: int | None = None  # likewise for the test split


@dataclass
class ModelConfig:
    arch: str = field(default="resnet18", metadata=_choices(*ARCHS))
    stem: str = field(default="auto", metadata=_choices(*STEMS))  # auto: from the dataset
    width: float = 1.0  # channel multiplier of the ResNet (0.25 makes CPU runs practical)
    feature_dim: int = 4096  # size of h, the pre-feature the probes read
    proj_hidden_dim: int = 4096
    proj_dim: int = 1024  # size of z, the space of the objective
    sync_bn: bool = True  # SyncBatchNorm under DDP, so batch statistics are those of the global batch
    # recompute the stem and the first k of the 4 stages in backward instead of storing their activations:
    # 2 with recompute_bn_relu: 5.3 vs 10.8 GB peak for a full-width CIFAR step (README "Speed"); 0 stores all
    recompute_stages: int = 0
    # keep each block's first convolution output instead of its BatchNorm+ReLU output and rebuild the latter in
    # backward (one activation of four per block, one BatchNorm forward per block more; exact, README "Speed")
    recompute_bn_relu: bool = False


@dataclass
class AugmentConfig:
    n_patches: int = 20  # patches per image in training (paper: 20 or 200)
    crop_area: float = 0.25  # fixed fraction of the image area each patch covers
    crop_ratio: list[float] = field(default_factory=lambda: [1.0, 1.0])  # aspect-ratio range of the crop
    size: int | None = None  # patch side after resizing; None: the dataset's image size (32, 64, 224)
    flip_p: float = 0.5
    jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.4, 0.2])  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.1
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    # taps of the blur kernel (odd); null: +-3 times the largest sigma (13), so that sigma 2 blurs like sigma 2 on
    # 32 px patches too, as the authors' PIL blur does; 0: torchvision's 10% of the patch (3 at 32 px, where sigma 2
    # blurs like 0.8), as runs made before this default (a run saved without this key resumes with 0)
    blur_kernel: int | None = None
    solarize_p: float = 0.1
    # apply the ops that act on random subsets of patches by masking (no host sync) or by indexing (less compute,
    # one sync per update); None: masking off the CPU (CUDA), indexing on it
    sync_free: bool | None = None
    # torch.compile the augmentation after its random draw (masked path; the same patches up to float32 rounding):
    # fewer, fused kernels per update. Compiles at the first update (about 15 s on 2 CPU cores) and at a new batch
    # size. Meant for GPUs; measure with bench/speed.py --only ours,ours_compiled_augment. Not with sync_free=false.
    compile: bool = False


@dataclass
class ObjectiveConfig:
    eps2: float = 0.2  # epsilon^2 of the coding rate
    lam: float = 200.0  # weight of the invariance term


@dataclass
class OptimConfig:
    lr: float = 0.3
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    eta: float = 0.005  # LARS trust coefficient
    clip: bool = True  # clip the LARS rate at the base learning rate
    warmup_steps: int = 0
    final_lr: float = 0.0
    # LARS step in multi-tensor ops (a fixed number of kernel launches) or one parameter at a time; None: the
    # former on CUDA, the latter elsewhere (faster on a CPU); the same parameters either way
    foreach: bool | None = None


@dataclass
class StreamConfig:
    mode: str = field(default="class_incremental", metadata=_choices(*MODES))
    n_experiences: int = 5  # class/data-incremental: number of experiences (set by the two below when given)
    classes_per_experience: list[int] | None = None  # uneven class-incremental split, e.g. [50, 10, 10, 10, 10, 10]
    experience_classes: list[list[int]] | None = None  # explicit classes of each experience (overrides the two above)
    class_order_seed: int = 0  # seeded class order (ignored with experience_classes)
    epochs: int = 1  # passes over each experience (1 in stream modes; E in offline mode)
    online_base: str = field(default="class_incremental", metadata=_choices(*ONLINE_BASES))
    online_experience_size: int = 10  # samples per mini-experience in online mode
    access_task_boundaries: bool = False  # online: whether the strategy is told where parent experiences end
    eval_every: int = 1  # evaluate after every this many experiences (online: mini-experiences); 0: parent boundaries only (online)


@dataclass
class EvalConfig:
    patches: int = 0  # 0: whole-image features; P > 0: bag-of-features over P random patches
    train_per_class: int | None = None  # probe trained on the first N training images per class (None: all)
    test_per_class: int | None = None
    probe_epochs: int = 30
    probe_lr: float = 0.1
    # chosen on held-out TRAINING images (evaluate.py --probe-select) for a one-pass width-1/4 encoder on CIFAR-10:
    # 5e-3 for the bag of 16 patches, 1e-2 for whole images; 5e-4 left both probes over-fitted (-2 and -5 points)
    probe_weight_decay: float = 5e-3
    probe_batch_size: int = 256
    knn_k: int = 20  # 0 disables the kNN probe
    knn_temperature: float = 0.07
    seen_classes: bool = True  # also fit a probe restricted to the classes seen so far
    transfer: list[str] = field(default_factory=list)  # out-of-domain datasets probed after each evaluation
    batch_size: int = 256  # images per feature-extraction batch
    # > 0: probe a copy of the model whose BatchNorm running statistics are re-estimated on this many unlabelled
    # training images of the probed dataset (the stored ones are those of the last training batches: augmented
    # patches and, in a class-incremental stream, only the last experience's classes). The trained model is untouched.
    bn_recalibrate: int = 0
    # also probe the model before it trains (its initialisation, one evaluation more) and report forward transfer,
    # probe/fwt: mean over experiences j > 0 of the accuracy on j right before j trains minus at initialisation
    forward_transfer: bool = False


@dataclass
class TrainConfig:
    batch_size: int = 100  # images per update (global batch under DDP)
    device: str = field(default="auto", metadata=_choices(*DEVICES))
    # auto: bf16 where it is native (GPUs of compute capability 8.0+, AVX512-BF16 CPUs), else float32;
    # fp16: float16 with dynamic loss scaling, for the tensor cores of GPUs without bf16 (V100, T4)
    precision: str = field(default="auto", metadata=_choices(*PRECISIONS))
    channels_last: bool = True
    seed: int = 0
    threads: int | None = None  # CPU threads (None: torch default)
    deterministic: bool = False  # deterministic algorithms (exact resume tests)
    # torch.compile the training forward (inductor; probes stay eager). The first update compiles (a minute or two
    # on 2 CPU cores), and so does the first batch of another size. Not with model.recompute_stages > 0. No faster
    # on an AVX2 CPU (README, Speed): meant for GPUs, measure with bench/speed.py --only ours,ours_compiled.
    compile: bool = False
    # the torch.compile backend of train.compile and augment.compile: inductor generates fused kernels (what can pay);
    # aot_eager and eager run the same captured graphs with no code generation: to tell a fault of the compiler from
    # one of ours, or to check a compiled config in seconds instead of minutes
    compile_backend: str = "inductor"
    log_every: int = 20  # updates between progress-bar values and train.jsonl rows (the training curves)


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    checkpoint_every: int = 0  # also checkpoint every N updates inside an experience (0: only after experiences)
    keep_last: int = 3  # checkpoints kept
    tensorboard: bool = True
    plot: bool = True


REPLAY_POLICIES = ("none", "reservoir", "minred")


@dataclass
class ReplayConfig:
    # none: off; reservoir: each image seen so far kept with equal probability; minred: drop the most redundant
    # (cosine similarity of the model's features; costs a forward of buffer + batch images per update when full)
    policy: str = field(default="none", metadata=_choices(*REPLAY_POLICIES))
    size: int = 500  # images the buffer holds (uint8, in memory, on the training device; never labels)
    batch: int = 100  # buffer images appended to each update (global batch); 0: buffer only feeds cl.mixup
    minred_features: str = field(default="z", metadata=_choices("z", "h"))  # what MinRed compares
    # when MinRed's features are computed. all: every candidate's by the current model at every update (buffer +
    # batch forwards); stored: each image's when offered, refreshed when replayed (MinRed's own bookkeeping;
    # 2 x batch forwards). See streaming_ssl/cl/replay.py and bench/minred_buffer.py
    minred_refresh: str = field(default="all", metadata=_choices("all", "stored"))
    minred_ema: float = 0.5  # stored: a replayed image's feature <- ema * stored + (1 - ema) * new


@dataclass
class DistillConfig:
    enabled: bool = False  # CaSSLe: predict the frozen model's z of the same patches from the current z
    # weight of the term weight * mean(1 - cos(predictor(z), z_frozen)). 200 = objective.lam: the term is a cosine
    # like EMP-SSL's invariance term (lam * mean cos), and CaSSLe gives its distillation the SSL loss's own weight;
    # at 1.0 it would be 1/200 of the invariance term's pull and change nothing
    weight: float = 200.0
    # 0: freeze a copy at every experience boundary (online streams: parent boundaries, which needs
    # stream.access_task_boundaries); N > 0: every N updates (the way without boundaries, e.g. offline)
    every: int = 0
    hidden_dim: int = 2048  # predictor Linear(d, hidden)-BN-ReLU-Linear(hidden, d)
    # the frozen copy's BatchNorm. running: eval mode, the running statistics it was taken with (a patch's target
    # does not depend on the other patches of the update); batch: each update's own statistics, running ones left
    # as they were, as CaSSLe's code runs its frozen copy (in train mode; SyncBatchNorm's global batch under DDP
    # on CUDA)
    frozen_bn: str = field(default="running", metadata=_choices("running", "batch"))
    # what is distilled: z, the projections (CaSSLe), or h, the encoder's features the probes read (PFR, Gomez-Villa
    # et al. 2022: the predictor maps the current h to the frozen h, and the projector is free of the term)
    space: str = field(default="z", metadata=_choices("z", "h"))


@dataclass
class MixupConfig:
    enabled: bool = False  # LUMP: stream images mixed with buffer images before augmentation (needs cl.replay)
    alpha: float = 0.4  # one lambda ~ Beta(alpha, alpha) per update


@dataclass
class ClConfig:
    """Continual-learning methods (streaming_ssl/cl/), all off by default and composable; methods of your own
    (streaming_ssl/cl/registry.py) are sections beside ours, read as attributes too (cfg.cl.l2reg)."""

    replay: ReplayConfig = field(default_factory=ReplayConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    # modules (names on the Python path, or .py files) to import before the rest of the config is read: each
    # registers its methods with streaming_ssl.register_method, whose sections then stand here (cl.<name>.<key>)
    imports: list[str] = field(default_factory=list)
    # the registered methods' sections by name (filled from cl.<name>; written back there in config.yaml)
    methods: dict = field(default_factory=dict, metadata={"internal": True})

    def __getattr__(self, name: str) -> Any:
        methods = self.__dict__.get("methods") or {}
        if name in methods:
            return methods[name]
        raise AttributeError(f"'ClConfig' object has no attribute {name!r}")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    cl: ClConfig = field(default_factory=ClConfig)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["cl"].update(out["cl"].pop("methods"))  # a method of your own is cl.<name>, as written
        return out


# ----------------------------------------------------------------------------------------------- parsing

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, dict) and len(value) == 1 and None in value.values():  # `x:` read by YAML
            (word,) = value
            raise ConfigError(f"{key}: expected str, got {value!r}: YAML reads {word}: with nothing after the colon "
                              f"as a mapping; complete the value (a dataset: folder:PATH or npz:PATH) or quote it")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _unknown_key(key: str, prefix: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{prefix}{key}'.{hint} Valid keys{' of ' + prefix.rstrip('.') if prefix else ''}: "
                       f"{', '.join(valid)}")


def _build(cls: type, data: Any, prefix: str, lenient: bool = False) -> Any:
    """`cls` from the mapping `data`, every value checked. Under cl, a registered method's section is built from its
    dataclass; with `lenient` (a saved config read without importing its methods) an unknown cl section is kept as
    it was written."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    methods: dict[str, Any] = {}
    for key, value in data.items():
        if cls is ClConfig and key not in fields:
            methods[key] = _method_section(str(key), value, prefix, list(fields), lenient)
            continue
        if key not in fields:
            raise _unknown_key(str(key), prefix, list(fields))
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, f"{prefix}{key}.", lenient)
            continue
        coerced = _coerce(value, tp, prefix + key)
        choices = fields[key].metadata.get("choices")
        if choices and coerced not in choices:
            close = difflib.get_close_matches(str(coerced), choices, n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{prefix}{key}: unknown value {coerced!r}.{hint} Valid: {', '.join(choices)}")
        kwargs[key] = coerced
    if methods:
        kwargs["methods"] = methods
    return cls(**kwargs)


def _method_section(key: str, value: Any, prefix: str, ours: list[str], lenient: bool) -> Any:
    """cl.<key>: the section of a method registered with streaming_ssl.register_method (its dataclass, checked)."""
    from streaming_ssl.cl.registry import registered

    method = registered().get(key)
    if method is None:
        if lenient and isinstance(value, dict):
            return value
        err = _unknown_key(key, prefix, ours + sorted(registered()))
        raise ConfigError(f"{err} (a method of your own: name the module that registers it in cl.imports)")
    try:
        return _build(method.config, value if value is not None else {}, f"{prefix}{key}.")
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # the method's own checks (its dataclass's __post_init__)
        raise ConfigError(f"{prefix}{key}: {err}") from err


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """['train.batch_size=50', 'eval.transfer=[cifar10]'] -> nested dict (values parsed as YAML)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.batch_size=50)")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def config_from_dict(data: dict, *, import_methods: bool = True, saved: bool = False) -> Config:
    """Build and validate a Config from a nested dict. The modules in cl.imports are imported first (their methods'
    sections are then known); with `import_methods` False they are not, and the sections of methods not registered
    are kept unchecked (a saved config read for its model and data alone, as evaluate.py does). `saved`: the config
    of a run written earlier, read to resume or probe it; what older versions accepted and ignored is dropped with
    a warning there instead of refused (a class split on a stream not split by class)."""
    data = dict(data or {})
    if isinstance(data.get("cl"), dict) and data["cl"].get("imports"):
        data["cl"] = {**data["cl"], "imports": _method_imports(data["cl"]["imports"])}
        if import_methods:
            from streaming_ssl.cl.registry import import_methods as do_import

            do_import(data["cl"]["imports"])
    cfg = _build(Config, data, "", lenient=not import_methods)
    if saved:
        _drop_ignored_split(cfg.stream)
    validate(cfg)
    s = cfg.stream
    split = s.experience_classes if s.experience_classes is not None else s.classes_per_experience
    if split is not None:  # they set the number of experiences: config.yaml says so, not a stale n_experiences
        s.n_experiences = len(split)
    return cfg


def _method_imports(names: Any) -> list[str]:
    """cl.imports checked, each .py path made absolute (a run resumed from another directory imports the same)."""
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"cl.imports: expected a list of module names or .py files, got {names!r}")
    return [str(Path(n).expanduser().resolve()) if n.endswith(".py") else n for n in names]


def _splits_by_class(s: StreamConfig) -> bool:
    return s.mode == "class_incremental" or (s.mode == "online" and s.online_base == "class_incremental")


def _drop_ignored_split(s: StreamConfig) -> None:
    """What a saved run's stream never used of its class split (refused since): a split on a stream not split by
    class, and classes_per_experience beside experience_classes that disagree (the explicit classes won)."""
    for key in ("experience_classes", "classes_per_experience"):
        if getattr(s, key) is not None and not _splits_by_class(s):
            log.warning("the run's config sets stream.%s on a %s stream, which never used it: ignored, as when the "
                        "run was trained", key, s.mode)
            setattr(s, key, None)
    if s.experience_classes is not None and s.classes_per_experience is not None and \
            list(s.classes_per_experience) != [len(e) for e in s.experience_classes]:
        log.warning("the run's config sets stream.classes_per_experience beside stream.experience_classes, which "
                    "decided its split: ignored, as when the run was trained")
        s.classes_per_experience = None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                saved: bool = False) -> Config:
    """Read a YAML recipe (safe_load), apply dotted overrides, validate. `saved`: a run's own config.yaml (see
    config_from_dict)."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found; recipes live in configs/ (e.g. configs/split_cifar10.yaml)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r}: expected a mapping of sections (data:, model:, ...), "
                              f"got {type(data).__name__}")
    return config_from_dict(_merge(data, parse_overrides(overrides or [])), saved=saved)


# -------------------------------------------------------------------------------------------- validation

def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def _check_dataset(name: str, key: str) -> str:
    """A dataset name the registry knows (scenarios.datasets), or a folder:PATH / npz:PATH source.

    Returns the name to keep: a built-in name as written; a generic source with its path made absolute
    (relative to the current directory, ``~`` expanded) and its kind in lower case, e.g. ``folder:/abs/svhn``,
    so that the saved config and checkpoint name the same data from any directory (evaluate.py, --resume).
    """
    try:
        check_dataset_name(name, key)
    except DataError as err:
        raise ConfigError(str(err)) from None
    from scenarios import sources  # the generic sources; cheap (no Avalanche), imported where they are named

    if not sources.is_generic(name):
        return name
    ref = sources.parse_source(name)
    return f"{ref.kind}:{ref.path}"


def _check_datasets(cfg: Config) -> None:
    """data.dataset and eval.transfer: known names, generic paths made absolute, and no two transfer targets
    reported under one name (each is transfer/<short name> in the metrics)."""
    from scenarios.sources import short_name

    cfg.data.dataset = _check_dataset(cfg.data.dataset, "data.dataset")
    cfg.eval.transfer = [_check_dataset(name, f"eval.transfer[{i}]") for i, name in enumerate(cfg.eval.transfer)]
    reported: dict[str, str] = {}
    for i, name in enumerate(cfg.eval.transfer):
        short = short_name(name)
        _check(short not in reported, f"eval.transfer[{i}]",
               f"{name!r} and {reported.get(short)!r} would both be reported as transfer/{short} (a built-in name, a "
               "folder's name or an .npz file's stem), one result replacing the other; drop the duplicate, or "
               "rename one folder or .npz file")
        reported[short] = name


def validate(cfg: Config) -> None:
    """Range and consistency checks that types alone cannot express.

    Also rewrites a relative ``folder:PATH`` / ``npz:PATH`` in ``data.dataset`` and ``eval.transfer`` to its
    absolute path (see :func:`_check_datasets`).
    """
    a, o, s, t, e, m, op = cfg.augment, cfg.objective, cfg.stream, cfg.train, cfg.eval, cfg.model, cfg.optim
    _check(a.n_patches >= 2, "augment.n_patches", f"must be >= 2 (the invariance term compares patches), got {a.n_patches}")
    _check(0 < a.crop_area <= 1, "augment.crop_area", f"must be in (0, 1], got {a.crop_area}")
    _check(len(a.crop_ratio) == 2 and 0 < a.crop_ratio[0] <= a.crop_ratio[1], "augment.crop_ratio",
           f"must be [low, high] with 0 < low <= high, got {a.crop_ratio}")
    _check(len(a.jitter) == 4 and all(v >= 0 for v in a.jitter) and a.jitter[3] <= 0.5, "augment.jitter",
           f"must be [brightness, contrast, saturation, hue] >= 0 with hue <= 0.5, got {a.jitter}")
    for name in ("flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p"):
        _check(0 <= getattr(a, name) <= 1, f"augment.{name}", f"is a probability in [0, 1], got {getattr(a, name)}")
    _check(len(a.blur_sigma) == 2 and 0 < a.blur_sigma[0] <= a.blur_sigma[1], "augment.blur_sigma",
           f"must be [low, high] with 0 < low <= high, got {a.blur_sigma}")
    _check(a.size is None or a.size >= 8, "augment.size", f"must be >= 8 pixels, got {a.size}")
    _check(a.blur_kernel is None or a.blur_kernel == 0 or (a.blur_kernel >= 3 and a.blur_kernel % 2 == 1),
           "augment.blur_kernel", f"must be null (+-3 sigma), 0 (10% of the patch) or an odd number of taps >= 3, "
           f"got {a.blur_kernel!r}")
    _check(not (a.compile and a.sync_free is False), "augment.compile",
           "compiles the masked path, so it cannot be combined with augment.sync_free=false; "
           "set augment.sync_free=null or augment.compile=false")
    _check(o.eps2 > 0, "objective.eps2", f"must be > 0, got {o.eps2}")
    _check(o.lam >= 0, "objective.lam", f"must be >= 0, got {o.lam}")
    _check(op.lr >= 0, "optim.lr", f"must be >= 0, got {op.lr}")
    _check(op.final_lr >= 0, "optim.final_lr", f"must be >= 0, got {op.final_lr}")
    _check(0 <= op.momentum < 1, "optim.momentum", f"must be in [0, 1), got {op.momentum}")
    _check(op.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {op.weight_decay}")
    _check(op.eta > 0, "optim.eta", f"must be > 0, got {op.eta}")
    _check(op.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {op.warmup_steps}")
    _check(m.width > 0, "model.width", f"must be > 0, got {m.width}")
    _check(0 <= m.recompute_stages <= 4, "model.recompute_stages",
           f"must be 0..4 (0: store all activations; k: recompute the stem and stages 1..k), got {m.recompute_stages}")
    for name in ("feature_dim", "proj_hidden_dim", "proj_dim"):
        _check(getattr(m, name) >= 1, f"model.{name}", f"must be >= 1, got {getattr(m, name)}")
    _check(not (t.compile and m.recompute_stages), "train.compile",
           "cannot be combined with model.recompute_stages > 0 (the recomputation is not traced); "
           "set model.recompute_stages=0 or train.compile=false")
    _check(not (t.compile and m.recompute_bn_relu), "train.compile",
           "cannot be combined with model.recompute_bn_relu (a hand-written backward the compiler does not fuse); "
           "set model.recompute_bn_relu=false or train.compile=false")
    if t.compile or a.compile:  # torch is imported only here: the config stays cheap to load otherwise
        from streaming_ssl.device import compile_backends

        backends = compile_backends()
        _check(t.compile_backend in backends, "train.compile_backend",
               f"{t.compile_backend!r} is not a torch.compile backend; valid: {', '.join(backends)}")
    _check(t.batch_size >= 2, "train.batch_size", f"must be >= 2 (the coding rate needs a batch), got {t.batch_size}")
    _check(t.threads is None or t.threads >= 1, "train.threads", f"must be >= 1, got {t.threads}")
    _check(t.log_every >= 1, "train.log_every", f"must be >= 1, got {t.log_every}")
    _validate_stream(s)
    _check(e.patches >= 0, "eval.patches", f"must be >= 0 (0: whole image), got {e.patches}")
    _check(e.probe_epochs >= 1, "eval.probe_epochs", f"must be >= 1, got {e.probe_epochs}")
    _check(e.probe_lr > 0, "eval.probe_lr", f"must be > 0, got {e.probe_lr}")
    _check(e.probe_weight_decay >= 0, "eval.probe_weight_decay", f"must be >= 0, got {e.probe_weight_decay}")
    _check(e.knn_k >= 0, "eval.knn_k", f"must be >= 0, got {e.knn_k}")
    _check(e.knn_temperature > 0, "eval.knn_temperature",
           f"must be > 0 (the kNN votes are weighted by exp(similarity / temperature)), got {e.knn_temperature}")
    _check(e.bn_recalibrate >= 0, "eval.bn_recalibrate", f"must be a number of images >= 0 (0: off), got {e.bn_recalibrate}")
    _check(e.batch_size >= 1 and e.probe_batch_size >= 1, "eval.batch_size", "batch sizes must be >= 1")
    _check(cfg.data.image_size is None or cfg.data.image_size >= 1, "data.image_size",
           f"must be >= 1 pixels or null (the dataset's own size), got {cfg.data.image_size}")
    _check_datasets(cfg)
    for key, value in (("data.train_per_class", cfg.data.train_per_class), ("data.test_per_class", cfg.data.test_per_class),
                       ("eval.train_per_class", e.train_per_class), ("eval.test_per_class", e.test_per_class)):
        _check(value is None or value >= 1, key, f"must be >= 1 or null, got {value}")
    _check(cfg.run.checkpoint_every >= 0, "run.checkpoint_every", f"must be >= 0, got {cfg.run.checkpoint_every}")
    _check(cfg.run.keep_last >= 1, "run.keep_last", f"must be >= 1, got {cfg.run.keep_last}")
    _validate_cl(cfg.cl, cfg.stream)


def _validate_stream(s: StreamConfig) -> None:
    """The stream section: ranges, and a class split only where the stream is split by class."""
    _check(s.n_experiences >= 1, "stream.n_experiences", f"must be >= 1, got {s.n_experiences}")
    _check(s.epochs >= 1, "stream.epochs", f"must be >= 1, got {s.epochs}")
    _check(s.mode == "offline" or s.epochs == 1, "stream.epochs",
           f"a stream sees each sample once: epochs must be 1 in mode {s.mode!r} (use stream.mode=offline for E epochs)")
    _check(s.online_experience_size >= 2, "stream.online_experience_size", f"must be >= 2, got {s.online_experience_size}")
    _check(s.eval_every >= 0, "stream.eval_every", f"must be >= 0, got {s.eval_every}")
    if s.classes_per_experience is not None:
        _check(all(c >= 1 for c in s.classes_per_experience), "stream.classes_per_experience",
               f"every experience needs at least one class, got {s.classes_per_experience}")
    if s.experience_classes is not None and s.classes_per_experience is not None:  # the explicit classes win
        sizes = [len(e) for e in s.experience_classes]
        _check(list(s.classes_per_experience) == sizes, "stream.classes_per_experience",
               f"{list(s.classes_per_experience)} disagrees with stream.experience_classes (experiences of {sizes} "
               "classes), which decides the split; give only one of them (stream.classes_per_experience=null)")
    for key in ("experience_classes", "classes_per_experience"):  # else silently ignored: another stream than meant
        _check(getattr(s, key) is None or _splits_by_class(s), f"stream.{key}",
               f"splits the classes of a class-incremental stream (stream.mode=class_incremental, or online with "
               f"stream.online_base=class_incremental), but this stream is {s.mode!r}"
               f"{f' on {s.online_base!r}' if s.mode == 'online' else ''}; remove it (stream.{key}=null) or change "
               "the mode")


def _validate_cl(cl: ClConfig, s: StreamConfig) -> None:
    """The cl section alone and against the stream (a buffer larger than the data is checked at build time)."""
    r, d, x = cl.replay, cl.distill, cl.mixup
    _check(r.size >= 1, "cl.replay.size", f"must be >= 1 images, got {r.size}")
    _check(r.batch >= 0, "cl.replay.batch", f"must be >= 0 images per update, got {r.batch}")
    _check(r.policy == "none" or r.batch > 0 or x.enabled, "cl.replay.batch",
           f"is 0 with cl.replay.policy={r.policy}: the buffer would be filled and never used; set cl.replay.batch "
           "to the buffer images per update (e.g. 100), or cl.mixup.enabled=true to use it for mixup only")
    _check(r.minred_refresh == "all" or r.policy == "minred", "cl.replay.minred_refresh",
           f"is {r.minred_refresh!r}, which only MinRed uses, but cl.replay.policy={r.policy}: set "
           "cl.replay.policy=minred, or leave cl.replay.minred_refresh at 'all'")
    _check(0 <= r.minred_ema < 1, "cl.replay.minred_ema", f"must be in [0, 1), got {r.minred_ema}")
    _check(d.weight > 0 or not d.enabled, "cl.distill.weight", f"must be > 0 with cl.distill.enabled, got {d.weight}")
    _check(d.every >= 0, "cl.distill.every", f"must be >= 0 (0: at experience boundaries), got {d.every}")
    _check(d.hidden_dim >= 1, "cl.distill.hidden_dim", f"must be >= 1, got {d.hidden_dim}")
    if d.enabled and d.every == 0:
        _check(s.mode != "offline", "cl.distill.every",
               "is 0 (freeze a copy at experience boundaries) but stream.mode=offline has one experience: there is "
               "nothing to distil from. Set cl.distill.every=N (a frozen copy every N updates) or use a stream mode")
        _check(s.mode != "online" or s.access_task_boundaries, "cl.distill.every",
               "is 0 (freeze a copy at experience boundaries) but an online stream tells the learner no boundaries: "
               "set cl.distill.every=N (a frozen copy every N updates) or stream.access_task_boundaries=true")
    _check(x.alpha > 0, "cl.mixup.alpha", f"must be > 0 (lambda ~ Beta(alpha, alpha)), got {x.alpha}")
    _check(not x.enabled or r.policy != "none", "cl.mixup.enabled",
           "mixup mixes stream images with buffer images but cl.replay.policy=none keeps no buffer: set "
           "cl.replay.policy=reservoir (and cl.replay.batch=0 for mixup without appended replay)")


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically: a run killed while rewriting it on resume keeps the old one
    (a truncated file would resume with defaults for the sections it lost)."""
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
