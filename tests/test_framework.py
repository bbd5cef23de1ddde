"""The doors of the framework: public API, the example, the installed files, no module importing a CLI,
short functions, and EMPSSLStrategy on a foreign Avalanche benchmark (fast path and fallback agree)."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("STREAMING_SSL_DATA", REPO.parent / "shared" / "data")) / "cifar10.npz"
PY_DIRS = ["streaming_ssl", "scenarios", "bench", "tests", "examples"]


def _modules(dirs=PY_DIRS) -> list[Path]:
    return sorted(p for d in dirs for p in (REPO / d).rglob("*.py")) + [REPO / "run_stream.py", REPO / "evaluate.py"]


# ------------------------------------------------------------------------------------------ public API
def test_public_api_exports_every_name_it_lists() -> None:
    import streaming_ssl

    assert len(streaming_ssl.__all__) >= 40
    for name in streaming_ssl.__all__:
        assert getattr(streaming_ssl, name) is not None, name
    from streaming_ssl import EMPSSLStrategy, LARS, StreamEvaluator, build_stream, load_config  # noqa: F401

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        streaming_ssl.nope  # noqa: B018


def test_every_error_the_clis_report_can_be_caught_from_the_api() -> None:
    """What the CLIs catch and report as a clear error, a Python user can catch too: `from streaming_ssl import X`."""
    import streaming_ssl

    caught = set()
    for path in sorted((REPO / "streaming_ssl" / "cli").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ExceptHandler) and isinstance(node.type, ast.Tuple):
                caught |= {e.id for e in node.type.elts if isinstance(e, ast.Name)}
    assert {"ConfigError", "DataError", "CheckpointError"} <= caught  # what the CLIs are known to catch
    assert sorted(caught - set(streaming_ssl.__all__)) == []
    assert all(issubclass(getattr(streaming_ssl, name), Exception) for name in caught)


def test_no_module_imports_a_cli_script() -> None:
    offenders = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in ("run_stream", "evaluate", "compare_runs")]
    assert offenders == []


def test_no_function_over_80_lines() -> None:
    long = []
    for path in _modules(["streaming_ssl", "scenarios"]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert long == []


def test_installed_distribution_holds_only_our_two_packages(tmp_path) -> None:
    """The wheel pip would install: top-level entries are streaming_ssl/ and scenarios/ (plus metadata), and
    the three console scripts point into the package."""
    src = tmp_path / "src"  # a copy: building in the checkout would leave build/ behind
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "run_stream.py", "evaluate.py", "compare_runs.py"):
        shutil.copy(REPO / name, src / name)
    for name in ("streaming_ssl", "scenarios"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("streaming_ssl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"streaming_ssl", "scenarios"}
    assert "streaming_ssl/cli/train.py" in names and "scenarios/imagenet100_classes.txt" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "streaming-ssl-train = streaming_ssl.cli.train:entry" in entry_points
    assert "streaming-ssl-evaluate = streaming_ssl.cli.evaluate:entry" in entry_points
    assert "streaming-ssl-compare = streaming_ssl.cli.compare:entry" in entry_points


@pytest.mark.parametrize("script, flag", [("streaming-ssl-train", "--resume"),
                                          ("streaming-ssl-evaluate", "--checkpoint"),
                                          ("streaming-ssl-compare", "--include-incomplete")])
def test_console_scripts_are_installed_and_answer(script, flag) -> None:
    exe = Path(sys.executable).parent / script
    if not exe.exists():
        pytest.skip(f"{script} not installed in this environment (scripts/setup.sh installs it)")
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and flag in proc.stdout, proc.stderr[-2000:]


# ------------------------------------------------------------------------------------------ foreign benchmarks
def _tiny_model_and_augment(seed: int = 0):
    from streaming_ssl import EMPSSLModel, MultiPatchAugment

    torch.manual_seed(seed)
    return EMPSSLModel(stem="cifar", width=0.125, feature_dim=32, proj_hidden_dim=32, proj_dim=16), MultiPatchAugment(2, 8)


def _strategy(model, augment, optimizer=None, **kw):
    from streaming_ssl import LARS, EMPSSLStrategy, param_groups

    return EMPSSLStrategy(model=model, optimizer=optimizer or LARS(param_groups(model, 1e-4), lr=0.1),
                          augment=augment, batch_size=6, channels_last=False, total_updates=4, **kw)


def _images(n=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 8, 8), generator=gen, dtype=torch.uint8), torch.arange(n) % 4


def test_fast_path_and_foreign_fallback_train_identically() -> None:
    """An experience of our streams (row_index over one tensor) is gathered by index; the same images as a
    foreign Avalanche dataset are collated per sample. Same batches, so bit-identical weights."""
    from avalanche.benchmarks import benchmark_from_datasets
    from avalanche.benchmarks.utils import as_classification_dataset
    from torch.utils.data import TensorDataset

    from scenarios.datasets import ImageData
    from scenarios.streams import build_stream, row_source

    x, y = _images()
    ours = list(build_stream(ImageData(x, y), 4, mode="offline"))[0]  # one experience, original order
    assert row_source(ours.dataset) is not None
    foreign_data = TensorDataset(x, y)
    foreign_data.targets = y.tolist()
    foreign = next(iter(benchmark_from_datasets(train=[as_classification_dataset(foreign_data)]).train_stream))
    assert row_source(foreign.dataset) is None
    weights = []
    for exp in (ours, foreign):
        model, augment = _tiny_model_and_augment()
        strategy = _strategy(model, augment)
        strategy.train(exp)
        assert strategy.global_step == 4 and strategy.counters.stream_images == 24
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    init = _tiny_model_and_augment()[0].state_dict()
    assert any(not torch.equal(weights[0][k], init[k]) for k in init if init[k].is_floating_point())  # it trained


def _foreign(x, y):
    from avalanche.benchmarks import benchmark_from_datasets
    from avalanche.benchmarks.utils import as_classification_dataset
    from torch.utils.data import TensorDataset

    data = TensorDataset(x, y)
    data.targets = y.tolist()
    return next(iter(benchmark_from_datasets(train=[as_classification_dataset(data)]).train_stream))


def test_float_images_in_unit_range_train_like_uint8() -> None:
    x, y = _images()
    results = []
    for images in (x, x.float() / 255):
        model, augment = _tiny_model_and_augment()
        _strategy(model, augment).train(_foreign(images, y))
        results.append(model.state_dict())
    assert all(torch.allclose(results[0][k].float(), results[1][k].float(), atol=1e-5) for k in results[0])


def test_normalised_float_input_is_refused_with_the_fix() -> None:
    from streaming_ssl import StreamInputError

    x, y = _images()
    normalised = (x.float() / 255 - 0.5) / 0.25
    model, augment = _tiny_model_and_augment()
    with pytest.raises(StreamInputError, match=r"float images must lie in \[0, 1\].*Remove Normalize"):
        _strategy(model, augment).train(_foreign(normalised, y))
    # the two other usual mistakes, each with its own fix: 0..255 as floats, and channels last
    with pytest.raises(StreamInputError, match=r"whole numbers in \[0, 25\d\]: pixel values 0..255 stored as floats. "
                                               r"Give uint8 images"):
        _strategy(model, augment).train(_foreign(x.float(), y))
    with pytest.raises(StreamInputError, match=r"got a batch of shape \(6, 8, 8, 3\).*look channels-last \(H, W, C\): "
                                               r"permute them to \(C, H, W\)"):
        _strategy(model, augment).train(_foreign(x.permute(0, 2, 3, 1), y))


def test_grayscale_benchmark_is_repeated_to_three_channels() -> None:
    x, y = _images()
    gray = x[:, :1]
    model, augment = _tiny_model_and_augment()
    strategy = _strategy(model, augment)
    strategy.train(_foreign(gray, y))
    assert strategy.global_step == 4


@pytest.mark.parametrize("patches", [0, 2])
def test_grayscale_images_are_probed_as_three_equal_channels(patches: int) -> None:
    """The probes read a grayscale benchmark's images as the strategy trained on them (they raised before)."""
    from streaming_ssl import extract_features

    x, _ = _images()
    model, augment = _tiny_model_and_augment()
    gray = x[:, :1]
    kw = dict(device=torch.device("cpu"), batch_size=10, patches=patches, channels_last=False, seed=3)
    got = extract_features(model, gray, augment, **kw)
    rgb = extract_features(model, gray.expand(-1, 3, -1, -1), augment, **kw)
    assert got.shape == (24, 32) and torch.equal(got, rgb)


