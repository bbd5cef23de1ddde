"""A folder of precomputed probe features, one file per (dataset, split, patches, ...) key.

An entry is `<dataset>_<split>_p<patches>_<sha1 of the key>.pt` holding {"key": JSON of the key,
"features": 2-D floating tensor}, saved with torch.save and read with weights_only=True (characters other
than letters, digits, `.`, `-` and `_` in the dataset name become `_`: every entry lies directly in the
folder). The key stored in the file is compared, the file name is not trusted. A key should name what the
features depend on, the data and the weights included: data_fingerprint digests images and labels (and
evaluate.py's key the model's weights), so data or a checkpoint rewritten in place under the same name gets
new entries. An entry that cannot be used (truncated, garbage,
another format, another key, a tensor of the wrong kind) is recomputed and rewritten with a warning
naming the file: a damaged cache never ends an evaluation. Writes are atomic with unique temporary names
(streaming_ssl/atomic.py), so concurrent evaluations sharing a folder never see half an entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch

from scenarios.datasets import LazyImageFolder
from streaming_ssl.atomic import atomic_write

log = logging.getLogger(__name__)

KEY_FIELDS = ("dataset", "split", "patches")


def entry_path(folder: str | Path, key: dict) -> Path:
    """The file that caches the features of key under folder; key needs KEY_FIELDS and JSON values."""
    missing = [k for k in KEY_FIELDS if k not in key]
    if missing:
        raise ValueError(f"features cache key {key!r} lacks {missing}; give it at least {list(KEY_FIELDS)}")
    digest = hashlib.sha1(_key_json(key).encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", f"{key['dataset']}_{key['split']}_p{key['patches']}")
    return Path(folder) / f"{stem}_{digest}.pt"


def data_fingerprint(*parts: torch.Tensor | LazyImageFolder, mtimes: bool = True) -> str:
    """A digest of the data features are computed from, for a cache key.

    A tensor counts by its dtype, shape and bytes (the images themselves: about a second per GB); a
    LazyImageFolder (images decoded on demand) by its image size and each file's path, size and modification time.
    Without `mtimes`: each file's path below the files' common folder, and size, so that the same files copied
    afresh, at the same place or another (a job staging the data on its node), are the same data.
    """
    digest = hashlib.sha1()
    for part in parts:
        if isinstance(part, LazyImageFolder):
            digest.update(f"lazy {part.image_size} {len(part)}\n".encode())
            paths = part.paths  # a copy of the list: taken once
            base = os.path.commonpath(paths) if paths and not mtimes else None
            for p in paths:
                st = os.stat(p)
                stamp = f"{st.st_size}\0{st.st_mtime_ns}" if mtimes else f"{st.st_size}"
                name = p if base is None else os.path.relpath(p, base)
                digest.update(f"{name}\0{stamp}\n".encode("utf-8", "surrogateescape"))
        elif isinstance(part, torch.Tensor):
            t = part.detach().cpu().contiguous()
            digest.update(f"tensor {t.dtype} {tuple(t.shape)}\n".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
        else:
            raise TypeError(f"data_fingerprint takes tensors and LazyImageFolders, got a {type(part).__name__}")
    return digest.hexdigest()


def _key_json(key: dict) -> str:
    return json.dumps(key, sort_keys=True)


def _read_entry(path: Path, key_json: str) -> tuple[torch.Tensor | None, str]:
    """(features, "") for a usable entry, else (None, why it cannot be used)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zips, garbage bytes and foreign pickles raise several types
        return None, f"unreadable ({type(err).__name__}: {str(err)[:120]})"
    if not isinstance(saved, dict) or not {"key", "features"} <= saved.keys():
        return None, f"not a features-cache entry (a {type(saved).__name__} without 'key' and 'features')"
    if saved["key"] != key_json:
        return None, "stored for another key"
    feats = saved["features"]
    if not isinstance(feats, torch.Tensor) or feats.ndim != 2 or not feats.is_floating_point():
        kind = (f"{feats.dtype} tensor of shape {tuple(feats.shape)}" if isinstance(feats, torch.Tensor)
                else type(feats).__name__)
        return None, f"its features are a {kind}, not a 2-D floating tensor"
    return feats, ""


def cached_features(folder: str | Path | None, key: dict, compute: Callable[..., torch.Tensor], *args,
                    **kwargs) -> torch.Tensor:
    """compute(*args, **kwargs), or the tensor saved under `folder` for exactly this key.

    folder None or "" disables the cache. A missing or unusable entry is computed and (re)written
    atomically; an unusable one also logs a warning naming the file. A failed write (read-only folder,
    full disk) logs a warning and still returns the features.
    """
    if not folder:
        return compute(*args, **kwargs)
    path = entry_path(folder, key)
    key_json = _key_json(key)
    if path.exists():
        feats, why = _read_entry(path, key_json)
        if feats is not None:
            log.info("features from %s", path)
            return feats
        log.warning("features cache entry %s is %s; recomputing and rewriting it", path, why)
    feats = compute(*args, **kwargs)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda fh: torch.save({"key": key_json, "features": feats}, fh))
    except OSError as err:
        log.warning("could not write features cache entry %s (%s); continuing without caching it", path, err)
    return feats
