"""Tests of streaming_ssl.config: defaults, YAML + dotted overrides, validation messages, round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from streaming_ssl.config import (
    Config,
    ConfigError,
    config_from_dict,
    load_config,
    parse_overrides,
    save_config,
)

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------- defaults

def test_defaults_match_design():
    cfg = Config()
    a, o, op, m, t = cfg.augment, cfg.objective, cfg.optim, cfg.model, cfg.train
    assert a.n_patches == 20
    assert o.eps2 == 0.2 and o.lam == 200.0
    assert op.lr == 0.3 and op.momentum == 0.9 and op.nesterov is True
    assert op.weight_decay == 1e-4 and op.eta == 0.005 and op.clip is True and op.final_lr == 0.0
    assert t.batch_size == 100
    assert (m.arch, m.feature_dim, m.proj_hidden_dim, m.proj_dim) == ("resnet18", 4096, 4096, 1024)
    assert a.crop_area == 0.25
    assert a.flip_p == 0.5
    assert a.jitter == [0.4, 0.4, 0.4, 0.2] and a.jitter_p == 0.8
    assert a.gray_p == 0.2 and a.blur_p == 0.1 and a.blur_sigma == [0.1, 2.0] and a.solarize_p == 0.1
    assert a.blur_kernel is None  # +-3 sigma: sigma 2 is sigma 2 on 32 px patches, as the authors' PIL blur
    assert cfg.stream.epochs == 1


def test_defaults_are_valid_and_not_shared():
    assert load_config() == Config()
    a, b = Config(), Config()
    a.augment.jitter.append(1.0)
    a.eval.transfer.append("cifar10")
    assert b.augment.jitter == [0.4, 0.4, 0.4, 0.2] and b.eval.transfer == []


# ------------------------------------------------------------------------------------ YAML and overrides

def test_load_yaml_with_dotted_overrides(tmp_path):
    path = write(tmp_path, """
data:
  dataset: cifar100
model:
  width: 0.5
  proj_dim: 32
train:
  batch_size: 50
  threads: 2
optim:
  lr: 0.1
