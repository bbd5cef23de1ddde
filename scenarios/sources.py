"""Any image folder or .npz file as a dataset: the generic sources ``folder:PATH`` and ``npz:PATH``.

They are accepted wherever a dataset is named (``data.dataset``, ``eval.transfer``, ``evaluate.py
--dataset/--transfer``) and end in :func:`scenarios.datasets.load_dataset`. A relative PATH is relative
to the current directory; a leading ``~`` expands; a loaded config holds it absolute (so does the run's
saved config.yaml and checkpoint). Logs and metrics use a readable name: the folder's
name (``folder:/data/svhn`` -> ``svhn``) or the file's stem (``npz:/data/digits.npz`` -> ``digits``).

Layouts:

* ``folder:ROOT`` -- ``ROOT/train/<class>/*`` and ``ROOT/test/<class>/*`` (or ``ROOT/val/<class>/*``;
  ``test/`` wins when both exist). Images are JPEG, PNG or WebP (what torchvision decodes; a 16-bit PNG
  keeps its high byte, ``v >> 8``); hidden files and folders (``.DS_Store``, macOS ``._*``) are skipped.
  Class ids follow the sorted folder names of ``train/``; a test class must be one of them.
* ``npz:FILE`` -- ``x_train``, ``y_train``, ``x_test``, ``y_test`` as in shared/data/README.md, uint8
  images ``(N, H, W, C)`` with C 1, 3 (or 4: alpha dropped) or ``(N, H, W)`` grayscale; optional
  ``class_names`` (str or bytes; else the classes are ``0..max(y_train)``) and optional ``mean``/``std``
  (3 values each in [0, 1]) which are then used instead of computed statistics. Both splits must hold
  images, and every class training images.

Either source: a class without test images only logs a warning (accuracies on it are undefined, NaN).

Images become RGB (grayscale replicated, alpha dropped) uint8 ``(N, 3, S, S)``. With ``image_size``
given (build passes the in-domain dataset's size for transfer targets) every image has its shorter
side resized to S with :func:`scenarios.datasets.resize_uint8` (the whole-image probes' own resize)
and is center-cropped, as ImageNet-100 is. Without it, S is the images' own shorter side: every image
must then have the size of the first training image (else a DataError asks for ``image_size``).

The model stem of a generic source follows the side the encoder receives
(:func:`scenarios.datasets.stem_for_size`: <= 32 cifar, <= 64 tiny, else imagenet).

Normalisation statistics (per-channel mean and std in [0, 1]) are computed once from the training
split (a lazy folder: a seeded sample of :data:`STATS_SAMPLE` images) and cached in JSON, keyed on
the path, a fingerprint of the training data (size and mtime of the files) and the image size:
beside the data (``ROOT/.streaming_ssl_stats.json``, ``.FILE.npz.streaming_ssl_stats.json``) when
that folder is writable, else in ``$STREAMING_SSL_CACHE`` (default ``~/.cache/streaming_ssl``).

Small sources are held in memory as uint8 tensors; a folder of more than
:data:`MAX_IN_MEMORY_IMAGES` images or :data:`MAX_IN_MEMORY_BYTES` decoded bytes is decoded lazily
(:class:`scenarios.datasets.LazyImageFolder`) and needs ``image_size``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from scenarios.datasets import (
    IMAGE_EXTENSIONS,
    DataError,
    DatasetSplits,
    ImageData,
    LazyImageFolder,
    _check_labels,
    _decode_many,
    _decode_rgb,
    _list_images,
    _positive_size,
    _resize_center_crop,
    _to_str,
    dataset_spec,
    read_npz_arrays,
)

__all__ = [
    "CACHE_ENV_VAR",
    "MAX_IN_MEMORY_BYTES",
    "MAX_IN_MEMORY_IMAGES",
    "STATS_SAMPLE",
    "SourceRef",
    "cache_dir",
    "cached_stats",
    "channel_stats",
    "is_generic",
    "load_source",
    "parse_source",
]

logger = logging.getLogger(__name__)

KINDS = ("folder", "npz")
CACHE_ENV_VAR = "STREAMING_SSL_CACHE"
MAX_IN_MEMORY_IMAGES = 20_000  # more images than this (train + test): decoded lazily
MAX_IN_MEMORY_BYTES = 4 * 1024**3  # or more decoded uint8 bytes than this
STATS_SAMPLE = 10_000  # a lazy folder's statistics come from this many seeded training images
STATS_CACHE_VERSION = 1
STATS_FILE = ".streaming_ssl_stats.json"
_CHUNK = 256  # images per resize / statistics step

_NPZ_REQUIRED = ("x_train", "y_train", "x_test", "y_test")
_NPZ_OPTIONAL = ("class_names", "mean", "std")
_NPZ_FIX = (
    "an npz source holds x_train, y_train, x_test, y_test (uint8 images (N, H, W, C) or (N, H, W), "
    "integer labels) and optionally class_names, mean, std, as in shared/data/README.md; re-create it "
    "with numpy.savez."
)
_NPZ_HELP = _NPZ_FIX[0].upper() + _NPZ_FIX[1:]  # the same, as a sentence of its own (after a full stop)

Stats = tuple[tuple[float, float, float], tuple[float, float, float]]


@dataclass(frozen=True)
class SourceRef:
    """A parsed ``folder:PATH`` / ``npz:PATH``: its kind and absolute path."""

    kind: str
    path: pathlib.Path

    @property
    def name(self) -> str:
        """Readable name for logs and metrics: the folder's name, or the file's stem."""
        return self.path.stem if self.kind == "npz" else self.path.name


def is_generic(name: str) -> bool:
    """Whether ``name`` is spelled as a generic source (``folder:...`` or ``npz:...``)."""
    kind, sep, _ = str(name).strip().partition(":")
    return bool(sep) and kind.lower() in KINDS


def short_name(name: str) -> str:
    """The name a dataset's results are reported under (its DatasetSplits.name), from its spelling alone: a
    built-in name's registry key, a folder's name, an .npz file's stem. No file is read.

    Raises:
        DataError: an unknown built-in name, or a generic spelling without a path.
    """
    return parse_source(name).name if is_generic(name) else dataset_spec(name).name


def parse_source(name: str) -> SourceRef:
    """Parse ``folder:PATH`` / ``npz:PATH`` (no file is touched); ``~`` expands, relative -> cwd.

    Raises:
        DataError: not a generic spelling, or no path after the colon.
    """
    kind, sep, raw = str(name).strip().partition(":")
    kind = kind.lower()
    if not sep or kind not in KINDS:
        raise DataError(f"{name!r} is not a generic source; write folder:PATH or npz:PATH.")
    raw = raw.strip()
    if not raw:
        example = "/data/svhn" if kind == "folder" else "/data/digits.npz"
        raise DataError(f"{name!r} names no path; write {kind}:PATH, e.g. {kind}:{example}.")
    path = pathlib.Path(os.path.normpath(pathlib.Path(raw).expanduser().absolute()))
    return SourceRef(kind=kind, path=path)


def load_source(ref: SourceRef, *, image_size: int | None = None) -> DatasetSplits:
    """Load a generic source as :class:`DatasetSplits` named ``ref.name`` (see the module docstring).

    Args:
        ref: from :func:`parse_source`.
        image_size: side of the returned square images; ``None``: the images' own (shorter) side.

    Raises:
        DataError: missing or malformed data; the message names the file or folder and the fix.
    """
    size = None if image_size is None else _positive_size(f"{ref.kind}:{ref.path}", image_size)
    if ref.kind == "npz":
        return _load_npz(ref, size)
    return _load_folder(ref, size)


# --------------------------------------------------------------------------- statistics and their cache


def channel_stats(images: torch.Tensor | LazyImageFolder, *, max_images: int = STATS_SAMPLE) -> Stats:
    """Per-channel mean and (population) std in [0, 1] of uint8 ``(N, 3, H, W)`` images.

    A tensor: all of it. A :class:`LazyImageFolder` with more than ``max_images`` images: a sample
    of that many, drawn with a fixed seed.
    """
    n = len(images)
    if n == 0:
        raise DataError("cannot compute normalisation statistics of an empty training split")
    index = torch.arange(n)
    if isinstance(images, LazyImageFolder) and n > max_images:
        index = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:max_images].sort().values
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    count = 0
    for start in range(0, len(index), _CHUNK):
        x = images[index[start:start + _CHUNK]].to(torch.float64).div_(255.0)
        total += x.sum(dim=(0, 2, 3))
        squares += x.square().sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0.0).sqrt()
    return _triple(mean.tolist()), _triple(std.tolist())


def cache_dir() -> pathlib.Path:
    """``$STREAMING_SSL_CACHE``, else ``$XDG_CACHE_HOME/streaming_ssl``, else ``~/.cache/streaming_ssl``."""
    env = os.environ.get(CACHE_ENV_VAR, "")
    if env:
        return pathlib.Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "streaming_ssl"


def _cache_files(ref: SourceRef) -> list[pathlib.Path]:
    """Where a source's statistics are cached: beside the data, then in :func:`cache_dir`."""
    beside = ref.path / STATS_FILE if ref.kind == "folder" else ref.path.with_name(f".{ref.path.name}{STATS_FILE}")
    digest = hashlib.sha1(str(ref.path).encode("utf-8")).hexdigest()[:16]
    return [beside, cache_dir() / f"stats-{ref.kind}-{ref.name}-{digest}.json"]


