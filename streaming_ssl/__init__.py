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

_EXPORTS = {
    # the method
    "streaming_ssl.strategy": ["EMPSSLStrategy", "NonFiniteLossError", "StreamInputError"],
    "streaming_ssl.seeds": ["derive_seed"],
    "streaming_ssl.models": ["EMPSSLModel", "ResNet18"],
    "streaming_ssl.augment": ["MultiPatchAugment"],
    "streaming_ssl.objective": ["coding_rate", "invariance", "emp_ssl_loss"],
    "streaming_ssl.lars": ["LARS", "param_groups", "cosine_lr", "set_lr"],
    # probes and evaluation
    "streaming_ssl.probe": ["extract_features", "linear_probe_accuracy", "train_linear_probe", "knn_predict",
                            "select_weight_decay", "recalibrate_batchnorm"],
    "streaming_ssl.probe_run": ["load_checkpoint_model", "CheckpointModel", "probe_checkpoint", "ProbeRequest",
                                 "ProbeOutOfMemory"],
    "streaming_ssl.evaluation": ["StreamEvaluator", "ProbeSet", "ProbeMetric", "JSONLLogger", "ExperienceTextLogger",
                                 "ScalarTensorboardLogger", "forgetting", "backward_transfer", "forward_transfer",
                                 "plot_run", "plot_train", "read_rows"],
    "streaming_ssl.compare": ["summarize", "markdown_table", "plot_compare", "CompareError"],
    # run machinery
    "streaming_ssl.plugins": ["EvalSchedule", "CheckpointPlugin", "GracefulStop", "ProgressPlugin", "SyncBuffers",
                              "TrainLog", "Interrupted", "EvaluationInterrupted", "CheckpointWriteError"],
    "streaming_ssl.accounting": ["ComputeCounters"],
    "streaming_ssl.runlock": ["RunLock", "RunLocked"],
    # continual-learning methods
    "streaming_ssl.cl.replay": ["ReplayBufferPlugin", "ImageBuffer", "reservoir_slots", "minred_keep"],
    "streaming_ssl.cl.distill": ["DistillPlugin", "distill_loss"],
    "streaming_ssl.cl.mixup": ["MixupPlugin", "mix_images"],
    "streaming_ssl.cl.registry": ["register_method"],
    # data, streams, config, assembly
    "scenarios.streams": ["build_stream", "SSLStream", "plan_class_split", "as_avalanche_dataset", "StreamError"],
    "scenarios.datasets": ["load_dataset", "dataset_spec", "DatasetSplits", "ImageData", "DataError"],
    "streaming_ssl.checkpoint": ["CheckpointError", "load_checkpoint", "load_latest_checkpoint"],
    "streaming_ssl.config": ["Config", "load_config", "ConfigError"],
    "streaming_ssl.build": ["build_run"],
    "streaming_ssl.runner": ["train", "RunError", "OutOfMemory"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'streaming_ssl' has no attribute {name!r}")
    value = getattr(_importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