""")
    cfg = load_config(path, [
        "train.batch_size=20",            # int
        "optim.lr=0.05",                  # float
        "model.proj_dim=16",
        "augment.jitter=[0.1, 0.2, 0.3, 0.05]",  # list
        "train.threads=null",             # null
        "eval.transfer=[cifar10]",
        "stream.mode=offline",
        "stream.epochs=3",
        "train.channels_last=false",
    ])
    assert cfg.data.dataset == "cifar100"  # from the file
    assert cfg.model.width == 0.5  # a sibling of an overridden key survives
    assert cfg.model.proj_dim == 16
    assert cfg.train.batch_size == 20 and type(cfg.train.batch_size) is int
    assert cfg.optim.lr == 0.05
    assert cfg.augment.jitter == [0.1, 0.2, 0.3, 0.05]
    assert cfg.train.threads is None
    assert cfg.eval.transfer == ["cifar10"]
    assert (cfg.stream.mode, cfg.stream.epochs) == ("offline", 3)
    assert cfg.train.channels_last is False
    # untouched keys keep their defaults
    assert cfg.augment.n_patches == 20 and cfg.objective.lam == 200.0


def test_int_is_accepted_for_float_and_converted(tmp_path):
    cfg = load_config(write(tmp_path, "optim:\n  lr: 1\n"), ["augment.crop_ratio=[1, 2]"])
    assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float
    assert cfg.augment.crop_ratio == [1.0, 2.0] and all(type(v) is float for v in cfg.augment.crop_ratio)


def test_empty_file_and_null_section_give_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()
    assert load_config(write(tmp_path, "model:\n", "b.yaml")) == Config()


def test_parse_overrides_nested_and_empty_value():
    assert parse_overrides(["train.batch_size=50", "train.threads=", "eval.transfer=[a, b]", "run.out_dir=x=y"]) == {
        "train": {"batch_size": 50, "threads": None},
        "eval": {"transfer": ["a", "b"]},
        "run": {"out_dir": "x=y"},
    }


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match=r"must look like section\.key=value"):
        load_config(None, ["train.batch_size"])


def test_exponent_float_without_dot_is_a_float(tmp_path):
    assert load_config(None, ["optim.weight_decay=1e-4"]).optim.weight_decay == 1e-4
    assert load_config(write(tmp_path, "optim:\n  weight_decay: 5e-4\n")).optim.weight_decay == 5e-4


# ------------------------------------------------------------------------------------------------ errors

def test_unknown_key_suggests_closest_and_lists_valid(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "train:\n  batchsize: 10\n"))
    msg = str(info.value)
    assert "unknown config key 'train.batchsize'" in msg
    assert "Did you mean 'train.batch_size'?" in msg
    assert "Valid keys of train:" in msg
    for key in ("batch_size", "device", "precision", "seed", "log_every"):
        assert key in msg


def test_unknown_key_in_override():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.momentun'\. Did you mean 'optim\.momentum'\?"):
        load_config(None, ["optim.momentun=0.5"])


def test_unknown_section():
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'\. Did you mean 'train'\? Valid keys: data, model"):
        load_config(None, ["trian.batch_size=5"])


def test_section_that_is_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="train: expected a mapping"):
        load_config(write(tmp_path, "train: 5\n"))


@pytest.mark.parametrize("override,match", [
    ("train.batch_size=abc", r"train\.batch_size: expected int, got 'abc' \(str\)"),
    ("train.batch_size=50.0", r"train\.batch_size: expected int, got 50\.0 \(float\)"),
    ("train.batch_size=true", r"train\.batch_size: expected int, got True \(bool\)"),
    ("train.channels_last=1", r"train\.channels_last: expected bool, got 1 \(int\)"),
    ("optim.lr=fast", r"optim\.lr: expected float, got 'fast' \(str\)"),
    ("optim.lr=true", r"optim\.lr: expected float, got True \(bool\)"),
    ("train.threads=2.5", r"train\.threads: expected int or null, got 2\.5"),
    ("augment.jitter=0.4", r"augment\.jitter: expected list of float, got 0\.4"),
    ("augment.jitter=[0.4, x, 0.4, 0.1]", r"augment\.jitter\[1\]: expected float, got 'x'"),
    ("data.dataset=10", r"data\.dataset: expected str, got 10 \(int\)"),
])
def test_wrong_types(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


@pytest.mark.parametrize("override,match", [
    ("data.dataset=cifar1O", r"data\.dataset: unknown value 'cifar1O'\. Did you mean 'cifar10'\? Valid: cifar10, cifar100"),
    ("model.stem=imagnet", r"model\.stem: unknown value 'imagnet'\. Did you mean 'imagenet'\?"),
    ("stream.mode=onlin", r"stream\.mode: unknown value 'onlin'\. Did you mean 'online'\?"),
    ("train.precision=fp8", r"train\.precision: unknown value 'fp8'.*Valid: auto, bf16, fp16, fp32"),
])
def test_unknown_choices(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


@pytest.mark.parametrize("overrides,match", [
    (["augment.n_patches=1"], r"augment\.n_patches: must be >= 2"),
    (["train.batch_size=1"], r"train\.batch_size: must be >= 2"),
    (["objective.eps2=0"], r"objective\.eps2: must be > 0"),
    (["objective.eps2=-0.1"], r"objective\.eps2: must be > 0"),
    (["optim.lr=-0.1"], r"optim\.lr: must be >= 0, got -0\.1"),
    (["augment.gray_p=1.5"], r"augment\.gray_p: is a probability in \[0, 1\], got 1\.5"),
    (["augment.solarize_p=-0.1"], r"augment\.solarize_p: is a probability"),
    (["stream.epochs=2"], r"stream\.epochs: .*epochs must be 1 in mode 'class_incremental'"),
    (["stream.mode=online", "stream.epochs=3"], r"stream\.epochs: .*epochs must be 1 in mode 'online'"),
    (["eval.transfer=[cifar10, svhn]"], r"eval\.transfer\[1\]: unknown value 'svhn'\. Valid: cifar10.*folder:PATH.*npz:PATH"),
    (["augment.crop_area=1.5"], r"augment\.crop_area: must be in \(0, 1\]"),
    (["augment.blur_kernel=4"], r"augment\.blur_kernel: must be null .*, 0 .* odd number of taps >= 3, got 4"),
    (["augment.blur_kernel=1"], r"augment\.blur_kernel: .*got 1"),
    (["augment.jitter=[0.4, 0.4, 0.4, 0.6]"], r"augment\.jitter: .*hue <= 0\.5"),
    (["optim.momentum=1.0"], r"optim\.momentum: must be in \[0, 1\)"),
    (["model.width=0"], r"model\.width: must be > 0"),
    (["model.recompute_stages=5"], r"model\.recompute_stages: must be 0\.\.4"),
    (["train.compile=true", "model.recompute_stages=2"],
     r"train\.compile: cannot be combined with model\.recompute_stages > 0 .*set model\.recompute_stages=0"),
    (["train.compile=true", "model.recompute_bn_relu=true"],
     r"train\.compile: cannot be combined with model\.recompute_bn_relu .*set model\.recompute_bn_relu=false"),
    (["data.train_per_class=0"], r"data\.train_per_class: must be >= 1 or null"),
    (["augment.compile=true", "augment.sync_free=false"],
     r"augment\.compile: .*cannot be combined with augment\.sync_free=false; set augment\.sync_free=null"),
    (["train.compile=true", "train.compile_backend=inductr"],
     r"train\.compile_backend: 'inductr' is not a torch\.compile backend; valid: .*aot_eager.*inductor"),
    (["augment.compile=true", "train.compile_backend=inductr"], r"train\.compile_backend: 'inductr' is not"),
    (["eval.probe_weight_decay=-0.001"], r"eval\.probe_weight_decay: must be >= 0, got -0\.001"),
    (["eval.knn_temperature=0"], r"eval\.knn_temperature: must be > 0 .*got 0\.0"),
    (["eval.knn_temperature=-0.07"], r"eval\.knn_temperature: must be > 0 .*got -0\.07"),
    (["data.image_size=0"], r"data\.image_size: must be >= 1 pixels or null .*got 0"),
    (["data.image_size=-32"], r"data\.image_size: must be >= 1 pixels or null .*got -32"),
])
def test_out_of_range_values(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_range_edges_are_accepted():
    cfg = load_config(None, ["eval.probe_weight_decay=0", "eval.knn_temperature=1e-3", "data.image_size=1"])
    assert (cfg.eval.probe_weight_decay, cfg.eval.knn_temperature, cfg.data.image_size) == (0.0, 1e-3, 1)
    assert load_config(None, ["data.image_size=null"]).data.image_size is None


def test_epochs_above_one_are_fine_offline():
    assert load_config(None, ["stream.mode=offline", "stream.epochs=5"]).stream.epochs == 5


def test_a_class_split_sets_the_number_of_experiences(tmp_path):
    """stream.classes_per_experience (or experience_classes) decides how many experiences there are: the resolved
    config, which config.yaml records, says so, instead of a recipe's n_experiences that the stream ignores."""
    cfg = load_config(None, ["stream.n_experiences=10", "stream.classes_per_experience=[5, 2, 3]"])
    assert cfg.stream.n_experiences == 3
    cfg = load_config(None, ["stream.classes_per_experience=[1, 2]", "stream.experience_classes=[[0], [1, 2]]"])
    assert cfg.stream.n_experiences == 2  # both given: they must agree
    with pytest.raises(ConfigError, match=r"stream.classes_per_experience: \[5, 5\] disagrees with "
                                          r"stream.experience_classes \(experiences of \[1, 1, 1\] classes\)"):
        load_config(None, ["stream.classes_per_experience=[5, 5]", "stream.experience_classes=[[0], [1], [2]]"])
    cfg = config_from_dict({"stream": {"classes_per_experience": [5, 5], "experience_classes": [[0], [1], [2]]}},
                           saved=True)  # an older run: the explicit classes decided its stream
    assert cfg.stream.classes_per_experience is None and cfg.stream.n_experiences == 3
    assert load_config(None, ["stream.n_experiences=7"]).stream.n_experiences == 7
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("overrides", [
    ["stream.mode=data_incremental", "stream.classes_per_experience=[5, 5]"],
    ["stream.mode=online", "stream.online_base=data_incremental", "stream.experience_classes=[[0], [1]]"],
    ["stream.mode=offline", "stream.classes_per_experience=[5, 5]"],
])
def test_a_class_split_of_a_stream_not_split_by_class_is_refused(overrides):
    key = overrides[-1].split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}: splits the classes of a class-incremental stream.*remove it"):
        load_config(None, overrides)