def _read_cache(file: pathlib.Path, ref: SourceRef, fingerprint: str) -> dict:
    """The entries of a cache file that matches ``ref`` and ``fingerprint`` ({} otherwise)."""
    try:
        blob = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.warning("%s: ignoring unreadable statistics cache %s (%s)", ref.name, file, exc)
        return {}
    ok = (isinstance(blob, dict) and blob.get("version") == STATS_CACHE_VERSION
          and blob.get("path") == str(ref.path) and blob.get("fingerprint") == fingerprint
          and isinstance(blob.get("stats"), dict))
    return blob["stats"] if ok else {}


def _write_cache(ref: SourceRef, fingerprint: str, entries: dict) -> None:
    """Write the statistics beside the data, or in :func:`cache_dir` if that fails; never raises."""
    blob = {"version": STATS_CACHE_VERSION, "path": str(ref.path), "fingerprint": fingerprint, "stats": entries}
    for file in _cache_files(ref):
        tmp = file.with_name(f"{file.name}.tmp{os.getpid()}")
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(blob, indent=1), encoding="utf-8")
            os.replace(tmp, file)
        except OSError as exc:
            logger.info("%s: cannot cache statistics at %s (%s)", ref.name, file, exc)
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            continue
        logger.info("%s: cached normalisation statistics at %s", ref.name, file)
        return
    logger.warning("%s: normalisation statistics not cached (no writable place); set $%s", ref.name, CACHE_ENV_VAR)