# ------------------------------------------------------------------------------------------ the example
@pytest.mark.skipif(not DATA.exists(), reason="needs the real CIFAR-10 (STREAMING_SSL_DATA)")
def test_example_trains_with_avalanche_replay_and_prints_the_matrix(capsys, tmp_path) -> None:
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import own_benchmark
    finally:
        sys.path.remove(str(REPO / "examples"))
    matrix = own_benchmark.main(["--npz", str(DATA), "--per-class", "10", "--width", "0.125", "--experiences", "2",
                                 "--curves", str(tmp_path)])
    assert len(matrix) == 2 and all(len(row) == 2 for row in matrix)
    # TrainLog in a strategy of one's own: a row per update (50 images per experience, batch 50: one update each;
    # Avalanche's replay loads its 50 memory images with the 2nd, and samples_seen counts what the loader gave)
    curves = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert [r["update"] for r in curves] == [1, 2] and [r["samples_seen"] for r in curves] == [50, 150]
    assert {"loss", "tcr", "inv", "lr"} <= set(curves[-1])
    assert list((tmp_path / "tb" / "train").glob("events.out.tfevents.*"))
    assert all(0.0 <= a <= 1.0 for row in matrix for a in row)
    out = capsys.readouterr().out
    assert "after experience 1:" in out and "after experience 2:" in out
    code = [line for line in (REPO / "examples/own_benchmark.py").read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")]
    assert len(code) < 70  # about 40 lines of user code plus docstrings and argument parsing


def test_lazy_images_decoded_in_workers_train_like_the_main_process(tmp_path, monkeypatch, caplog) -> None:
    """ImageNet-100 and large folders decode lazily; with DataLoader workers (the CUDA default) the batches,
    and so the weights, are the same as decoding in the main process. Workers hand their batches over in
    /dev/shm: where it has no room for them (as a container's 64 MB for ImageNet-sized batches), the main process
    decodes instead, with a warning that names the fix, and trains the same."""
    from avalanche.core import SupervisedPlugin

    import streaming_ssl.strategy as strategy_module
    from torchvision.io import encode_png, write_file

    from scenarios.datasets import ImageData, LazyImageFolder
    from scenarios.streams import build_stream

    x, y = _images(n=12)
    paths = []
    for i, img in enumerate(x):
        paths.append(tmp_path / f"{i}.png")
        write_file(str(paths[-1]), encode_png(img))
    data = ImageData(LazyImageFolder(paths, 8), y)
    weights, used = [], []
    batch_bytes = 6 * 3 * 8 * 8  # batch 6 of uint8 8 x 8 images
    # free bytes of /dev/shm: as found (24 GB here), room for exactly one worker (2 x 2 batches), none
    for workers, free in ((0, None), (2, None), (2, 4 * batch_bytes), (2, 4 * batch_bytes - 1)):
        if free is not None:
            monkeypatch.setattr(strategy_module, "shm_free_bytes", lambda: free)
        model, augment = _tiny_model_and_augment()
        seen: list[int] = []
        watch = SupervisedPlugin()
        watch.before_training_epoch = lambda strategy, **kw: seen.append(strategy.dataloader.workers)
        strategy = _strategy(model, augment, loader_workers=workers, plugins=[watch])
        with caplog.at_level("WARNING", logger="streaming_ssl.strategy"):
            caplog.clear()
            strategy.train(list(build_stream(data, 4, mode="offline"))[0])
        assert strategy.global_step == 2 and len(seen) == 1
        used.append(seen[0])
        warned = [r.getMessage() for r in caplog.records if "/dev/shm" in r.getMessage()]
        assert len(warned) == (free is not None), warned
        if free is not None:
            assert f"{used[-1]} of 2 workers decode the images" in warned[0] and "--shm-size" in warned[0]
        weights.append(model.state_dict())
    assert used == [0, 2, 1, 0]
    for other in weights[1:]:
        assert all(torch.equal(weights[0][k], other[k]) for k in weights[0])
    # an online stream's mini-experience of one batch is decoded in the main process: /dev/shm does not matter and
    # nothing is said about it, with no room there at all
    monkeypatch.setattr(strategy_module, "shm_free_bytes", lambda: 0)
    model, augment = _tiny_model_and_augment()
    strategy = _strategy(model, augment, loader_workers=2)
    with caplog.at_level("WARNING", logger="streaming_ssl.strategy"):
        caplog.clear()
        strategy.train(list(build_stream(data, 4, mode="online", n_experiences=2, online_experience_size=6)))
    assert strategy.global_step == 2 and strategy.stream_step == 2
    assert not [r for r in caplog.records if "/dev/shm" in r.getMessage()]


def test_stream_modes_and_datasets_have_one_home() -> None:
    """Config validation, the stream builder and the loaders read the same registries."""
    import dataclasses

    from scenarios.datasets import DATASET_NAMES, DATASETS, ImageData
    from scenarios.streams import STREAM_MODES, build_stream
    from streaming_ssl.config import StreamConfig

    mode_field = next(f for f in dataclasses.fields(StreamConfig) if f.name == "mode")
    assert tuple(mode_field.metadata["choices"]) == tuple(STREAM_MODES)
    assert DATASET_NAMES == tuple(DATASETS)
    x, y = _images(n=16)
    for mode in STREAM_MODES:
        stream = build_stream(ImageData(x, y), 4, mode=mode, n_experiences=2, online_experience_size=4)
        assert stream.mode == mode and sum(stream.step_sizes) == 16


def _checkpointed_run(run_dir, x, y):
    """What the README's "Resume from Python" builds: a strategy with a replay buffer, an evaluator and a
    CheckpointPlugin saving into `run_dir` after each experience."""
    from avalanche.training.plugins import EvaluationPlugin

    from streaming_ssl import LARS, CheckpointPlugin, ProbeMetric, ProbeSet, ReplayBufferPlugin, StreamEvaluator, \
        param_groups

    model, augment = _tiny_model_and_augment()
    evaluator = StreamEvaluator(in_domain=ProbeSet("mine", x, y, x, y, 4), transfer=[], parent_classes=[[0, 1], [2, 3]],
                                augment=augment, device=torch.device("cpu"), channels_last=False, knn_k=0,
                                probe_kwargs={"epochs": 2})
    metric = ProbeMetric(evaluator, model)
    optimizer = LARS(param_groups(model, 1e-4), lr=0.1)
    saver = CheckpointPlugin(run_dir, model=model, optimizer=optimizer, evaluator=evaluator, metric=metric,
                             config={})
    strategy = _strategy(model, augment, optimizer=optimizer, plugins=[ReplayBufferPlugin(size=4, batch=2), saver],
                         evaluator=EvaluationPlugin(metric))
    return model, strategy, saver


def test_a_python_run_resumes_from_its_checkpoint_bit_for_bit(tmp_path) -> None:
    """The steps the README gives for resuming a run built in Python: build everything as before (same plugins,
    same total_updates), load the newest checkpoint, restore, train the experiences from strategy.stream_step."""
    from scenarios.datasets import ImageData
    from scenarios.streams import build_stream
    from streaming_ssl import load_latest_checkpoint

    x, y = _images()
    stream = list(build_stream(ImageData(x, y), 4, mode="class_incremental", n_experiences=2))
    full_model, full, full_saver = _checkpointed_run(tmp_path / "full", x, y)
    for experience in stream:
        full.train(experience)
    _, first, _ = _checkpointed_run(tmp_path / "stopped", x, y)
    first.train(stream[0])  # ... and the process dies here: experience 0's checkpoint is on disk

    model, strategy, saver = _checkpointed_run(tmp_path / "stopped", x, y)
    _, state = load_latest_checkpoint(tmp_path / "stopped")
    saver.restore(strategy, state)
    assert strategy.stream_step == 1
    for experience in stream[strategy.stream_step:]:
        strategy.train(experience)
    assert strategy.global_step == full.global_step
    assert all(torch.equal(full_model.state_dict()[k], v) for k, v in model.state_dict().items())
    assert saver.evaluator.history == full_saver.evaluator.history and len(saver.evaluator.history) == 2

    # saved with config={}: load_checkpoint_model / evaluate.py cannot rebuild the model (the default Config's
    # would not fit it), and say how to read the weights instead of blaming a model setting
    from streaming_ssl import load_checkpoint, load_checkpoint_model
    from streaming_ssl.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"saved without a config.*load_checkpoint\(path\)\['model'\]"):
        load_checkpoint_model(tmp_path / "full", device="cpu")
    weights = load_checkpoint(next((tmp_path / "full").glob("ckpt_*.pt")))["model"]
    assert set(weights) == set(model.state_dict())