def test_a_saved_runs_ignored_class_split_is_dropped_with_a_warning(tmp_path, caplog):
    """A run saved before the refusal, with a class split its data-incremental stream never used: its config still
    loads to resume or probe it (saved=True), the split dropped and named."""
    data = {"stream": {"mode": "data_incremental", "n_experiences": 4, "classes_per_experience": [5, 5]}}
    with pytest.raises(ConfigError, match="classes_per_experience"):
        config_from_dict(data)
    with caplog.at_level("WARNING"):
        cfg = config_from_dict(data, saved=True)
    assert cfg.stream.classes_per_experience is None and cfg.stream.n_experiences == 4
    assert "stream.classes_per_experience on a data_incremental stream, which never used it" in caplog.text
    path = write(tmp_path, "stream: {mode: offline, experience_classes: [[0], [1]]}\n")
    assert load_config(path, saved=True).stream.experience_classes is None


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"config file '.*nope\.yaml' not found"):
        load_config(missing)


def test_invalid_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "train:\n  batch_size: [1, 2\n", "broken.yaml")
    with pytest.raises(ConfigError, match=r"config file '.*broken\.yaml' is not valid YAML"):
        load_config(path)


@pytest.mark.parametrize("text", ["- a\n- b\n", "42\n"], ids=["list", "scalar"])
def test_non_mapping_file_is_a_config_error(tmp_path, text):
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, text))


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# ------------------------------------------------------------------------------------ round trip, recipes

