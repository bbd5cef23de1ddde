"""streaming-ssl: continual and online self-supervised learning with one-pass EMP-SSL."""

import os as _os

# Avalanche imports SciPy, whose bundled OpenBLAS starts its own thread pool. On a CPU that pool
# fights PyTorch's OpenMP threads: measured here, a training step ran 15x slower and BatchNorm's
# backward could spin for minutes. We never use SciPy's BLAS, so keep it single-threaded. It must be
# set before SciPy loads, hence here (and in scenarios/__init__.py); a user's own setting wins.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