def cached_stats(ref: SourceRef, fingerprint: str, image_size: int, train: torch.Tensor | LazyImageFolder) -> Stats:
    """The training split's statistics at ``image_size``: from the cache, else computed and cached."""
    key = str(image_size)
    for file in _cache_files(ref):
        entry = _read_cache(file, ref, fingerprint).get(key)
        if isinstance(entry, dict):
            try:
                stats = _triple(entry["mean"]), _triple(entry["std"])
            except (KeyError, TypeError, ValueError):
                continue
            logger.info("%s: normalisation statistics from %s", ref.name, file)
            return stats
    mean, std = channel_stats(train)
    logger.info("%s: normalisation statistics mean %s std %s", ref.name, _fmt(mean), _fmt(std))
    entries = _read_cache(_cache_files(ref)[0], ref, fingerprint)
    entries[key] = {"mean": list(mean), "std": list(std)}
    _write_cache(ref, fingerprint, entries)
    return mean, std


def _triple(values: object) -> tuple[float, float, float]:
    """Three finite floats (a cached or given mean/std)."""
    out = tuple(float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1))
    if len(out) != 3 or not all(np.isfinite(out)):
        raise ValueError(f"expected 3 finite values, got {values!r}")
    return out  # type: ignore[return-value]


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"


# --------------------------------------------------------------------------- npz