def test_save_then_load_round_trips(tmp_path):
    cfg = load_config(None, [
        "data.dataset=tinyimagenet", "data.root=/data/x", "data.train_per_class=7",
        "model.width=0.125", "model.stem=tiny", "augment.n_patches=4", "augment.size=16",
        "augment.jitter=[0.1, 0.2, 0.3, 0.05]", "optim.weight_decay=0.00001", "optim.warmup_steps=3",
        "stream.mode=online", "stream.experience_classes=[[0, 1], [2, 3, 4]]",
        "stream.classes_per_experience=[2, 3]", "eval.transfer=[cifar10, cifar100]",
        "train.threads=1", "train.channels_last=false", "run.out_dir=runs/rt",
    ])
    assert cfg != Config()
    path = tmp_path / "saved.yaml"
    save_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)
    assert again.optim.weight_decay == 1e-5 and type(again.optim.weight_decay) is float


def test_config_from_dict_matches_load_config():
    data = {"train": {"batch_size": 8}, "model": {"width": 0.25}}
    assert config_from_dict(data) == load_config(None, ["train.batch_size=8", "model.width=0.25"])


def test_recipes_exist():
    names = {p.name for p in CONFIGS}
    assert {"smoke.yaml", "split_cifar10.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_recipe_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


ACCURACY_ROWS = sorted((Path(__file__).resolve().parents[2] / "configs" / "accuracy").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCURACY_ROWS, ids=[p.name for p in ACCURACY_ROWS])
def test_every_accuracy_row_loads_and_is_a_row_of_the_bench(path):
    """Each configs/accuracy/ file is a valid config and a row of bench/accuracy.py (no orphaned recipe)."""
    cfg = load_config(path)
    assert cfg.model.width == 0.25 and cfg.augment.n_patches == 20 and cfg.data.dataset == "cifar10"
    # the blur is pinned: a committed row must not silently follow a changed default (3 taps before ab1a7c9)
    assert cfg.augment.blur_kernel == (13 if path.name == "split_cifar10_blur13.yaml" else 3)
    bench = (path.parents[2] / "bench" / "accuracy.py").read_text()
    assert f'"configs/accuracy/{path.name}"' in bench


def test_compile_backend_is_checked_only_where_something_compiles():
    assert load_config(None, ["train.compile_backend=inductr"]).train.compile_backend == "inductr"  # nothing compiles
    cfg = load_config(None, ["train.compile=true", "augment.compile=true", "train.compile_backend=aot_eager"])
    assert cfg.train.compile_backend == "aot_eager"


def test_transfer_targets_reported_under_one_name_are_refused(tmp_path):
    """eval.transfer rows are transfer/<short name>: two targets with one short name would overwrite each other's."""
    with pytest.raises(ConfigError, match=r"eval\.transfer\[2\]: 'npz:\S+/b/cifar100\.npz' and 'cifar100' would both "
                                          r"be reported as transfer/cifar100.*rename one folder or \.npz file"):
        load_config(None, ["eval.transfer=[cifar100, 'folder:a/svhn', 'npz:b/cifar100.npz']"])
    cfg = load_config(None, ["eval.transfer=[cifar100, 'folder:a/svhn', 'npz:b/cifar100_small.npz']"])
    assert len(cfg.eval.transfer) == 3


def test_a_value_yaml_reads_as_a_mapping_says_so() -> None:
    """`data.dataset=folder:` (no path): YAML reads `folder:` as {'folder': None}; the message says why and what to
    do."""
    with pytest.raises(ConfigError, match=r"^data\.dataset: expected str, got \{'folder': None\}: YAML reads folder: "
                                          r"with nothing after the colon as a mapping; complete the value \(a dataset: "
                                          r"folder:PATH or npz:PATH\) or quote it"):
        load_config(None, ["data.dataset=folder:"])
    with pytest.raises(ConfigError, match=r"^data\.dataset: 'folder:' names no path"):
        load_config(None, ["data.dataset='folder:'"])


def test_save_config_replaces_the_file_atomically(tmp_path, monkeypatch):
    """A run rewrites its config.yaml on every resume: killed mid-write, the old file must still be whole (a
    truncated one resumes with defaults for the sections it lost). The new text goes to a temporary file renamed
    over the old one, so a failure before the rename leaves the old file as it was."""
    import os

    import streaming_ssl.atomic as atomic

    path = tmp_path / "config.yaml"
    save_config(load_config(None, ["cl.replay.size=50", "cl.replay.batch=5"]), path)
    before = path.read_text()

    def killed(*args, **kwargs):
        raise OSError("killed before the rename")

    monkeypatch.setattr(atomic.os, "replace", killed)
    with pytest.raises(OSError, match="killed before the rename"):
        save_config(load_config(None), path)
    monkeypatch.setattr(atomic.os, "replace", os.replace)
    assert path.read_text() == before and load_config(path).cl.replay.size == 50
