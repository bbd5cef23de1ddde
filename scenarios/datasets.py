"""Image datasets in their official on-disk layouts, loaded into uint8 tensors.

Supported datasets (see :data:`DATASET_NAMES`):

* ``cifar10`` -- ``ROOT/cifar10.npz`` (the project's lossless npz, see
  ``shared/data/README.md``) or torchvision's ``ROOT/cifar-10-batches-py/``.
* ``cifar100`` -- ``ROOT/cifar100.npz`` (same keys) or ``ROOT/cifar-100-python/``.
* ``tinyimagenet`` -- ``ROOT/tiny-imagenet-200/`` (the official zip, extracted);
  decoded once and cached next to the data.
* ``imagenet100`` -- the 100 classes of ``imagenet100_classes.txt`` read lazily
  from ``ROOT/imagenet100/{train,val}/<wnid>/`` or ``ROOT/imagenet/{train,val}/<wnid>/``.
* ``folder:PATH`` and ``npz:PATH`` -- any image folder or .npz file (see
  :mod:`scenarios.sources`); the path is in the name, ``ROOT`` is not used.

The registry :data:`DATASETS` maps each built-in name to its :class:`DatasetSpec`
(loader, model stem, image size, normalisation, number of classes); adding a
built-in dataset means adding one entry there. :func:`dataset_spec` answers for
built-in names and generic sources alike.

``ROOT`` is the ``root`` argument, or the ``STREAMING_SSL_DATA`` environment
variable when no root is given. Every problem with the data raises
:class:`DataError` with a message saying what was looked for, where, and how
to fix it.
"""

from __future__ import annotations

import difflib
import importlib.resources
import io
import logging
import os
import pathlib
import pickle
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "DATASET_NAMES",
    "ENV_VAR",
    "GENERIC_SPELLINGS",
    "DataError",
    "DatasetSpec",
    "DatasetSplits",
    "ImageData",
    "LazyImageFolder",
    "check_dataset_name",
    "dataset_spec",
    "load_dataset",
    "resolve_root",
    "stem_for_size",
]

logger = logging.getLogger(__name__)

ENV_VAR = "STREAMING_SSL_DATA"
# How the two generic sources are spelled wherever a dataset is named (see scenarios/sources.py).
GENERIC_SPELLINGS = ("folder:PATH", "npz:PATH")

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

IMAGENET100_DEFAULT_SIZE = 224
# what torchvision.io.decode_image reads (BMP/TIFF are not: convert them to PNG)
IMAGE_EXTENSIONS = frozenset({".jpeg", ".jpg", ".png", ".webp"})

TINY_DIR = "tiny-imagenet-200"
TINY_CACHE_NAME = ".streaming_ssl_cache.pt"
TINY_CACHE_VERSION = 1
TINY_IMAGE_SIZE = 64
_PROGRESS_THRESHOLD = 2000

_CIFAR_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}
_TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


class DataError(ValueError):
    """A dataset is missing, malformed or cannot be read.

    The message names what was looked for, where (full paths) and how to fix it.
    """


# --------------------------------------------------------------------------- root


def resolve_root(root: str | os.PathLike[str] | None, *, create: bool = False) -> pathlib.Path:
    """Return the data root folder.

    Args:
        root: the folder holding the datasets (config ``data.root``); when ``None``
            the environment variable ``STREAMING_SSL_DATA`` is used.
        create: create the folder if it does not exist (used before a download).

    Raises:
        DataError: neither setting is given, or the folder does not exist.
    """
    if root is None or str(root) == "":
        env = os.environ.get(ENV_VAR, "")
        if not env:
            raise DataError(
                f"No data folder given: set data.root in the config or the environment "
                f"variable {ENV_VAR} to the folder that holds the datasets "
                f"(e.g. `export {ENV_VAR}=/path/to/data`)."
            )
        path = pathlib.Path(env).expanduser()
        source = f"${ENV_VAR}"
    else:
        path = pathlib.Path(root).expanduser()
        source = "data.root"
    path = path.resolve()
    if not path.is_dir():
        if create and not path.exists():
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DataError(
                    f"Data folder {path} (from {source}) does not exist and could not be "
                    f"created ({exc}); create it or point data.root / {ENV_VAR} elsewhere."
                ) from exc
            return path
        what = "is not a folder" if path.exists() else "does not exist"
        raise DataError(
            f"Data folder {path} (from {source}) {what}; set data.root in the config or "
            f"the environment variable {ENV_VAR} to an existing folder holding the datasets."
        )
    return path


# --------------------------------------------------------------------------- containers


def _as_index(indices: torch.Tensor | Sequence[int] | np.ndarray) -> torch.Tensor:
    """Convert ``indices`` to a 1-D int64 CPU tensor."""
    idx = torch.as_tensor(indices)
    if idx.dtype == torch.bool:
        raise TypeError("boolean masks are not supported as indices; use mask.nonzero()")
    if idx.is_floating_point() or idx.is_complex():
        raise TypeError(f"indices must be integers, got dtype {idx.dtype}")
    return idx.to(device="cpu", dtype=torch.int64).reshape(-1)