def _load_npz(ref: SourceRef, image_size: int | None) -> DatasetSplits:
    """An .npz source (module docstring), in memory."""
    path = ref.path
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise DataError(f"npz source {path} {what}; give the path of an .npz file, e.g. npz:/data/digits.npz. "
                        f"{_NPZ_HELP}")
    arrays = read_npz_arrays(path, _NPZ_REQUIRED, _NPZ_OPTIONAL, fix=_NPZ_FIX)
    x_train = _npz_images(arrays["x_train"], f"{path} key x_train")
    x_test = _npz_images(arrays["x_test"], f"{path} key x_test")
    if len(x_train) == 0:
        raise DataError(f"npz source {path}: key x_train holds no image; an npz source needs training images. "
                        f"{_NPZ_HELP}")
    if len(x_test) == 0:
        raise DataError(
            f"npz source {path}: key x_test holds no image; every evaluation probes the test split, so add test "
            f"images (x_test, y_test), e.g. held out from the training images. {_NPZ_HELP}"
        )
    if x_train.shape[-2:] != x_test.shape[-2:] and image_size is None:
        raise DataError(
            f"{path}: x_train images are {tuple(x_train.shape[-2:])} but x_test images {tuple(x_test.shape[-2:])}; "
            f"set data.image_size (image_size=...) to the side to resize both to."
        )
    names, num_classes = _npz_classes(arrays, path)
    how = "class_names" if "class_names" in arrays else "max(y_train) + 1"
    y_train = _npz_labels(arrays, "y_train", len(x_train), names, how, path)
    y_test = _npz_labels(arrays, "y_test", len(x_test), names, how, path)
    _check_npz_class_counts(path, names, how, y_train, y_test)
    size = image_size or min(int(x_train.shape[-2]), int(x_train.shape[-1]))
    x_train, x_test = _fit(x_train, size), _fit(x_test, size)
    if "mean" in arrays and "std" in arrays:
        stats = _given_stats(arrays, path)
    else:
        stat = path.stat()
        stats = cached_stats(ref, f"npz:{stat.st_size}:{stat.st_mtime_ns}", size, x_train)
    logger.info("%s: %d train, %d test images of %dx%d, %d classes, from %s",
                ref.name, len(x_train), len(x_test), size, size, num_classes, path)
    return DatasetSplits(name=ref.name, train=ImageData(x_train, y_train), test=ImageData(x_test, y_test),
                         class_names=names, image_size=size, mean=stats[0], std=stats[1])


def _npz_images(x: np.ndarray, where: str) -> torch.Tensor:
    """uint8 ``(N, H, W)`` or ``(N, H, W, C)`` (C 1, 3 or 4) -> contiguous RGB ``(N, 3, H, W)``."""
    if x.dtype != np.uint8:
        raise DataError(f"{where} has dtype {x.dtype}; images must be uint8 0..255. {_to_uint8(x)} {_NPZ_HELP}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise DataError(
            f"{where} has shape {tuple(x.shape)}; expected (N, H, W, C) with C 1 or 3 (channels last) or "
            f"(N, H, W) grayscale. {_NPZ_HELP}"
        )
    images = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)[:, :3]
    return images.expand(-1, 3, -1, -1).contiguous()


