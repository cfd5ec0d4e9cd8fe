"""An on-disk cache of decoded datasets, keyed by a fingerprint of their source files.

Decoding tens of thousands of JPEGs takes a while, so each file-based loader decodes once
and saves the uint8 tensors with :func:`torch.save` in the cache directory (``cache_dir``,
else ``$CLBENCH_CACHE``, else ``~/.cache/clbench``).  The file name holds the dataset name
and a hash of every source file's absolute path, size and modification time, so changed
or moved data is decoded again.  Nothing is ever written next to the data.  Cache files are read
with ``weights_only=True`` (no code runs) and checked; a truncated, corrupt or tampered one is
decoded again and overwritten.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterable

import torch

from clbench.data.types import ImageDataset, ImageSplit
from clbench.registry import ClbenchError
from clbench.safe_load import torch_load

CACHE_ENV = "CLBENCH_CACHE"
_FORMAT = 1  # bump when the decoded form of any dataset changes, to invalidate old caches

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$CLBENCH_CACHE`` if set, else ``~/.cache/clbench``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "clbench").expanduser()


def fingerprint(files: Iterable[Path]) -> str:
    """A short hash of the files' absolute paths, sizes and modification times (contents are not read)."""
    digest = hashlib.sha256(f"clbench-cache-v{_FORMAT}".encode())
    for path in sorted(os.path.abspath(f) for f in files):
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def cached_dataset(
    name: str, files: Iterable[Path], cache_dir: str | os.PathLike | None, build: Callable[[], ImageDataset]
) -> ImageDataset:
    """Load ``name`` decoded from ``files`` from the cache, or ``build()`` it and cache the result."""
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = directory / f"{name}-{fingerprint(files)}.pt"
    if path.is_file():
        try:
            return _load(path)
        except ClbenchError as err:  # a damaged, truncated or tampered file: decode again and overwrite it
            warnings.warn(f"ignoring unreadable dataset cache {path}: {err}", stacklevel=2)
    log.info("decoding dataset %s (done once; cached as %s)", name, path)
    dataset = build()
    try:
        _save(dataset, path)
    except OSError as err:
        warnings.warn(f"could not write dataset cache {path}: {err}", stacklevel=2)
    return dataset


def _save(dataset: ImageDataset, path: Path) -> None:
    """Write atomically: a temporary file in the same folder, then :func:`os.replace`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "name": dataset.name,
        "train_x": dataset.train.x,
        "train_y": dataset.train.y,
        "test_x": dataset.test.x,
        "test_y": dataset.test.y,
        "class_names": list(dataset.class_names),
        "mean": list(dataset.mean),
        "std": list(dataset.std),
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


_STATE_KEYS = frozenset({"name", "train_x", "train_y", "test_x", "test_y", "class_names", "mean", "std"})


def _load(path: Path) -> ImageDataset:
    """A cache file read with ``weights_only=True`` (no code runs) and checked to be what :func:`_save`
    writes; anything else (truncated, corrupt, tampered) is a ClbenchError, and the caller rebuilds."""
    state = torch_load(path, "dataset cache")
    if not isinstance(state, dict) or set(state) != _STATE_KEYS:
        keys = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise ClbenchError(f"dataset cache {path}: not a clbench dataset cache (holds {keys})")
    names, stats = state["class_names"], (state["mean"], state["std"])
    if not isinstance(state["name"], str) or not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ClbenchError(f"dataset cache {path}: name or class_names are not strings")
    if not all(isinstance(s, list) and all(type(v) in (float, int) and math.isfinite(v) for v in s) for s in stats):
        raise ClbenchError(f"dataset cache {path}: mean/std are not lists of finite floats")
    for key in ("train_x", "train_y", "test_x", "test_y"):
        if not isinstance(state[key], torch.Tensor):
            raise ClbenchError(f"dataset cache {path}: {key} is not a tensor")
    try:
        dataset = ImageDataset(
            name=state["name"],
            train=ImageSplit(state["train_x"], state["train_y"]),
            test=ImageSplit(state["test_x"], state["test_y"]),
            class_names=tuple(names),
            mean=tuple(state["mean"]),
            std=tuple(state["std"]),
        )
    except ValueError as err:
        raise ClbenchError(f"dataset cache {path}: {err}") from None
    for split in (dataset.train, dataset.test):
        if len(split) and not (0 <= int(split.y.min()) and int(split.y.max()) < len(names)):
            raise ClbenchError(f"dataset cache {path}: labels outside 0..{len(names) - 1}")
    return dataset
