"""streaming-ssl: continual and online self-supervised learning with one-pass EMP-SSL on Avalanche.

The public API (see README, "Use it from Python")::

    from streaming_ssl import EMPSSLStrategy, EMPSSLModel, MultiPatchAugment, LARS, param_groups
    from streaming_ssl import StreamEvaluator, ProbeSet, ProbeMetric, EvalSchedule, build_stream, load_config

Names are imported on first use (PEP 562), so `import streaming_ssl` stays cheap for the CLIs.
"""

import importlib as _importlib
import os as _os

# Avalanche imports SciPy, whose bundled OpenBLAS starts its own thread pool. On a CPU that pool
# fights PyTorch's OpenMP threads: measured here, a training step ran 15x slower and BatchNorm's
# backward could spin for minutes. We never use SciPy's BLAS, so keep it single-threaded. It must be
# set before SciPy loads, hence here (and in scenarios/__init__.py); a user's own setting wins.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

_WHERE = {
    # the method
    "EMPSSLStrategy": "streaming_ssl.strategy", "NonFiniteLossError": "streaming_ssl.strategy",
    "StreamInputError": "streaming_ssl.strategy", "derive_seed": "streaming_ssl.strategy",
    "EMPSSLModel": "streaming_ssl.models", "ResNet18": "streaming_ssl.models",
    "MultiPatchAugment": "streaming_ssl.augment",
    "coding_rate": "streaming_ssl.objective", "invariance": "streaming_ssl.objective",
    "emp_ssl_loss": "streaming_ssl.objective",
    "LARS": "streaming_ssl.lars", "param_groups": "streaming_ssl.lars", "cosine_lr": "streaming_ssl.lars",
    "set_lr": "streaming_ssl.lars",
    # probes and evaluation
    "extract_features": "streaming_ssl.probe", "linear_probe_accuracy": "streaming_ssl.probe",
    "train_linear_probe": "streaming_ssl.probe", "knn_predict": "streaming_ssl.probe",
    "select_weight_decay": "streaming_ssl.probe", "recalibrate_batchnorm": "streaming_ssl.probe",
    "StreamEvaluator": "streaming_ssl.evaluation", "ProbeSet": "streaming_ssl.evaluation",
    "ProbeMetric": "streaming_ssl.evaluation", "JSONLLogger": "streaming_ssl.evaluation",
    "ScalarTensorboardLogger": "streaming_ssl.evaluation", "forgetting": "streaming_ssl.evaluation",
    "plot_run": "streaming_ssl.evaluation", "read_rows": "streaming_ssl.evaluation",
    # run machinery
    "EvalSchedule": "streaming_ssl.plugins", "CheckpointPlugin": "streaming_ssl.plugins",
    "GracefulStop": "streaming_ssl.plugins", "ProgressPlugin": "streaming_ssl.plugins",
    "SyncBuffers": "streaming_ssl.plugins", "Interrupted": "streaming_ssl.plugins",
    "ComputeCounters": "streaming_ssl.accounting",
    # continual-learning methods
    "ReplayBufferPlugin": "streaming_ssl.cl.replay", "ImageBuffer": "streaming_ssl.cl.replay",
    "reservoir_slots": "streaming_ssl.cl.replay", "minred_keep": "streaming_ssl.cl.replay",
    "DistillPlugin": "streaming_ssl.cl.distill", "distill_loss": "streaming_ssl.cl.distill",
    "MixupPlugin": "streaming_ssl.cl.mixup", "mix_images": "streaming_ssl.cl.mixup",
    "RunLock": "streaming_ssl.runlock", "RunLocked": "streaming_ssl.runlock",
    # data, streams, config, assembly
    "build_stream": "scenarios.streams", "SSLStream": "scenarios.streams", "plan_class_split": "scenarios.streams",
    "as_avalanche_dataset": "scenarios.streams",
    "load_dataset": "scenarios.datasets", "dataset_spec": "scenarios.datasets", "DatasetSplits": "scenarios.datasets",
    "ImageData": "scenarios.datasets",
    "Config": "streaming_ssl.config", "load_config": "streaming_ssl.config", "ConfigError": "streaming_ssl.config",
    "build_run": "streaming_ssl.build", "train": "streaming_ssl.runner",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'streaming_ssl' has no attribute {name!r}")
    value = getattr(_importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