def _to_uint8(x: np.ndarray) -> str:
    """How to convert images of another dtype to uint8 0..255, judged by the range of their values."""
    floating = np.issubdtype(x.dtype, np.floating)
    values = x[np.isfinite(x)] if floating else x
    if not (floating or np.issubdtype(x.dtype, np.integer)) or values.size == 0:  # bool, complex, str, ...
        return "Store the pixel values as numpy.uint8 (0 black, 255 white) with numpy.savez."
    lo, hi = values.min().item(), values.max().item()
    found = f"Its values lie in [{lo:g}, {hi:g}]" if floating else f"Its values lie in [{lo}, {hi}]"
    if values.size < x.size:
        found = f"It holds NaN or infinite values (replace them first); its other values lie in [{lo:g}, {hi:g}]"
    stretch = "((x - x.min()) * 255.0 / (x.max() - x.min())).round().astype(numpy.uint8)"
    if lo < 0:
        if floating and lo >= -1 and hi <= 1:
            return f"{found} (normalised to [-1, 1]?): convert with ((x + 1) * 127.5).round().astype(numpy.uint8)."
        return (f"{found}, below 0 (normalised with a mean and std?): undo that (x * std + mean) or scale them to "
                f"0..255, e.g. {stretch}.")
    if floating and hi <= 1:
        return f"{found}, so they are fractions of full intensity: convert with (x * 255).round().astype(numpy.uint8)."
    if hi <= 255:
        convert = "x.round().clip(0, 255).astype(numpy.uint8)" if floating else "x.astype(numpy.uint8)"
        return f"{found}, so they are 0..255 pixel values already: convert with {convert}."
    if hi <= 65535:
        return (f"{found}, beyond 0..255: if they are 16-bit pixels (0..65535), convert with "
                f"(x // 257).astype(numpy.uint8); for another range scale them to 0..255, e.g. {stretch}.")
    return f"{found}, beyond 0..255: scale them to 0..255, e.g. {stretch}."


def _npz_labels(arrays: dict[str, np.ndarray], key: str, n: int, names: list[str], how: str,
                path: pathlib.Path) -> torch.Tensor:
    """The labels of one split, checked against its images (``n``) and the classes (``names``, from ``how``)."""
    y = np.asarray(arrays[key])
    flat = y[:, 0] if y.ndim == 2 and y.shape[1] == 1 else y
    images = "x" + key[1:]
    if flat.ndim == 1 and np.issubdtype(flat.dtype, np.integer):
        if len(flat) != n:
            raise DataError(f"{path}: {key} has {len(flat)} labels but {images} holds {n} images; give one label per "
                            f"image (label i is the class of image i). {_NPZ_HELP}")
        if how == "class_names" and flat.size and int(flat.max()) >= len(names):
            raise DataError(f"{path}: {key} has labels up to {int(flat.max())} but class_names lists {len(names)} "
                            f"names (0..{len(names) - 1}): add the missing names to class_names or fix the labels.")
    return _check_labels(y, n, len(names), f"{path} key {key} ({how} classes)")


def _npz_classes(arrays: dict[str, np.ndarray], path: pathlib.Path) -> tuple[list[str], int]:
    """Class names and count: ``class_names`` when present, else ``0..max(y_train)``."""
    if "class_names" in arrays:
        names = [_to_str(n) for n in np.asarray(arrays["class_names"]).reshape(-1).tolist()]
        if not names:
            raise DataError(f"{path} key class_names is empty; list one name per class or drop the key.")
        return names, len(names)
    y = np.asarray(arrays["y_train"])
    if y.size == 0:
        raise DataError(f"{path} key y_train is empty: an npz source needs training images. {_NPZ_HELP}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path} key y_train has dtype {y.dtype}; labels must be integers 0..C-1. {_NPZ_HELP}")
    count = max(int(y.max()) + 1, 1)
    return [str(i) for i in range(count)], count


def _check_npz_class_counts(path: pathlib.Path, names: list[str], how: str, y_train: torch.Tensor,
                            y_test: torch.Tensor) -> None:
    """Every class needs training images (else a DataError); a class without test images is warned about."""
    empty = _missing_classes(y_train, names)
    if empty:
        trim = ("; and keep class_names = class_names[classes], or remove the names of the empty classes from "
                "class_names" if how == "class_names" else
                " (without class_names the classes are 0..max(y_train), so labels with gaps leave classes empty)")
        raise DataError(
            f"npz source {path}: class(es) {_listed(empty, names)} of the {len(names)} ({how}) have no training "
            f"image, and every class needs training images (class-incremental experiences are cut by class). Remap "
            f"the labels to 0..C-1 with `classes, y_train = numpy.unique(y_train, return_inverse=True)` and "
            f"`y_test = numpy.searchsorted(classes, y_test)`{trim}."
        )
    _warn_untested(f"npz source {path}", _missing_classes(y_test, names), names)