class LazyImageFolder:
    """Image files decoded on demand to square uint8 tensors.

    Each image is decoded with :func:`torchvision.io.decode_image` in RGB mode,
    its shorter side resized to ``image_size`` (bilinear, antialias) and then
    center-cropped to ``image_size x image_size``.

    Indexing mirrors a uint8 tensor of shape ``(N, 3, image_size, image_size)``:
    an int (or 0-d tensor) gives one ``(3, S, S)`` image; a 1-D LongTensor, a
    sequence of ints or a slice gives a stacked ``(k, 3, S, S)`` batch. The
    object only holds file paths, so it pickles cheaply (for DataLoader workers).
    """

    def __init__(self, paths: Iterable[str | os.PathLike[str]], image_size: int) -> None:
        """Build a loader over ``paths`` producing ``image_size`` x ``image_size`` images."""
        if int(image_size) <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size = int(image_size)
        self._paths: list[str] = [os.fspath(p) for p in paths]

    @property
    def paths(self) -> list[str]:
        """The file paths, in index order."""
        return list(self._paths)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Shape of the equivalent dense tensor ``(N, 3, S, S)``."""
        return (len(self), 3, self.image_size, self.image_size)

    @property
    def dtype(self) -> torch.dtype:
        """Always ``torch.uint8``."""
        return torch.uint8

    def __len__(self) -> int:
        return len(self._paths)

    def __repr__(self) -> str:
        return f"LazyImageFolder(n={len(self)}, image_size={self.image_size})"

    def subset(self, indices: torch.Tensor | Sequence[int] | np.ndarray) -> LazyImageFolder:
        """A lazy view holding only the rows ``indices`` (in that order)."""
        idx = _as_index(indices).tolist()
        paths = self._paths
        return LazyImageFolder([paths[i] for i in idx], self.image_size)

    def load(self, i: int) -> torch.Tensor:
        """Decode, resize and center-crop image ``i`` into a ``(3, S, S)`` uint8 tensor."""
        path = self._paths[i]
        return _resize_center_crop(_decode_rgb(path), self.image_size)

    def __getitem__(self, key: int | slice | torch.Tensor | Sequence[int] | np.ndarray) -> torch.Tensor:
        if isinstance(key, (int, np.integer)):
            return self.load(int(key))
        if isinstance(key, torch.Tensor) and key.dim() == 0:
            return self.load(int(key.item()))
        if isinstance(key, slice):
            idx = np.arange(len(self))[key]
        else:
            idx = _as_index(key).numpy()
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"index out of range for LazyImageFolder of length {n}")
        if idx.size == 0:
            return torch.empty((0, 3, self.image_size, self.image_size), dtype=torch.uint8)
        return torch.stack([self.load(int(i)) for i in idx])


@dataclass
class ImageData:
    """Images with their integer class labels.

    ``images`` is either a contiguous uint8 tensor ``(N, 3, H, W)`` or a
    :class:`LazyImageFolder`; both support ``len()`` and indexing with a 1-D
    LongTensor, returning a uint8 ``(k, 3, H, W)`` tensor.
    """

    images: torch.Tensor | LazyImageFolder
    targets: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.images) != len(self.targets):
            raise DataError(
                f"ImageData: {len(self.images)} images but {len(self.targets)} targets"
            )

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, indices: torch.Tensor | Sequence[int] | np.ndarray) -> ImageData:
        """Rows ``indices`` (in that order): copied for tensors, a lazy view for files."""
        idx = _as_index(indices)
        if isinstance(self.images, LazyImageFolder):
            images: torch.Tensor | LazyImageFolder = self.images.subset(idx)
        else:
            images = self.images.index_select(0, idx)
        return ImageData(images=images, targets=self.targets.index_select(0, idx))


@dataclass
class DatasetSplits:
    """A dataset's train and test splits plus its metadata."""

    name: str
    train: ImageData
    test: ImageData
    class_names: list[str]
    image_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(class_names)``)."""
        return len(self.class_names)


# --------------------------------------------------------------------------- registry and entry point

# loader(root, *, download, image_size) -> DatasetSplits; root is ignored by the generic sources
Loader = Callable[..., "DatasetSplits"]


@dataclass(frozen=True)
class DatasetSpec:
    """What the rest of the code needs to know about a dataset before (or without) loading it.

    Attributes:
        name: the canonical name (a generic source: its readable name, e.g. ``svhn``).
        loader: ``loader(root, *, download, image_size) -> DatasetSplits``.
        stem: the encoder stem that fits the image size: ``cifar``, ``tiny`` or ``imagenet``.
        image_size: side of the square images the loader returns (by default).
        mean, std: per-channel normalisation statistics in [0, 1].
        num_classes: number of classes.
    """

    name: str
    loader: Loader
    stem: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_classes: int

    def load(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        download: bool = False,
        image_size: int | None = None,
    ) -> DatasetSplits:
        """Load the dataset (same arguments as :func:`load_dataset`); ``image_size=None``: the spec's own."""
        size = self.image_size if image_size is None else image_size
        return self.loader(root, download=download, image_size=size)


def stem_for_size(image_size: int) -> str:
    """The encoder stem for images of side ``image_size``: <= 32 cifar, <= 64 tiny, else imagenet.

    The CIFAR stem (3x3 stride-1 conv, no max-pool) keeps small images' resolution; the ImageNet stem
    (7x7 stride-2 conv + max-pool) divides it by 4, which only large images afford. Generic sources
    (``folder:``/``npz:``) get their stem from this rule, applied to the side the encoder receives.
    """
    size = int(image_size)
    if size <= 32:
        return "cifar"
    if size <= 64:
        return "tiny"
    return "imagenet"


def _canonical(name: str) -> str:
    """A built-in name spelled loosely (case, ``-``/``_``, ``tinyimagenet200``) -> its registry key."""
    key = str(name).strip().lower().replace("-", "").replace("_", "")
    return "tinyimagenet" if key == "tinyimagenet200" else key


