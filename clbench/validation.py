"""Declarative value checks for config dataclasses, run once a config is loaded.

A config field declares its valid values where it is defined::

    lr: float = bounded(0.05, gt=0)                 # a rate: > 0
    buffer_size: int = bounded(200, ge=0)           # a size: >= 0
    restore_p: float = bounded(0.01, ge=0, le=1)    # a probability
    optimizer: str = choice("sgd", "sgd", "adam", "adamw")
    hidden: List[int] = bounded(default_factory=lambda: [400, 400], ge=1)  # each element

:func:`validate` walks a config object (the dataclass instances ``OmegaConf.to_object``
returns): every float must be finite, every declared range or choice must hold (``None``
always passes: it means "not set"; for a list, each element is checked), then the
dataclass's own ``validate()`` hook runs for rules across fields.  The first problem raises a
:class:`~clbench.registry.ClbenchError` naming the full key (``train.lr must be > 0, got -1``).

This module imports nothing from the rest of clbench but the registry, so every config module
(including :mod:`clbench.logging.config`, which :mod:`clbench.config` imports) can use it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from clbench.registry import ClbenchError, closest

CHECK = "clbench_check"  # dataclasses.field metadata key holding a Check
PATH = "clbench_path"  # metadata key: a file or folder path (relative ones in a YAML are relative to it)


@dataclass(frozen=True)
class Check:
    """The valid values of one config field: a numeric range and/or a set of names."""

    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    choices: Optional[tuple[str, ...]] = None

    def problem(self, value: Any) -> Optional[str]:
        """Why ``value`` is invalid (e.g. ``must be > 0``), or None when it is valid."""
        if value is None:
            return None
        if self.choices is not None:
            if str(value) not in self.choices:
                return f"is not one of {', '.join(self.choices)}.{closest(str(value), list(self.choices))}".rstrip(".")
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        for bound, op, ok in ((self.ge, ">=", lambda v, b: v >= b), (self.gt, ">", lambda v, b: v > b),
                              (self.le, "<=", lambda v, b: v <= b), (self.lt, "<", lambda v, b: v < b)):
            if bound is not None and not ok(value, bound):
                return f"must be {self.describe()}"
        return None

    def describe(self) -> str:
        """The range in words, e.g. ``>= 0 and <= 1``."""
        parts = [f"{op} {_num(b)}" for b, op in ((self.ge, ">="), (self.gt, ">"), (self.le, "<="), (self.lt, "<"))
                 if b is not None]
        return " and ".join(parts)


def bounded(default: Any = dataclasses.MISSING, *, default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
            ge: Optional[float] = None, gt: Optional[float] = None,
            le: Optional[float] = None, lt: Optional[float] = None) -> Any:
    """A dataclass field whose value (or each element of its list) must lie in a range."""
    return field(default=default, default_factory=default_factory,  # type: ignore[call-overload]
                 metadata={CHECK: Check(ge=ge, gt=gt, le=le, lt=lt)})


def choice(default: Any = dataclasses.MISSING, *choices: str,
           default_factory: Callable[[], Any] | Any = dataclasses.MISSING) -> Any:
    """A dataclass field whose value (or each element of its list) must be one of ``choices``."""
    if not choices:
        raise TypeError("choice() needs the valid values")
    return field(default=default, default_factory=default_factory,  # type: ignore[call-overload]
                 metadata={CHECK: Check(choices=tuple(choices))})


def path(default: Optional[str] = None) -> Any:
    """A file or folder path field: a relative path written in a YAML file is taken relative to
    that file's folder (see :func:`clbench.config.load_config`)."""
    return field(default=default, metadata={PATH: True})


def path_fields(config_class: type) -> list[str]:
    """The names of ``config_class``'s path fields."""
    return [f.name for f in dataclasses.fields(config_class) if f.metadata.get(PATH)]


def validate(obj: Any, prefix: str = "") -> None:
    """Check the config object ``obj`` (a dataclass instance) and its nested dataclasses, then
    their ``validate()`` hooks; raise :class:`ClbenchError` naming ``prefix + key`` on the first problem."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            validate(value, key + ".")
            continue
        items = value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if isinstance(item, float) and not math.isfinite(item):
                raise ClbenchError(f"{key} must be a finite number, got {_show(value)}")
        check = f.metadata.get(CHECK)
        if check is not None:
            for item in items:
                why = check.problem(item)
                if why is not None:
                    what = f"{key} '{item}'" if check.choices is not None else f"{key}"
                    got = "" if check.choices is not None else f", got {_show(value)}"
                    raise ClbenchError(f"{what} {why}{got}")
    hook = getattr(obj, "validate", None)
    if callable(hook):
        hook()


def require(ok: bool, message: str) -> None:
    """For ``validate()`` hooks: raise ``ClbenchError(message)`` unless ``ok``."""
    if not ok:
        raise ClbenchError(message)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else str(x)


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)