def _missing_classes(targets: torch.Tensor, names: list[str]) -> list[int]:
    """The class ids in ``0..len(names)-1`` that no entry of ``targets`` holds."""
    return torch.bincount(targets, minlength=len(names)).eq(0).nonzero().flatten().tolist()


def _listed(ids: list[int], names: list[str]) -> str:
    """``ids`` for a message, with their names where these are not the ids themselves (at most 10)."""
    shown = [str(i) if names[i] == str(i) else f"{i} ({names[i]!r})" for i in ids[:10]]
    return ", ".join(shown) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")


def _warn_untested(where: str, untested: list[int], names: list[str]) -> None:
    """Log that the classes ``untested`` have no test image: accuracies on them are undefined (not an error)."""
    if untested:
        logger.warning(
            "%s: class(es) %s have no test image: the accuracy on an experience holding only such classes is "
            "undefined (NaN), and so are the average accuracy and forgetting that include it; add test images of "
            "those classes if that is not intended", where, _listed(untested, names))


def _given_stats(arrays: dict[str, np.ndarray], path: pathlib.Path) -> Stats:
    """The ``mean``/``std`` keys of an npz: 3 values each, mean in [0, 1], std > 0."""
    try:
        mean, std = _triple(arrays["mean"]), _triple(arrays["std"])
    except ValueError as exc:
        raise DataError(f"{path} keys mean/std: {exc}; give 3 per-channel values in [0, 1] each, or drop them.") from exc
    if not all(0 <= m <= 1 for m in mean) or not all(s > 0 for s in std):
        raise DataError(f"{path} keys mean/std are {mean} / {std}; mean must be in [0, 1] and std > 0 (pixels in [0, 1]).")
    return mean, std


