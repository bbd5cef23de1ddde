"""Continual-learning methods of your own: a config section under `cl` plus a function that builds the plugin.

A module registers its method when it is imported::

    # my_method.py
    from dataclasses import dataclass

    import streaming_ssl

    @dataclass
    class L2RegConfig:            # the section cl.l2reg: every key typed, with its default
        enabled: bool = False
        weight: float = 1.0

    def build(section, *, model, train_size, device, seed, plugins):
        return L2RegPlugin(model, weight=section.weight) if section.enabled else None

    streaming_ssl.register_method("l2reg", L2RegConfig, build)

and a recipe (or the command line) names the module in `cl.imports`, a module name on the Python path or a .py
file, which run_stream.py imports before it reads the rest of the config::

    cl:
      imports: [./my_method.py]
      l2reg: {enabled: true, weight: 2.0}

The section is checked like ours (unknown keys and wrong types refused, with the valid keys named), saved in the
run's config.yaml, compared on --resume, and the module is imported again on resume. `build` gets the section
(an instance of the dataclass), the model being trained (without its DDP wrapper), the number of training images,
the device, the run's seed and the plugins built so far (ours: mixup, replay, distillation, in that order); it
returns a plugin, a list of plugins, or None. A plugin with `trainable_modules` has them trained too; one with
`state_key` / `state_dict` / `load_state_dict` is checkpointed (see streaming_ssl/plugins.py); one that works under
torchrun says so, `class L2RegPlugin(SupervisedPlugin, supports_distributed=True)`, or Avalanche warns there.
What the plugin puts in `strategy.last_stats` (0-dim tensors, in before_backward) joins the training curves
(train.jsonl, TensorBoard's train/*, the progress bar); what it spends it counts with
`strategy.counters.add("name", n)` (compute/name in every evaluation row from its first add on, checkpointed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable, NamedTuple

OURS = ("replay", "distill", "mixup", "imports", "methods")  # the keys of cl that a method may not take


class Method(NamedTuple):
    name: str
    config: type
    build: Callable


_METHODS: dict[str, Method] = {}


def register_method(name: str, config: type, build: Callable) -> None:
    """Make `cl.<name>` a config section of dataclass `config`, whose plugins `build` returns. Registering the
    same name again from the same class (a module imported twice) is allowed; another class under a taken name
    is not."""
    if not isinstance(name, str) or not name.isidentifier() or name in OURS:
        raise ValueError(f"register_method: {name!r} cannot name a method: use a Python identifier other than "
                         f"{', '.join(OURS)}")
    if not (isinstance(config, type) and dataclasses.is_dataclass(config)):
        raise TypeError(f"register_method({name!r}): config must be a dataclass (its fields are the section's keys), "
                        f"got {config!r}")
    if not callable(build):
        raise TypeError(f"register_method({name!r}): build must be callable, got {build!r}")
    old = _METHODS.get(name)
    if old is not None and (old.config.__module__, old.config.__qualname__) != (config.__module__,
                                                                               config.__qualname__):
        raise ValueError(f"register_method: the method {name!r} is registered already, by "
                         f"{old.config.__module__}.{old.config.__qualname__}; choose another name")
    _METHODS[name] = Method(name, config, build)


def registered() -> dict[str, Method]:
    """The methods registered so far, by name."""
    return dict(_METHODS)


def import_methods(names: list[str], key: str = "cl.imports") -> None:
    """Import each module name or .py file of `names` (which registers its methods); a ConfigError naming the entry
    and the fix when one cannot be imported."""
    from streaming_ssl.config import ConfigError

    for i, name in enumerate(names):
        try:
            if name.endswith(".py"):
                path = Path(name)
                if not path.is_file():
                    raise ConfigError(f"{key}[{i}]: {name!r} is not a file; give the path of your method's .py file "
                                      "(relative to the current directory) or a module name on the Python path")
                digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
                module_name = f"_streaming_ssl_method_{path.stem}_{digest}"
                if module_name in sys.modules:
                    continue
                spec = importlib.util.spec_from_file_location(module_name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[module_name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[module_name]
                    raise
            else:
                importlib.import_module(name)
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001 - the user's module: any error is named with the entry
            where = ("put its folder on PYTHONPATH, or give the .py file's path" if isinstance(err, ImportError)
                     else "fix the error in that module")
            raise ConfigError(f"{key}[{i}]: importing {name!r} failed ({type(err).__name__}: {err}); {where}") from err