def check_dataset_name(name: str, key: str = "dataset") -> None:
    """Check the spelling of a dataset name without touching any file.

    Accepts a built-in name (see :data:`DATASET_NAMES`, spelled as :func:`load_dataset` accepts it)
    or a generic source ``folder:PATH`` / ``npz:PATH``.

    Args:
        name: the name to check.
        key: what the name is (a config key such as ``data.dataset``); it starts the message.

    Raises:
        DataError: unknown name; the message names ``key``, the closest valid name and the generic
            spellings.
    """
    from scenarios import sources  # sources builds on this module's containers: imported when used

    if sources.is_generic(name):
        try:
            sources.parse_source(name)
        except DataError as err:
            raise DataError(f"{key}: {err}") from None
        return
    if _canonical(name) in DATASETS:
        return
    close = difflib.get_close_matches(_canonical(name), DATASET_NAMES, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise DataError(
        f"{key}: unknown value {name!r}.{hint} Valid: {', '.join(DATASET_NAMES)}, or any image folder as "
        f"folder:PATH (PATH/train/<class>/ and PATH/test/ or PATH/val/) or a .npz file as npz:PATH "
        f"(x_train, y_train, x_test, y_test)."
    )


def dataset_spec(name: str, *, image_size: int | None = None) -> DatasetSpec:
    """The :class:`DatasetSpec` of a built-in name or of a generic ``folder:PATH`` / ``npz:PATH`` source.

    Args:
        name: as for :func:`load_dataset`.
        image_size: the side the images will be resized to (as passed to :func:`load_dataset`); it
            sets ``image_size`` of ImageNet-100 and of generic sources, and so their stem.

    A built-in spec is a constant of the registry. A generic source's spec needs its data: this
    reads the source (its statistics come from the cache after the first time), so code that loads
    the data anyway may as well take ``stem_for_size(splits.image_size)``.

    Raises:
        DataError: unknown name, or (generic sources) missing or malformed data.
    """
    from scenarios import sources

    if sources.is_generic(name):
        splits = sources.load_source(sources.parse_source(name), image_size=image_size)
        return DatasetSpec(
            name=splits.name,
            loader=partial(_load_generic, name),
            stem=stem_for_size(splits.image_size),
            image_size=splits.image_size,
            mean=splits.mean,
            std=splits.std,
            num_classes=splits.num_classes,
        )
    check_dataset_name(name)
    spec = DATASETS[_canonical(name)]
    if image_size is None or int(image_size) == spec.image_size:
        return spec
    if spec.name != "imagenet100":
        _check_fixed_size(spec.name, image_size, spec.image_size)
    return replace(spec, image_size=_positive_size(spec.name, image_size))


def load_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    image_size: int | None = None,
) -> DatasetSplits:
    """Load dataset ``name`` from ``root`` (or ``$STREAMING_SSL_DATA``).

    Args:
        name: one of :data:`DATASET_NAMES` (case-insensitive; ``-``/``_`` ignored), or a generic
            source ``folder:PATH`` / ``npz:PATH`` (:mod:`scenarios.sources`; ``root`` is not used,
            a relative PATH is relative to the current directory).
        root: the data folder; ``None`` means ``$STREAMING_SSL_DATA``.
        download: CIFAR only: fetch the python layout with torchvision if no
            local copy exists (needs internet).
        image_size: side of the returned square images. ImageNet-100 resizes to
            it (default 224) and so do generic sources (default: their own size);
            the other datasets have a fixed size (32, 32, 64) and only accept that value.

    Raises:
        DataError: unknown name, missing or malformed data.
    """
    from scenarios import sources

    if sources.is_generic(name):
        return _load_generic(name, root, download=download, image_size=image_size)
    check_dataset_name(name)
    return DATASETS[_canonical(name)].load(root, download=download, image_size=image_size)


def _load_generic(name: str, root: Any, *, download: bool, image_size: int | None) -> DatasetSplits:
    """Loader of a ``folder:``/``npz:`` source (``root`` unused: the path is in the name)."""
    from scenarios import sources

    _no_download(name, download)
    return sources.load_source(sources.parse_source(name), image_size=image_size)


def _check_fixed_size(name: str, image_size: int | None, native: int) -> None:
    """Reject an ``image_size`` that differs from a dataset's fixed image size."""
    if image_size is not None and int(image_size) != native:
        raise DataError(
            f"{name} images are {native}x{native}; image_size={image_size} is not supported "
            f"(only imagenet100 and folder:/npz: sources are resized). Remove data.image_size or set it to {native}."
        )


def _positive_size(name: str, image_size: int | None) -> int:
    """``image_size`` as a positive int, or a DataError naming the dataset."""
    if image_size is None or int(image_size) <= 0:
        raise DataError(f"{name}: image_size must be a positive number of pixels, got {image_size}")
    return int(image_size)


def _no_download(name: str, download: bool) -> None:
    """Warn that ``download`` does nothing for a dataset that cannot be fetched."""
    if download:
        logger.warning("data.download is only supported for CIFAR; ignored for %s", name)


def _load_cifar_entry(name: str, root: Any, *, download: bool, image_size: int | None) -> DatasetSplits:
    """Registry loader of CIFAR-10/100."""
    _check_fixed_size(name, image_size, 32)
    return _load_cifar(name, resolve_root(root, create=download), download=download)


def _load_tiny_entry(root: Any, *, download: bool, image_size: int | None) -> DatasetSplits:
    """Registry loader of Tiny ImageNet."""
    _no_download("tinyimagenet", download)
    _check_fixed_size("tinyimagenet", image_size, TINY_IMAGE_SIZE)
    return _load_tiny_imagenet(resolve_root(root))


def _load_imagenet100_entry(root: Any, *, download: bool, image_size: int | None) -> DatasetSplits:
    """Registry loader of ImageNet-100 (resized to ``image_size``, default 224)."""
    _no_download("imagenet100", download)
    size = IMAGENET100_DEFAULT_SIZE if image_size is None else _positive_size("imagenet100", image_size)
    return _load_imagenet100(resolve_root(root), size)