def _fit(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side of same-sized uint8 images to ``size`` and center-crop, in chunks."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8)
    for start in range(0, len(images), _CHUNK):
        out[start:start + _CHUNK] = _resize_center_crop(images[start:start + _CHUNK], size)
    return out


# --------------------------------------------------------------------------- folder


@dataclass
class _FolderFiles:
    """The image files of a folder source, by split, with their class ids."""

    classes: list[str]
    train_paths: list[str]
    train_targets: list[int]
    test_paths: list[str]
    test_targets: list[int]


def _load_folder(ref: SourceRef, image_size: int | None) -> DatasetSplits:
    """A folder source (module docstring): in memory, or lazy when large."""
    files = _scan_folder(ref.path)
    n = len(files.train_paths) + len(files.test_paths)
    first = files.train_paths[0]
    reference = None
    size = image_size
    if size is None:
        img = _decode_rgb(first)
        reference = (first, int(img.shape[-2]), int(img.shape[-1]))
        size = min(reference[1:])
    decoded_bytes = n * 3 * size * size
    lazy = n > MAX_IN_MEMORY_IMAGES or decoded_bytes > MAX_IN_MEMORY_BYTES
    if lazy and image_size is None:
        raise DataError(
            f"folder source {ref.path} holds {n} images ({decoded_bytes / 2**30:.1f} GiB decoded), more than "
            f"are kept in memory ({MAX_IN_MEMORY_IMAGES} images or {MAX_IN_MEMORY_BYTES / 2**30:.0f} GiB), so "
            f"they are read lazily and their sizes are not checked: set data.image_size (image_size=...)."
        )
    train_targets = torch.tensor(files.train_targets, dtype=torch.int64)
    test_targets = torch.tensor(files.test_targets, dtype=torch.int64)
    if lazy:
        train_images: torch.Tensor | LazyImageFolder = LazyImageFolder(files.train_paths, size)
        test_images: torch.Tensor | LazyImageFolder = LazyImageFolder(files.test_paths, size)
    else:
        train_images = _decode_many(files.train_paths, size, f"{ref.name} train", same_size_as=reference)
        test_images = _decode_many(files.test_paths, size, f"{ref.name} test", same_size_as=reference)
    mean, std = cached_stats(ref, _folder_fingerprint(files.train_paths), size, train_images)
    logger.info("%s: %d train, %d test images of %dx%d (%s), %d classes, from %s", ref.name,
                len(train_targets), len(test_targets), size, size, "lazy" if lazy else "in memory",
                len(files.classes), ref.path)
    return DatasetSplits(name=ref.name, train=ImageData(train_images, train_targets),
                         test=ImageData(test_images, test_targets), class_names=list(files.classes),
                         image_size=size, mean=mean, std=std)


def _scan_folder(root: pathlib.Path) -> _FolderFiles:
    """List ``root/train/<class>/`` and ``root/test/<class>/`` (or ``val/``), checking the layout."""
    layout = f"put the training images in {root}/train/<class>/ and the test images in {root}/test/<class>/ (or val/)"
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DataError(f"folder source {root} {what}; give an image folder, e.g. folder:/data/svhn, and {layout}.")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"folder source {root}: {train_dir}/ is missing; {layout}.")
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if test_dir is None:
        raise DataError(f"folder source {root}: neither {root}/test/ nor {root}/val/ exists; {layout}.")
    classes = _class_dirs(train_dir)
    if not classes:
        raise DataError(f"folder source {root}: {train_dir}/ holds no class folder; {layout}.")
    test_classes = _class_dirs(test_dir)
    extra = [c for c in test_classes if c not in set(classes)]
    if extra:
        raise DataError(
            f"folder source {root}: {test_dir}/ has class folder(s) {', '.join(extra[:5])} that {train_dir}/ "
            f"lacks; add training images in {train_dir}/{extra[0]}/ or remove {test_dir}/{extra[0]}/."
        )
    index = {c: i for i, c in enumerate(classes)}
    train_paths, train_targets = _files_by_class(train_dir, classes, index)
    test_paths, test_targets = _files_by_class(test_dir, test_classes, index)
    if not test_paths:
        raise DataError(f"folder source {root}: {test_dir}/ holds no class folder; {layout}.")
    _warn_untested(f"folder source {root} ({test_dir}/)", [index[c] for c in classes if c not in set(test_classes)],
                   classes)
    return _FolderFiles(classes, train_paths, train_targets, test_paths, test_targets)


def _class_dirs(split_dir: pathlib.Path) -> list[str]:
    """Sorted names of the sub-folders of ``split_dir`` (hidden ones skipped)."""
    with os.scandir(split_dir) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def _files_by_class(split_dir: pathlib.Path, present: list[str], index: dict[str, int]) -> tuple[list[str], list[int]]:
    """The image files of each class folder in ``present``, with class ids from ``index``."""
    paths: list[str] = []
    targets: list[int] = []
    for name in present:
        folder = split_dir / name
        files = _list_images(folder)
        if not files:
            with os.scandir(folder) as it:
                entries = [e for e in it if not e.name.startswith(".")]
            others = Counter(os.path.splitext(e.name)[1].lower() or e.name for e in entries if e.is_file())
            subfolders = sorted(e.name for e in entries if e.is_dir())
            found = f"; it holds {', '.join(f'{k} ({v})' for k, v in others.most_common(3))}" if others else ""
            if subfolders:
                found += (f"; its subfolders ({', '.join(subfolders[:3])}{', ...' if len(subfolders) > 3 else ''})"
                          " are not read: a class's images lie directly in its folder, so move them up")
            raise DataError(
                f"class folder {folder}/ is empty: no {'/'.join(sorted(IMAGE_EXTENSIONS))} image{found}. Add "
                f"its images (convert other formats to PNG) or remove the folder."
            )
        paths.extend(files)
        targets.extend([index[name]] * len(files))
    return paths, targets


def _folder_fingerprint(paths: list[str]) -> str:
    """A digest of the training files' names, sizes and modification times."""
    digest = hashlib.sha1()
    for p in paths:
        st = os.stat(p)
        digest.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return f"folder:{len(paths)}:{digest.hexdigest()}"
