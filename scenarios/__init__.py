"""Where data becomes Avalanche streams: dataset loaders and stream builders."""

import os as _os

# See streaming_ssl/__init__.py: SciPy's OpenBLAS threads slow PyTorch's CPU kernels badly.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