# --------------------------------------------------------------------------- CIFAR


@dataclass(frozen=True)
class _CifarSpec:
    """Where and how one CIFAR variant is stored (its classes and statistics live in :data:`DATASETS`)."""

    name: str
    npz_name: str
    py_dir: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: str
    names_key: str

    @property
    def num_classes(self) -> int:
        """Number of classes, from the registry."""
        return DATASETS[self.name].num_classes


_CIFAR_SPECS = {
    "cifar10": _CifarSpec(
        name="cifar10",
        npz_name="cifar10.npz",
        py_dir="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_file="test_batch",
        meta_file="batches.meta",
        label_key="labels",
        names_key="label_names",
    ),
    "cifar100": _CifarSpec(
        name="cifar100",
        npz_name="cifar100.npz",
        py_dir="cifar-100-python",
        train_files=("train",),
        test_file="test",
        meta_file="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
    ),
}


def _load_cifar(name: str, base: pathlib.Path, *, download: bool) -> DatasetSplits:
    """Load CIFAR-10/100 from the npz (preferred) or the python layout."""
    spec = _CIFAR_SPECS[name]
    npz_path = base / spec.npz_name
    py_path = base / spec.py_dir
    if npz_path.is_file():
        logger.info("Loading %s from %s", name, npz_path)
        train, test, names = _read_cifar_npz(npz_path, spec)
    else:
        if not py_path.is_dir():
            if not download:
                raise DataError(
                    f"{name} not found: looked for {npz_path} and {py_path}/. Set data.download: "
                    f"true (needs internet; fetches {_CIFAR_URLS[name]} into {base}) or point "
                    f"{ENV_VAR} / data.root at a folder holding {spec.npz_name} or {spec.py_dir}/."
                )
            _download_cifar(name, base)
        logger.info("Loading %s from %s", name, py_path)
        train, test, names = _read_cifar_python(py_path, spec)
    return DatasetSplits(
        name=name,
        train=train,
        test=test,
        class_names=names,
        image_size=DATASETS[name].image_size,
        mean=DATASETS[name].mean,
        std=DATASETS[name].std,
    )


def _download_cifar(name: str, base: pathlib.Path) -> None:
    """Fetch the python layout with torchvision into ``base``."""
    import torchvision.datasets as tvd

    cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    logger.info("Downloading %s into %s", name, base)
    try:
        cls(root=str(base), train=True, download=True)
    except Exception as exc:  # network, disk or checksum problems
        raise DataError(
            f"Downloading {name} from {_CIFAR_URLS[name]} into {base} failed: {exc}. Check the "
            f"internet connection, or place {_CIFAR_SPECS[name].npz_name} or the extracted "
            f"{_CIFAR_SPECS[name].py_dir}/ in {base} and set data.download: false."
        ) from exc


def read_npz_arrays(
    path: pathlib.Path, required: Sequence[str], optional: Sequence[str] = (), *, fix: str
) -> dict[str, np.ndarray]:
    """The ``required`` (and present ``optional``) arrays of an .npz file, loaded without pickle.

    Raises:
        DataError: the file is not a zip archive (an .npy, a text file), a required key is missing
            (naming it and the keys present), or the file is truncated, corrupted or holds pickled
            objects; ``fix`` ends the message.
    """
    try:
        with open(path, "rb") as fh:
            magic = fh.read(6)
        if not magic.startswith(b"PK"):  # a zip starts with "PK"; one that does but is cut short is corrupted
            npy = " but an .npy (one array, as numpy.save writes)" if magic == b"\x93NUMPY" else ""
            raise DataError(
                f"{path} is not an .npz (zip) file{npy}; save the arrays with numpy.savez(path, x_train=..., "
                f"y_train=..., ...). {fix}"
            )
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in required if k not in npz.files]
            if missing:
                raise DataError(
                    f"{path} lacks the key(s) {', '.join(missing)} (has: "
                    f"{', '.join(npz.files) or 'none'}); {fix}"
                )
            return {k: npz[k] for k in (*required, *optional) if k in npz.files}
    except DataError:
        raise
    # a damaged file raises many types: BadZipFile and zlib.error for the archive, and from a corrupted .npy
    # header tokenize's TokenError, SyntaxError, ValueError, or MemoryError for a shape that asks too much
    except Exception as exc:
        if isinstance(exc, ValueError) and "allow_pickle" in str(exc):
            detail = "it holds object arrays (pickled data), which are not loaded for safety"
        else:
            detail = _damage(exc)
        raise DataError(f"{path} is truncated or corrupted ({detail}); {fix}") from exc


def _damage(exc: BaseException) -> str:
    """How a file failed to load, for a DataError: a MemoryError also names the other cause it can have."""
    detail = f"{type(exc).__name__}: {exc}".rstrip(": ")
    if isinstance(exc, MemoryError):
        detail += ": a damaged header that asks for more memory than there is, or a file too large for this " \
                  "machine's memory"
    return detail


def _read_cifar_npz(path: pathlib.Path, spec: _CifarSpec) -> tuple[ImageData, ImageData, list[str]]:
    """Read and validate a CIFAR npz (x_train, y_train, x_test, y_test, class_names)."""
    fallback = f"the python layout {path.parent / spec.py_dir}/"
    required = ("x_train", "y_train", "x_test", "y_test", "class_names")
    arrays = read_npz_arrays(
        path, required,
        fix=f"it must hold {', '.join(required)} as documented in shared/data/README.md. Re-create it, "
            f"or delete it to fall back to {fallback}.",
    )

    splits = []
    for split in ("train", "test"):
        x = arrays[f"x_{split}"]
        y = arrays[f"y_{split}"]
        x = _check_hwc_images(x, f"{path} key x_{split}")
        targets = _check_labels(y, len(x), spec.num_classes, f"{path} key y_{split}")
        images = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        splits.append(ImageData(images=images, targets=targets))
    names = _check_class_names(arrays["class_names"], spec.num_classes, f"{path} key class_names")
    return splits[0], splits[1], names


