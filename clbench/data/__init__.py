"""Datasets as uint8 image tensors (see :mod:`clbench.data.types`) and their loaders."""

from clbench.data.types import ImageDataset, ImageSplit

__all__ = ["ImageDataset", "ImageSplit", "load_dataset"]


def load_dataset(name: str, root: str | None = None, cache_dir: str | None = None) -> ImageDataset:
    """Load a registered dataset by name (see ``clbench list``)."""
    from clbench.registry import DATASETS

    entry = DATASETS.get(name)
    return entry.obj(root=root, cache_dir=cache_dir)
