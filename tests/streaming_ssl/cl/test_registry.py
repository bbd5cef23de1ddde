"""A continual-learning method of one's own, registered from a module that the config names (cl.imports): its
section is checked and saved like ours, its plugin trains and is checkpointed, a resume in a new process imports it
again, and evaluate.py reads the run without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from streaming_ssl import checkpoint as ckpt
from streaming_ssl.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[3]
DATA = os.environ.get("STREAMING_SSL_DATA")
needs_data = pytest.mark.skipif(not DATA or not (Path(DATA) / "cifar10.npz").is_file(),
                                reason="needs the real CIFAR-10: set STREAMING_SSL_DATA to the folder of cifar10.npz")
METHOD = '''
from dataclasses import dataclass

from avalanche.core import SupervisedPlugin

import streaming_ssl


@dataclass
class PullConfig:
    enabled: bool = False
    weight: float = 0.0

    def __post_init__(self):
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")


class PullPlugin(SupervisedPlugin):
    """Pulls z towards 0 (weight x mean z^2) and counts its updates: state worth resuming. Logs its term (train.jsonl)
    and counts the images it saw (a compute counter of its own)."""

    state_key = "mine.pull"

    def __init__(self, weight):
        super().__init__()
        self.weight, self.updates = weight, 0

    def before_backward(self, strategy, **kwargs):
        term = self.weight * strategy.mb_output.float().pow(2).mean()
        strategy.loss = strategy.loss + term
        strategy.last_stats["pull"] = term.detach()
        strategy.counters.add("pull_images", len(strategy.mb_x))
        self.updates += 1

    def state_dict(self):
        return {"updates": self.updates}

    def load_state_dict(self, state):
        self.updates = int(state["updates"])


def build(section, *, model, train_size, device, seed, plugins):
    return PullPlugin(section.weight) if section.enabled else None


streaming_ssl.register_method("pull", PullConfig, build)
'''
TINY = ["data.train_per_class=10", "data.test_per_class=2", "stream.n_experiences=2", "eval.probe_epochs=1",
        "eval.knn_k=0", "run.tensorboard=false", "run.plot=false", "train.threads=1"]


@pytest.fixture(scope="module")
def method_file(tmp_path_factory) -> Path:
    """One file for the module's tests: a process registers a name once, from one class."""
    path = tmp_path_factory.mktemp("method") / "pull_method.py"
    path.write_text(METHOD)
    return path


def test_the_section_of_a_registered_method_is_checked_like_ours(method_file) -> None:
    cfg = load_config(REPO / "configs/smoke.yaml", [f"cl.imports=[{method_file}]", "cl.pull.enabled=true",
                                                     "cl.pull.weight=0.5"])
    assert cfg.cl.pull.enabled and cfg.cl.pull.weight == 0.5
    saved = cfg.to_dict()["cl"]
    assert saved["pull"] == {"enabled": True, "weight": 0.5} and saved["imports"] == [str(method_file)]
    assert "methods" not in saved
    with pytest.raises(ConfigError, match=r"unknown config key 'cl.pull.wieght'. Did you mean 'cl.pull.weight'"):
        load_config(None, [f"cl.imports=[{method_file}]", "cl.pull.wieght=1"])
    with pytest.raises(ConfigError, match=r"cl.pull.weight: expected float, got 'heavy'"):
        load_config(None, [f"cl.imports=[{method_file}]", "cl.pull.weight=heavy"])
    with pytest.raises(ConfigError, match=r"^cl.pull: weight must be >= 0, got -1.0"):  # the method's own check
        load_config(None, [f"cl.imports=[{method_file}]", "cl.pull.weight=-1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'cl.nosuch'.*name the module that registers it in "
                                          r"cl.imports"):
        load_config(None, ["cl.nosuch.weight=1"])
    with pytest.raises(ConfigError, match=r"cl.imports\[0\]: importing 'no_such_module_here' failed "
                                          r"\(ModuleNotFoundError.*put its folder on PYTHONPATH"):
        load_config(None, ["cl.imports=[no_such_module_here]"])
    with pytest.raises(ConfigError, match=r"cl.imports\[0\]: '.*missing.py' is not a file"):
        load_config(None, [f"cl.imports=[{method_file.parent / 'missing.py'}]"])


def test_register_method_refuses_names_and_configs_it_cannot_take() -> None:
    from dataclasses import dataclass

    from streaming_ssl import register_method

    @dataclass
    class Section:
        weight: float = 1.0

    with pytest.raises(ValueError, match="'replay' cannot name a method"):
        register_method("replay", Section, lambda section, **kw: None)
    with pytest.raises(TypeError, match="config must be a dataclass"):
        register_method("mine_bad", dict, lambda section, **kw: None)
    register_method("mine_once", Section, lambda section, **kw: None)
    register_method("mine_once", Section, lambda section, **kw: None)  # the same module imported again

    @dataclass
    class Other:
        weight: float = 1.0

    with pytest.raises(ValueError, match="the method 'mine_once' is registered already"):
        register_method("mine_once", Other, lambda section, **kw: None)


@needs_data
def test_a_method_of_ones_own_trains_checkpoints_and_resumes_in_a_new_process(method_file, tmp_path,
                                                                             dies_after) -> None:
    from streaming_ssl.cli import evaluate
    from streaming_ssl.cli import train as run_stream

    run_dir = tmp_path / "run"
    args = ["--config", str(REPO / "configs/smoke.yaml"), f"run.out_dir={run_dir}", f"data.root={Path(DATA).resolve()}",
            *TINY, f"cl.imports=[{method_file}]", "cl.pull.enabled=true", "cl.pull.weight=0.5", "train.log_every=1"]
    dies_after(3, run_stream.main, args)
    state = ckpt.load(ckpt.latest(run_dir))  # saved before experience 0's evaluation
    assert state["plugins"]["mine.pull"] == {"updates": 3} and state["config"]["cl"]["pull"]["weight"] == 0.5
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["cl"]["pull"] == {"enabled": True, "weight": 0.5}

    # a new process: config.yaml names the module, which --resume imports before it reads the rest
    res = subprocess.run([sys.executable, "run_stream.py", "--resume", str(run_dir)], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    final = ckpt.load(ckpt.latest(run_dir))
    assert final["plugins"]["mine.pull"] == {"updates": final["position"]["global_step"]} and \
        final["position"]["global_step"] == 6  # 50 + 50 images, batch 20: 3 + 3 updates, each pulled
    # its counter went on from the checkpoint's, and its term is in the training curves, update by update
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["compute/pull_images"] for r in rows] == [50, 100]
    curves = [json.loads(line) for line in (run_dir / "train.jsonl").read_text().splitlines()]
    assert [r["update"] for r in curves] == [1, 2, 3, 4, 5, 6] and all(r["pull"] > 0 for r in curves)

    # evaluate.py needs the model and data, not the method: a new process reads the run with the module gone (this
    # process has the method registered, which hid that the saved section was refused)
    method_file.rename(tmp_path / "elsewhere.py")
    try:
        res = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", str(run_dir), "--train-per-class", "2",
                              "--test-per-class", "2", "--probe-epochs", "1", "--data-root", str(Path(DATA).resolve())],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        assert evaluate.main(["--checkpoint", str(run_dir), "--train-per-class", "2", "--test-per-class", "2",
                              "--probe-epochs", "1", "--data-root", str(Path(DATA).resolve())]) == 0
    finally:
        (tmp_path / "elsewhere.py").rename(method_file)