def _check_hwc_images(x: np.ndarray, where: str) -> np.ndarray:
    """Validate a (N, 32, 32, 3) uint8 array."""
    if x.dtype != np.uint8:
        if np.issubdtype(x.dtype, np.floating) and bool(np.isnan(x).any()):
            raise DataError(
                f"{where} contains NaN values (dtype {x.dtype}); images must be uint8 0..255. "
                f"Re-create the file."
            )
        raise DataError(
            f"{where} has dtype {x.dtype}; images must be uint8 0..255 of shape (N, 32, 32, 3) "
            f"(HWC). Re-create the file."
        )
    if x.ndim != 4 or x.shape[1:] != (32, 32, 3):
        raise DataError(
            f"{where} has shape {tuple(x.shape)}; expected (N, 32, 32, 3) uint8 HWC. "
            f"Re-create the file."
        )
    return x


def _as_array(value: Any, where: str) -> np.ndarray:
    """np.asarray, with a DataError where numpy cannot make one array (a damaged file nests a list in a list)."""
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{where} is not an array ({type(exc).__name__}: {exc}): the file is corrupted. "
                        "Re-create it.") from exc


def _check_labels(y: Any, n: int, num_classes: int, where: str) -> torch.Tensor:
    """Validate integer labels of length ``n`` in ``[0, num_classes)``; return int64 tensor.

    Labels shaped ``(n, 1)`` (as Keras' ``cifar10.load_data()`` returns them) are taken as ``(n,)``.
    """
    arr = _as_array(y, where)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise DataError(
            f"{where} must be a 1-D integer array of labels; got dtype {arr.dtype}, shape "
            f"{tuple(arr.shape)}. Re-create the file."
        )
    if arr.shape[0] != n:
        raise DataError(
            f"{where} has {arr.shape[0]} labels but there are {n} images. Re-create the file."
        )
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= num_classes):
        raise DataError(
            f"{where} has labels out of range [{int(arr.min())}, {int(arr.max())}]; expected "
            f"0..{num_classes - 1}. Re-create the file."
        )
    return torch.from_numpy(arr.astype(np.int64, copy=True))


def _check_class_names(names: Any, num_classes: int, where: str) -> list[str]:
    """Validate a list of ``num_classes`` class names (str or bytes)."""
    out = [_to_str(n) for n in _as_array(names, where).reshape(-1).tolist()]
    if len(out) != num_classes:
        raise DataError(
            f"{where} lists {len(out)} class names; expected {num_classes}. Re-create the file."
        )
    return out


def _to_str(value: Any) -> str:
    """Decode bytes (as found in Python-2 pickles) to str."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


# pickle._Unpickler is pickle's pure-Python unpickler, not the C one (pickle.Unpickler): the C unpickler sizes
# its memo as an array to the largest index a pickle names, so one damaged byte in a LONG_BINPUT index
# (1.5 billion, say) makes it fill gigabytes with zeros and the kernel kill the process; the Python one keeps
# its memo in a dict. A CIFAR-10 batch is about 30,000 opcodes and CIFAR-100's train file 300,000 (the labels and
# file names; the pixels are one string): about 0.2 s for the largest, once per process.
def _plain_dtype(*args: Any, **kwargs: Any) -> np.dtype:
    """numpy.dtype for the unpickler, refusing object dtypes: an object array is filled from a list, its memory
    allocated and filled first, so a damaged shape could ask for gigabytes before the list's length is checked."""
    dtype = np.dtype(*args, **kwargs)
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"an array of dtype {dtype} (Python objects) is not allowed in a CIFAR batch")
    return dtype