def test_a_plugin_reads_h_before_backward_and_it_is_freed_after() -> None:
    """A method regularising the features the probes read needs h, not only z: `strategy.mb_features` holds it from
    forward to backward (in the graph, so a term on it trains), then None (no memory held between updates)."""
    from avalanche.core import SupervisedPlugin

    seen: dict = {}

    class Reader(SupervisedPlugin):
        def before_backward(self, strategy, **kwargs):
            h = strategy.mb_features
            seen["shape"], seen["grad"] = tuple(h.shape), h.requires_grad
            seen["h_of_patches"] = torch.equal(h, strategy.core_model(strategy.mb_patches)[0])

        def after_update(self, strategy, **kwargs):
            seen["after"] = strategy.mb_features

    model, augment = _tiny_model_and_augment()
    strategy = _strategy(model, augment, plugins=[Reader()])
    strategy.train(_foreign(*_images()))
    assert seen["shape"] == (6 * 2, 32) and seen["grad"] and seen["after"] is None  # 6 images x 2 patches, h of 32
    assert seen["h_of_patches"]


def test_train_log_in_a_strategy_of_ones_own(tmp_path, caplog) -> None:
    """TrainLog beside a user's plugin: a value named as a row field is left out with a warning (and does not break
    the progress bar); a new strategy on the same folder starts train.jsonl afresh; a run that dies keeps its rows
    up to the error (close); a write that fails keeps the rows for the next flush; load_state_dict leaves the
    file alone until training starts."""
    from avalanche.core import SupervisedPlugin

    from streaming_ssl import ProgressPlugin, TrainLog

    class Clash(SupervisedPlugin):
        def __init__(self, fail_at=None):
            super().__init__()
            self.fail_at = fail_at

        def before_backward(self, strategy, **kwargs):
            strategy.last_stats["loss"] = torch.tensor(123.0)
            strategy.last_stats["mine"] = torch.tensor(float(strategy.global_step))
            if strategy.global_step == self.fail_at:
                raise RuntimeError("the user's plugin failed")

    def run(fail_at=None) -> TrainLog:
        model, augment = _tiny_model_and_augment()
        log = TrainLog(tmp_path, every=1)
        strategy = _strategy(model, augment, plugins=[Clash(fail_at), ProgressPlugin(4, log_every=1), log])
        try:
            strategy.train(_foreign(*_images()))
        finally:
            log.close()
        return log

    def rows() -> list[dict]:
        return [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]

    with caplog.at_level("WARNING"):
        run()
    assert [r["update"] for r in rows()] == [1, 2, 3, 4] and [r["mine"] for r in rows()] == [0.0, 1.0, 2.0, 3.0]
    assert all(r["loss"] < 0 for r in rows())  # the objective's, not the plugin's 123
    assert "strategy.last_stats['loss'] is not logged" in caplog.text
    run()  # the same folder again: a new run, not appended to the last
    assert [r["update"] for r in rows()] == [1, 2, 3, 4]
    with pytest.raises(RuntimeError, match="the user's plugin failed"):
        run(fail_at=2)  # dies in its third update, two done: both rows written by close()
    assert [r["update"] for r in rows()] == [1, 2]

    log = TrainLog(tmp_path, every=1)
    log.load_state_dict({"rows": 1})
    assert len(rows()) == 2  # until training starts
    (tmp_path / "train.jsonl").unlink()
    (tmp_path / "train.jsonl").mkdir()  # appending fails
    log.pending = [({"update": 7, "experience": 0, "samples_seen": 1, "lr": 0.1}, ["loss"], torch.tensor([-1.0]),
                    {})]
    with caplog.at_level("WARNING"):
        log.flush()
    assert "could not append to" in caplog.text and len(log.pending) == 1
    (tmp_path / "train.jsonl").rmdir()
    log.flush()
    assert [r["update"] for r in rows()] == [7] and not log.pending


