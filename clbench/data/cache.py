"""An on-disk cache of decoded datasets, keyed by a fingerprint of their source files.

Decoding tens of thousands of JPEGs takes a while, so each file-based loader decodes once
and saves the uint8 tensors with :func:`torch.save` in the cache directory (``cache_dir``,
else ``$CLBENCH_CACHE``, else ``~/.cache/clbench``).  The file name holds the dataset name
and a hash of every source file's absolute path, size and modification time, so changed
or moved data is decoded again.  Nothing is ever written next to the data.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterable

import torch

from clbench.data.types import ImageDataset, ImageSplit

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
        except Exception as err:  # a damaged or foreign file: decode again and overwrite it
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


def _load(path: Path) -> ImageDataset:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return ImageDataset(
        name=state["name"],
        train=ImageSplit(state["train_x"], state["train_y"]),
        test=ImageSplit(state["test_x"], state["test_y"]),
        class_names=tuple(state["class_names"]),
        mean=tuple(state["mean"]),
        std=tuple(state["std"]),
    )
