"""Conversions shared by the loggers: JSON-safe values, flat keys and numeric scalars."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any


def to_jsonable(obj: Any) -> Any:
    """``obj`` with every value JSON can encode: numpy/torch scalars and arrays become
    Python numbers and lists, tuples and sets lists, paths strings, dataclasses dicts,
    mapping keys strings; anything else unknown becomes ``str(obj)``."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((to_jsonable(v) for v in obj), key=repr)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if hasattr(obj, "tolist"):  # numpy scalars and arrays, torch tensors
        return to_jsonable(obj.tolist())
    return str(obj)


def flatten(tree: Mapping[str, Any], sep: str = "/", prefix: str = "") -> dict[str, Any]:
    """Nested mappings flattened to ``{"a<sep>b": leaf}``; other values (lists too) are leaves."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, sep, name))
        else:
            flat[name] = value
    return flat


def as_scalar(value: Any) -> float | None:
    """``value`` as a float when it is a real number (numpy/torch scalars
    included), else None. Strings and booleans are not scalars."""
    if isinstance(value, (str, bytes, bool)) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: multi-element tensor
        return None