def test_every_plugin_of_ours_declares_it_runs_under_ddp() -> None:
    """Avalanche warns under torchrun about each plugin without supports_distributed (all of ours, before): they
    are tested with two ranks (tests/test_distributed.py), so they say so."""
    import inspect

    from avalanche.core import SupervisedPlugin

    import streaming_ssl.cl.distill
    import streaming_ssl.cl.mixup
    import streaming_ssl.cl.replay
    import streaming_ssl.plugins

    ours = {cls for module in (streaming_ssl.plugins, streaming_ssl.cl.replay, streaming_ssl.cl.mixup,
                               streaming_ssl.cl.distill)
            for _, cls in inspect.getmembers(module, inspect.isclass)
            if issubclass(cls, SupervisedPlugin) and cls.__module__ == module.__name__}
    assert len(ours) == 9 and all(cls.supports_distributed for cls in ours), \
        sorted(cls.__name__ for cls in ours if not cls.supports_distributed)


def _probed_strategy(plugins, x, y, parent_classes):
    from avalanche.training.plugins import EvaluationPlugin

    from streaming_ssl import ProbeMetric, ProbeSet, StreamEvaluator

    model, augment = _tiny_model_and_augment()
    evaluator = StreamEvaluator(in_domain=ProbeSet("mine", x, y, x, y, 4), transfer=[], parent_classes=parent_classes,
                                augment=augment, device=torch.device("cpu"), channels_last=False, knn_k=0,
                                probe_kwargs={"epochs": 1})
    return _strategy(model, augment, plugins=plugins, evaluator=EvaluationPlugin(ProbeMetric(evaluator, model)))


