"""One registry mechanism for strategies, scenarios, datasets and models.

A component registers itself with a decorator next to its typed config dataclass::

    @register_strategy("ewc", config=EWCConfig)
    class EWC(Strategy): ...

Built-in components live in the packages named by ``builtin_modules``; third-party
packages add theirs through the entry-point groups ``clbench.strategies`` and
``clbench.scenarios`` (the entry point's value is a module or object to import; importing
it runs its ``@register_*`` decorators).  Lookups of unknown names raise
:class:`UnknownNameError`, which lists the valid names and suggests the closest one.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from dataclasses import dataclass, is_dataclass
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class ClbenchError(Exception):
    """Base class of errors a user can act on (bad config, missing data, NaN loss...)."""


class UnknownNameError(ClbenchError, KeyError):
    """An unknown registry name; the message lists the valid ones and the closest match."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def closest(name: str, valid: list[str]) -> str:
    """' Did you mean X?' for the closest valid name, or '' when nothing is close."""
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered component: the object, its config dataclass and a one-line description."""

    name: str
    obj: T
    config: type | None
    description: str


class Registry(Generic[T]):
    """A name -> component mapping that loads built-ins and entry points on first lookup."""

    def __init__(self, kind: str, builtin_modules: tuple[str, ...] = (), entry_point_group: str | None = None):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        self._builtin_modules = builtin_modules
        self._entry_point_group = entry_point_group
        self._loaded = False

    def register(self, name: str, config: type | None = None, description: str | None = None) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name`` with its config dataclass."""
        if config is not None and not is_dataclass(config):
            raise TypeError(f"{self.kind} '{name}': config must be a dataclass, got {config!r}")

        def decorator(obj: T) -> T:
            existing = self._entries.get(name)
            if existing is not None and existing.obj is not obj and _qualname(existing.obj) != _qualname(obj):
                raise ValueError(f"{self.kind} '{name}' is already registered by {_qualname(existing.obj)}")
            doc = description or _first_line(getattr(obj, "__doc__", None)) or ""
            self._entries[name] = Entry(name=name, obj=obj, config=config, description=doc)
            return obj

        return decorator

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for module_name in self._builtin_modules:
            module = importlib.import_module(module_name)
            for info in pkgutil.iter_modules(getattr(module, "__path__", [])):
                if not info.name.startswith("_"):
                    importlib.import_module(f"{module_name}.{info.name}")
        if self._entry_point_group:
            from importlib.metadata import entry_points

            for ep in entry_points(group=self._entry_point_group):
                try:
                    ep.load()
                except Exception as err:  # a broken plug-in must not hide the built-ins
                    import warnings

                    warnings.warn(f"could not load {self.kind} plug-in '{ep.name}' ({ep.value}): {err}", stacklevel=2)

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        self._load()
        return [self._entries[n] for n in sorted(self._entries)]

    def get(self, name: str) -> Entry[T]:
        self._load()
        if name not in self._entries:
            valid = sorted(self._entries)
            raise UnknownNameError(
                f"unknown {self.kind} '{name}'.{closest(name, valid)} Valid {self.kind[:-1] + 'ies' if self.kind.endswith('y') else self.kind + 's'}: {', '.join(valid)}"
            )
        return self._entries[name]

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries


def _first_line(doc: str | None) -> str:
    return doc.strip().splitlines()[0].strip() if doc and doc.strip() else ""


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


STRATEGIES: Registry[Any] = Registry("strategy", ("clbench.strategies",), "clbench.strategies")
SCENARIOS: Registry[Any] = Registry("scenario", ("clbench.scenarios",), "clbench.scenarios")
DATASETS: Registry[Any] = Registry("dataset", ("clbench.data.datasets",))
MODELS: Registry[Any] = Registry("model", ("clbench.models",))

register_strategy = STRATEGIES.register
register_scenario = SCENARIOS.register
register_dataset = DATASETS.register
register_model = MODELS.register