class _SafeUnpickler(pickle._Unpickler):  # noqa: SLF001 - see above
    """Unpickler that only rebuilds numpy arrays and plain Python containers, with bounded memory on any
    damaged file (read it from memory: a damaged length then reads what there is, and allocates nothing)."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
        ("codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102 - pickle hook
        if (module, name) == ("numpy", "dtype"):
            return _plain_dtype
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")

    def load_bytearray8(self) -> None:
        """BYTEARRAY8 without its zero-filled buffer of the length the pickle states (pickle's own allocates it
        before reading: a damaged length of 14 GB filled 14 GB): read what there is, then check the length."""
        (size,) = struct.unpack("<Q", self.read(8))
        data = self.read(size)
        if len(data) != size:
            raise pickle.UnpicklingError(f"pickle data was truncated: a bytearray of {size} bytes, {len(data)} left")
        self.append(bytearray(data))

    dispatch = {**pickle._Unpickler.dispatch, pickle.BYTEARRAY8[0]: load_bytearray8}  # noqa: SLF001


def _unpickle(path: pathlib.Path, layout_hint: str) -> dict[str, Any]:
    """Load one pickled CIFAR batch as a dict with str keys."""
    if not path.is_file():
        raise DataError(
            f"CIFAR file {path} is missing; {layout_hint}"
        )
    try:
        obj = _SafeUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    # a damaged pickle raises many types: UnpicklingError, EOFError, LookupError (a garbled codec name),
    # OverflowError (a frame length), MemoryError (a length that asks too much), TypeError, ValueError...
    except Exception as exc:
        raise DataError(f"CIFAR file {path} is truncated or corrupted ({_damage(exc)}); {layout_hint}") from exc
    if not isinstance(obj, dict):
        raise DataError(f"CIFAR file {path} does not hold a dict; {layout_hint}")
    return {_to_str(k): v for k, v in obj.items()}


def _read_cifar_python(folder: pathlib.Path, spec: _CifarSpec) -> tuple[ImageData, ImageData, list[str]]:
    """Read torchvision's / the official python layout of CIFAR-10/100."""
    hint = (
        f"{folder}/ must hold {', '.join(spec.train_files)}, {spec.test_file} and "
        f"{spec.meta_file} as extracted from {_CIFAR_URLS[spec.name]}; "
        f"delete the folder and set data.download: true to fetch it again."
    )

    def read_batches(files: Sequence[str]) -> ImageData:
        xs, ys = [], []
        for fname in files:
            path = folder / fname
            d = _unpickle(path, hint)
            if "data" not in d or spec.label_key not in d:
                raise DataError(
                    f"CIFAR file {path} lacks the key(s) 'data' and/or {spec.label_key!r} "
                    f"(has: {', '.join(sorted(d))}); {hint}"
                )
            data = np.asarray(d["data"])
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
                raise DataError(
                    f"CIFAR file {path}: 'data' has shape {tuple(data.shape)} and dtype "
                    f"{data.dtype}; expected (N, 3072) uint8 (R, G, B planes of 32x32). {hint}"
                )
            # 3072 = R plane, then G, then B; each 32x32 row-major -> CHW directly.
            xs.append(data.reshape(-1, 3, 32, 32))
            ys.append(_check_labels(d[spec.label_key], len(data), spec.num_classes,
                                    f"CIFAR file {path} key {spec.label_key!r}"))
        images = torch.from_numpy(np.ascontiguousarray(np.concatenate(xs, axis=0)))
        return ImageData(images=images, targets=torch.cat(ys))

    train = read_batches(spec.train_files)
    test = read_batches((spec.test_file,))
    meta_path = folder / spec.meta_file
    meta = _unpickle(meta_path, hint)
    if spec.names_key not in meta:
        raise DataError(
            f"CIFAR file {meta_path} lacks the key {spec.names_key!r} (has: "
            f"{', '.join(sorted(meta))}); {hint}"
        )
    names = _check_class_names(meta[spec.names_key], spec.num_classes,
                               f"CIFAR file {meta_path} key {spec.names_key!r}")
    return train, test, names


# --------------------------------------------------------------------------- decoding


def _decode_rgb(path: str) -> torch.Tensor:
    """Decode an image file to a (3, H, W) uint8 tensor (grayscale/RGBA -> RGB).

    A 16-bit PNG (decoded as uint16) is scaled to 8 bits by keeping the high byte: ``v >> 8`` =
    ``floor(v / 256)``, torchvision's ``to_dtype(..., scale=True)`` (65535 -> 255, 40000 -> 156).
    """
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2.functional import to_dtype

    try:
        img = decode_image(path, mode=ImageReadMode.RGB)
    except Exception as exc:  # torchvision raises RuntimeError for undecodable files
        raise DataError(
            f"Cannot decode image {path} ({type(exc).__name__}: {exc}); the file is corrupted or "
            f"not a JPEG/PNG: replace it from the original archive or delete it."
        ) from exc
    if img.dtype != torch.uint8:  # 16-bit PNG: uint16 0..65535
        img = to_dtype(img, torch.uint8, scale=True)
    return img