def test_an_online_stream_without_an_eval_schedule_is_refused_before_it_outruns_parent_classes() -> None:
    """An online stream's mini-experiences are not the accuracy matrix's columns: without EvalSchedule each
    evaluation counted one more parent (average over 5 of 2 columns, forgetting of classes not seen yet), silently.
    Now the experience after the last parent is refused before it trains; with EvalSchedule the stream runs."""
    from scenarios.datasets import ImageData
    from scenarios.streams import build_stream
    from streaming_ssl import EvalSchedule

    x, y = _images(n=24)
    stream = build_stream(ImageData(x, y), 4, mode="online", experience_classes=[[0, 1], [2, 3]],
                          online_experience_size=6)
    experiences = list(stream)
    assert len(experiences) == 4 and stream.parent_classes == [[0, 1], [2, 3]]
    strategy = _probed_strategy([], x, y, stream.parent_classes)
    strategy.train(experiences[0])
    strategy.train(experiences[1])
    with pytest.raises(ValueError, match=r"after 3 experience\(s\), but parent_classes lists 2: on an online stream.*"
                                         r"EvalSchedule\(step_parent, every\)"):
        strategy.train(experiences[2])
    assert strategy.global_step == 2  # refused before the third experience trained

    scheduled = _probed_strategy([EvalSchedule(stream.step_parent, every=0)], x, y, stream.parent_classes)
    for experience in experiences:
        scheduled.train(experience)
    rows = scheduled.evaluator.metrics[0].evaluator.history
    assert [int(r[-1]) for r in rows] == [1, 2]  # evaluated at the end of each parent, as parents 1 and 2

    # a schedule that maps fewer experiences than the stream has is refused before the first one it lacks trains
    short = _probed_strategy([EvalSchedule(stream.step_parent[:3], every=0)], x, y, stream.parent_classes)
    for experience in experiences[:3]:
        short.train(experience)
    with pytest.raises(ValueError, match=r"EvalSchedule maps 3 training experiences.*experience 3 is training"):
        short.train(experiences[3])
    assert short.global_step == 3


def test_a_plugins_trainable_modules_outside_the_optimizer_are_refused_before_any_update() -> None:
    """A plugin of one's own whose head is left out of the optimizer: its term would be added against weights that
    never change (and gradients that pile up), silently."""
    from avalanche.core import SupervisedPlugin

    class Head(SupervisedPlugin):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(32, 8)
            self.trainable_modules = [self.head]

        def before_backward(self, strategy, **kwargs) -> None:
            strategy.loss = strategy.loss + self.head(strategy.mb_features).pow(2).mean()

    x, y = _images()
    model, augment = _tiny_model_and_augment()
    strategy = _strategy(model, augment, plugins=[Head()])
    with pytest.raises(ValueError, match=r"Head.trainable_modules holds a Linear whose parameters are not in the "
                                         r"strategy's optimizer, so it would never train"):
        strategy.train(_foreign(x, y))
    assert strategy.global_step == 0


def test_a_schedule_sized_for_fewer_updates_than_the_run_trains_is_said_once(caplog) -> None:
    """epochs=3 with total_updates of one pass: the learning rate stops at the schedule's last value for the last
    two thirds of the run; a warning says so, once."""
    x, y = _images()
    model, augment = _tiny_model_and_augment()
    strategy = _strategy(model, augment, epochs=3)  # 4 updates per pass; total_updates=4
    with caplog.at_level("WARNING", logger="streaming_ssl.strategy"):
        strategy.train(_foreign(x, y))
    assert strategy.global_step == 12
    said = [r.getMessage() for r in caplog.records if "cosine schedule was sized for" in r.getMessage()]
    assert said == ["update 5 is past the 4 updates the cosine schedule was sized for (total_updates): the learning "
                    "rate stays at the schedule's last value from here on. Pass total_updates = the updates of the "
                    "whole run (with epochs=E, E times the batches of every experience)"]