def resize_uint8(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize uint8 images ``(3, H, W)`` or ``(N, 3, H, W)`` to ``height x width``, rounded back to uint8.

    The resize is the call of the whole-image probes (:meth:`streaming_ssl.augment.MultiPatchAugment.whole_image`):
    ``torch.nn.functional.interpolate(x, mode="bilinear", align_corners=False, antialias=True)`` on float
    pixels, so a stored resized image differs from the probes' own resize by rounding only.
    """
    batch = images if images.dim() == 4 else images.unsqueeze(0)
    out = torch.nn.functional.interpolate(
        batch.float(), size=(int(height), int(width)), mode="bilinear", align_corners=False, antialias=True
    )
    out = out.round_().clamp_(0, 255).to(torch.uint8)
    return out if images.dim() == 4 else out.squeeze(0)


def _resize_center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to ``size`` (:func:`resize_uint8`), then center-crop square.

    ``img`` is ``(3, H, W)`` or a batch ``(N, 3, H, W)`` of one size; the longer side becomes
    ``int(size * long / short)``, as in torchvision's ``resize``.
    """
    from torchvision.transforms.v2 import functional as F

    h, w = int(img.shape[-2]), int(img.shape[-1])
    if (h, w) == (size, size):
        return img.contiguous()
    if min(h, w) != size:
        new_h, new_w = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
        img = resize_uint8(img, new_h, new_w)
    return F.center_crop(img, [size, size]).contiguous()


def _decode_many(
    paths: Sequence[str], size: int, desc: str, *, same_size_as: tuple[str, int, int] | None = None
) -> torch.Tensor:
    """Decode ``paths`` into one (N, 3, size, size) uint8 tensor, with progress if many.

    ``same_size_as=(path, H, W)``: every image must be H x W like ``path``, else a DataError.
    """
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    iterator: Iterable[tuple[int, str]] = enumerate(paths)
    if len(paths) > _PROGRESS_THRESHOLD:
        try:
            from tqdm import tqdm

            iterator = tqdm(iterator, total=len(paths), desc=desc, unit="img")
        except ImportError:  # pragma: no cover - tqdm is a dependency
            logger.info("%s: decoding %d images", desc, len(paths))
    for i, p in iterator:
        img = _decode_rgb(p)
        if same_size_as is not None and tuple(img.shape[-2:]) != same_size_as[1:]:
            ref, h, w = same_size_as
            raise DataError(
                f"{desc}: images differ in size ({ref} is {h}x{w}, {p} is {img.shape[-2]}x{img.shape[-1]}); "
                f"set data.image_size (image_size=...) to the side to resize them all to."
            )
        out[i] = _resize_center_crop(img, size)
    return out


def _list_images(folder: pathlib.Path) -> list[str]:
    """Sorted image files (by extension) directly inside ``folder``.

    Hidden files are skipped: macOS leaves ``._NAME.png`` (AppleDouble metadata) and ``.DS_Store``
    beside the images, and they are not images.
    """
    with os.scandir(folder) as it:
        files = [
            e.path for e in it
            if e.is_file() and not e.name.startswith(".")
            and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
        ]
    return sorted(files)


# --------------------------------------------------------------------------- Tiny ImageNet


def _read_lines(path: pathlib.Path) -> list[str]:
    """Non-empty stripped lines of a text file."""
    with open(path, encoding="utf-8") as fh:
        return [ln.strip() for ln in fh if ln.strip()]


def _load_tiny_imagenet(base: pathlib.Path) -> DatasetSplits:
    """Load Tiny ImageNet (train + val) from the official extracted zip, with a tensor cache."""
    folder = base / TINY_DIR
    how = (
        f"Download {_TINY_URL} and extract it into {base} (giving {folder}/ with wnids.txt, "
        f"words.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt), "
        f"or point {ENV_VAR} / data.root at the folder that holds {TINY_DIR}/."
    )
    if not folder.is_dir():
        raise DataError(f"tinyimagenet not found: looked for {folder}/. {how}")
    wnids_path = folder / "wnids.txt"
    ann_path = folder / "val" / "val_annotations.txt"
    for needed in (wnids_path, ann_path):
        if not needed.is_file():
            raise DataError(f"tinyimagenet: {needed} is missing. {how}")

    wnids = _read_lines(wnids_path)
    if not wnids:
        raise DataError(f"tinyimagenet: {wnids_path} lists no class. {how}")
    dupes = sorted({w for w in wnids if wnids.count(w) > 1})
    if dupes:
        raise DataError(f"tinyimagenet: {wnids_path} lists {dupes[:5]} more than once. {how}")
    index = {w: i for i, w in enumerate(wnids)}
    class_names = _tiny_class_names(folder / "words.txt", wnids)

    train_paths: list[str] = []
    train_targets: list[int] = []
    for i, wnid in enumerate(wnids):
        cdir = folder / "train" / wnid / "images"
        if not cdir.is_dir():
            raise DataError(f"tinyimagenet: class folder {cdir}/ (listed in {wnids_path}) is missing. {how}")
        files = _list_images(cdir)
        if not files:
            raise DataError(f"tinyimagenet: class folder {cdir}/ holds no .JPEG/.jpg/.png image. {how}")
        train_paths.extend(files)
        train_targets.extend([i] * len(files))

    val_paths: list[str] = []
    val_targets: list[int] = []
    for lineno, line in enumerate(_read_lines(ann_path), start=1):
        parts = line.split("\t")
        if len(parts) < 2:
            raise DataError(
                f"tinyimagenet: {ann_path} line {lineno} is malformed ({line!r}); expected "
                f"'filename<TAB>wnid<TAB>bbox...'. {how}"
            )
        fname, wnid = parts[0].strip(), parts[1].strip()
        if wnid not in index:
            raise DataError(
                f"tinyimagenet: {ann_path} line {lineno} names wnid {wnid!r}, which is not in "
                f"{wnids_path}. The two files come from different copies: re-extract {TINY_DIR}. "
            )
        img_path = folder / "val" / "images" / fname
        if not img_path.is_file():
            raise DataError(
                f"tinyimagenet: {img_path} (listed in {ann_path} line {lineno}) is missing. {how}"
            )
        val_paths.append(str(img_path))
        val_targets.append(index[wnid])

    cache_path = folder / TINY_CACHE_NAME
    cached = _load_tiny_cache(cache_path, wnids, len(train_paths), len(val_paths))
    if cached is not None:
        train_images, test_images = cached
    else:
        train_images = _decode_many(train_paths, TINY_IMAGE_SIZE, "tinyimagenet train")
        test_images = _decode_many(val_paths, TINY_IMAGE_SIZE, "tinyimagenet val")
        _save_tiny_cache(cache_path, wnids, train_images, test_images)

    return DatasetSplits(
        name="tinyimagenet",
        train=ImageData(train_images, torch.tensor(train_targets, dtype=torch.int64)),
        test=ImageData(test_images, torch.tensor(val_targets, dtype=torch.int64)),
        class_names=class_names,
        image_size=TINY_IMAGE_SIZE,
        mean=DATASETS["tinyimagenet"].mean,
        std=DATASETS["tinyimagenet"].std,
    )


def _tiny_class_names(words_path: pathlib.Path, wnids: list[str]) -> list[str]:
    """First synonym from words.txt for each wnid; the wnid itself when unavailable."""
    words: dict[str, str] = {}
    if words_path.is_file():
        for line in _read_lines(words_path):
            wnid, _, text = line.partition("\t")
            if text:
                words[wnid.strip()] = text.split(",")[0].strip()
    else:
        logger.info("tinyimagenet: %s not found; using wnids as class names", words_path)
    return [words.get(w) or w for w in wnids]


def _load_tiny_cache(
    path: pathlib.Path, wnids: list[str], n_train: int, n_val: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Return the cached (train, val) tensors if the cache matches the current files."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        ok = (
            isinstance(blob, dict)
            and blob.get("version") == TINY_CACHE_VERSION
            and list(blob.get("wnids", [])) == wnids
            and int(blob.get("n_train", -1)) == n_train
            and int(blob.get("n_val", -1)) == n_val
            and tuple(blob["train_images"].shape) == (n_train, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
            and tuple(blob["val_images"].shape) == (n_val, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
            and blob["train_images"].dtype == torch.uint8
            and blob["val_images"].dtype == torch.uint8
        )
    except Exception as exc:  # unreadable / stale format: rebuild it
        logger.warning("tinyimagenet: ignoring unreadable cache %s (%s)", path, exc)
        return None
    if not ok:
        logger.info("tinyimagenet: cache %s is stale (files changed); rebuilding it", path)
        return None
    logger.info("tinyimagenet: loaded decoded images from cache %s", path)
    return blob["train_images"].contiguous(), blob["val_images"].contiguous()


def _save_tiny_cache(
    path: pathlib.Path, wnids: list[str], train: torch.Tensor, val: torch.Tensor
) -> None:
    """Write the decoded tensors atomically; skip quietly if the folder is not writable."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    blob = {
        "version": TINY_CACHE_VERSION,
        "wnids": list(wnids),
        "n_train": int(train.shape[0]),
        "n_val": int(val.shape[0]),
        "train_images": train,
        "val_images": val,
    }
    try:
        torch.save(blob, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        logger.info("tinyimagenet: not caching decoded images at %s (%s)", path, exc)
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
    else:
        logger.info("tinyimagenet: cached decoded images at %s", path)


# --------------------------------------------------------------------------- ImageNet-100


def imagenet100_classes() -> list[str]:
    """The 100 ImageNet wnids of ImageNet-100, in class-index order (shipped with the package)."""
    package = __package__ or "scenarios"
    text = importlib.resources.files(package).joinpath("imagenet100_classes.txt").read_text("utf-8")
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def _load_imagenet100(base: pathlib.Path, image_size: int) -> DatasetSplits:
    """ImageNet-100 from ``imagenet100/`` (preferred) or the full ``imagenet/`` folder."""
    candidates = [base / "imagenet100", base / "imagenet"]
    folder = next((c for c in candidates if c.is_dir()), None)
    layout = "{train,val}/<wnid>/*.JPEG (val sorted into class folders)"
    if folder is None:
        raise DataError(
            f"imagenet100 not found: looked for {candidates[0]}/ and {candidates[1]}/. Put the "
            f"ImageNet (ILSVRC-2012) train and val images there as {layout}, or point "
            f"{ENV_VAR} / data.root at the folder that holds one of them."
        )
    wnids = imagenet100_classes()
    splits: list[ImageData] = []
    for split in ("train", "val"):
        sdir = folder / split
        if not sdir.is_dir():
            raise DataError(
                f"imagenet100: {sdir}/ is missing; expected {folder}/{layout}."
            )
        missing = [w for w in wnids if not (sdir / w).is_dir()]
        if missing:
            raise DataError(
                f"imagenet100: {len(missing)} of {len(wnids)} class folders are missing in "
                f"{sdir}/ (first: {', '.join(missing[:5])}). Each class of "
                f"imagenet100_classes.txt needs a folder {sdir}/<wnid>/ with its images; copy "
                f"them from ImageNet (val must be sorted into class folders"
                + ("; this val/ holds the images flat, as ILSVRC2012_img_val.tar extracts: sort them into "
                   "<wnid>/ folders, e.g. with the widely used valprep.sh or the devkit's ground truth)."
                   if any(sdir.glob("ILSVRC2012_val_*")) else ").")
            )
        paths: list[str] = []
        targets: list[int] = []
        for i, wnid in enumerate(wnids):
            files = _list_images(sdir / wnid)
            if not files:
                raise DataError(
                    f"imagenet100: class folder {sdir / wnid}/ holds no image "
                    f"(.JPEG/.jpeg/.jpg/.png); copy that class's images from ImageNet."
                )
            paths.extend(files)
            targets.extend([i] * len(files))
        logger.info("imagenet100 %s: %d images from %s", split, len(paths), sdir)
        splits.append(ImageData(LazyImageFolder(paths, image_size),
                                torch.tensor(targets, dtype=torch.int64)))
    return DatasetSplits(
        name="imagenet100",
        train=splits[0],
        test=splits[1],
        class_names=list(wnids),
        image_size=image_size,
        mean=DATASETS["imagenet100"].mean,
        std=DATASETS["imagenet100"].std,
    )


# --------------------------------------------------------------------------- the registry

# name -> DatasetSpec of every built-in dataset; the one place to add another.
DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec("cifar10", partial(_load_cifar_entry, "cifar10"), "cifar", 32,
                           CIFAR10_MEAN, CIFAR10_STD, 10),
    "cifar100": DatasetSpec("cifar100", partial(_load_cifar_entry, "cifar100"), "cifar", 32,
                            CIFAR100_MEAN, CIFAR100_STD, 100),
    "tinyimagenet": DatasetSpec("tinyimagenet", _load_tiny_entry, "tiny", TINY_IMAGE_SIZE,
                                IMAGENET_MEAN, IMAGENET_STD, 200),
    "imagenet100": DatasetSpec("imagenet100", _load_imagenet100_entry, "imagenet", IMAGENET100_DEFAULT_SIZE,
                               IMAGENET_MEAN, IMAGENET_STD, 100),
}
# the built-in names, in registry order
DATASET_NAMES: tuple[str, ...] = tuple(DATASETS)