def test_a_task_aware_plugin_reads_each_experiences_task_label() -> None:
    """A task-incremental Avalanche benchmark: the objective ignores task labels, but strategy.mb_task_id gives a
    plugin the experience's label for every image (Avalanche's own reads it from the batch, which has none)."""
    from avalanche.benchmarks import nc_benchmark
    from avalanche.benchmarks.utils import as_classification_dataset
    from avalanche.core import SupervisedPlugin
    from torch.utils.data import TensorDataset

    x, y = _images()
    data = TensorDataset(x, y)
    data.targets = y.tolist()
    dataset = as_classification_dataset(data)
    bench = nc_benchmark(dataset, dataset, n_experiences=2, task_labels=True, shuffle=False)
    seen = []

    class TaskReader(SupervisedPlugin):
        def before_forward(self, strategy, **kwargs) -> None:
            seen.append((list(strategy.experience.task_labels), strategy.mb_task_id.tolist()))

    model, augment = _tiny_model_and_augment()
    strategy = _strategy(model, augment, plugins=[TaskReader()])
    for experience in bench.train_stream:
        strategy.train(experience)
    assert sorted({labels[0] for labels, _ in seen}) == [0, 1]
    assert all(ids == labels * len(ids) and ids for labels, ids in seen)


def test_probe_sets_training_would_refuse_are_refused_when_the_evaluator_is_built() -> None:
    """Normalised float images (the augmentation normalised them again, silently), numpy arrays, labels from 1,
    labels as a list, and parent_classes outside the probe set's classes: one line each, before any training."""
    from streaming_ssl import ProbeSet, StreamEvaluator

    x, y = _images()
    _, augment = _tiny_model_and_augment()

    def build(train_images=x, train_labels=y, parent_classes=((0, 1), (2, 3))):
        return StreamEvaluator(in_domain=ProbeSet("mine", train_images, train_labels, x, y, 4), transfer=[],
                               parent_classes=[list(c) for c in parent_classes], augment=augment,
                               device=torch.device("cpu"))

    build()  # the good set
    build(train_images=x.float() / 255)  # floats in [0, 1] are images too
    cases = [({"train_images": (x.float() / 255 - 0.5) / 0.25},
              r"probe set 'mine', train_images: float images must lie in \[0, 1\].*Remove Normalize"),
             ({"train_images": x.numpy()}, r"train_images is a ndarray: give torch tensors \(torch.from_numpy"),
             ({"train_images": x[:, 0].reshape(24, -1)}, r"train_images: images must be \(C, H, W\) tensors"),
             ({"train_labels": y + 1}, r"train_labels span 1..4, but num_classes is 4: labels must be 0..num_classes"),
             ({"train_labels": y.tolist()}, r"train_labels must be a 1-D integer torch tensor, got list"),
             ({"train_labels": y[:10]}, r"train_images holds 24 images but probe set 'mine', train_labels 10 labels"),
             ({"parent_classes": ((1, 2), (3, 4))}, r"parent_classes names the classes \[4\], outside the 4 classes")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            build(**kwargs)


def test_replay_across_experiences_of_two_image_sizes_says_to_resize() -> None:
    """The buffer holds the first experience's 8x8 images; the second gives 16x16: the replayed batch is refused
    with the fix (it was torch.cat's size error)."""
    from streaming_ssl import ReplayBufferPlugin

    x, y = _images()
    big = torch.nn.functional.interpolate(x.float(), size=16).to(torch.uint8)
    model, augment = _tiny_model_and_augment()
    strategy = _strategy(model, augment, plugins=[ReplayBufferPlugin(size=8, batch=2)])
    strategy.train(_foreign(x, y))
    with pytest.raises(ValueError, match=r"the replay buffer holds images of shape \(3, 8, 8\), but the stream now "
                                         r"gives \(3, 16, 16\): resize the benchmark's images to one size"):
        strategy.train(_foreign(big, y))


@pytest.mark.parametrize("replay", [False, True], ids=["plain", "avalanche_replay"])
def test_calling_eval_between_experiences_leaves_training_as_it_was(replay: bool) -> None:
    """strategy.eval(stream) drew its patches from training's augmentation generator, so a run that called it
    between experiences trained on other patches afterwards (other weights): it now puts the generator back, and
    torch's global one, which Avalanche's eval loader and its ReplayPlugin's buffer draw from."""
    from avalanche.training.plugins import ReplayPlugin

    x, y = _images()
    experiences = [_foreign(x[:12], y[:12]), _foreign(x[12:], y[12:])]
    weights = []
    for call_eval in (False, True):
        model, augment = _tiny_model_and_augment()
        strategy = _strategy(model, augment, plugins=[ReplayPlugin(mem_size=6)] if replay else [])
        strategy.train(experiences[0])
        if call_eval:
            state = strategy.aug_generator.get_state()
            strategy.eval([experiences[1]])
            assert torch.equal(strategy.aug_generator.get_state(), state)
        strategy.train(experiences[1])
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_messages_name_the_program_that_was_started(monkeypatch) -> None:
    """A stop, an out-of-memory or a refused resume says how to continue: with the console script where the run was
    started with it (it named python run_stream.py, which an installed package's user may not have at hand)."""
    from streaming_ssl import distributed as ddp

    for argv0, said in (("/opt/venv/bin/streaming-ssl-train", "streaming-ssl-train"),
                        ("/work/repo/run_stream.py", "python run_stream.py"), ("-c", "python run_stream.py")):
        monkeypatch.setattr(sys, "argv", [argv0, "--config", "x.yaml"])
        assert ddp.relaunch() == said
    monkeypatch.setattr(ddp, "is_dist", lambda: True)
    monkeypatch.setattr(sys, "argv", ["/opt/venv/bin/streaming-ssl-train"])
    assert ddp.relaunch() == "the same torchrun command with streaming-ssl-train"
