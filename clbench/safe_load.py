"""Readers for files from disk that never run code: nothing loaded by clbench can execute.

* :func:`load_data_pickle` reads a data pickle (CIFAR's python batches) with a restricted
  unpickler that builds only dicts, lists, tuples, str, bytes, numbers and numpy arrays;
  any other global (``os.system``, ``builtins.eval``, a class, ...) is refused.
* :func:`torch_load` reads a torch file with ``weights_only=True`` (tensors and plain
  containers only) and :func:`load_safetensors` a ``.safetensors`` file;
  :func:`weights_only_loads` forces ``weights_only=True`` on third-party loads (timm's hub).

Every failure is one :class:`~clbench.registry.ClbenchError` line naming the file and the
problem (refused global, truncated or corrupt file), never torch's advice to set
``weights_only=False``.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import zipfile
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np
import torch

from clbench.registry import ClbenchError

__all__ = ["load_data_pickle", "torch_load", "load_problem", "weights_only_loads", "load_safetensors",
           "tensor_state_dict"]


# ----------------------------------------------------------------------------- restricted unpickler
def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for ``bytes`` (``encode(str, 'latin1')``) only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not a bytes literal")
    return text.encode("latin1")


# numpy's own reconstructors, found through its reductions so that no deprecated alias is imported
_RECONSTRUCT = np.zeros(1).__reduce__()[0]  # numpy(._)core.multiarray._reconstruct
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]  # numpy(._)core.numeric._frombuffer (protocol 5)
_SCALAR = np.uint8(0).__reduce__()[0]  # numpy(._)core.multiarray.scalar

_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[..., Any]] = {
    ("_codecs", "encode"): _latin1_encode,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{(f"{core}.multiarray", "_reconstruct"): _RECONSTRUCT for core in ("numpy.core", "numpy._core")},
    **{(f"{core}.multiarray", "scalar"): _SCALAR for core in ("numpy.core", "numpy._core")},
    **{(f"{core}.numeric", "_frombuffer"): _FROMBUFFER for core in ("numpy.core", "numpy._core")},
}


class _RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class _DataUnpickler(pickle.Unpickler):
    """Builds data only: the globals it resolves are numpy's array/dtype reconstructors."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise _RefusedGlobal(f"persistent id {pid!r}")


def load_data_pickle(data: bytes, where: str | Path, encoding: str = "bytes") -> Any:
    """Unpickle ``data`` (read from ``where``) allowing only dicts, lists, str, bytes, numbers and numpy arrays.

    ``encoding`` decodes Python 2 ``str`` objects, as :func:`pickle.loads` does (``"bytes"``
    keeps them as bytes, the official CIFAR layout)."""
    try:
        return _DataUnpickler(io.BytesIO(data), encoding=encoding).load()
    except _RefusedGlobal as err:
        raise ClbenchError(
            f"{where}: refused to unpickle: it asks for the Python global '{err.name}', which could run code "
            "(only dicts, lists, str, bytes, numbers and numpy arrays are read)"
        ) from None
    except Exception as err:  # truncated, corrupt, not a pickle at all
        raise ClbenchError(f"{where}: not a readable pickle ({type(err).__name__}: {err})") from None


# ----------------------------------------------------------------------------- torch files
_REFUSED = re.compile(r"Unsupported global: GLOBAL (\S+)")
_REFUSED_LIST = re.compile(r"Unsupported globals: (.+?)\.(?:\s|$)")
_WEIGHTS_ERROR = re.compile(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n|$)", re.S)


def _first_sentence(text: str) -> str:
    text = " ".join(str(text).split())
    return text.split(". ", 1)[0].rstrip(".") or "empty error"


def load_problem(err: BaseException) -> str:
    """What went wrong in a ``torch.load``, in a few words: the refused global, truncation or
    corruption (never torch's advice to retry with ``weights_only=False``)."""
    message = str(err)
    refused = _REFUSED.search(message) or _REFUSED_LIST.search(message)  # torch's wording, or timm's re-raise
    if refused:
        return (f"refused: it asks for the Python global '{refused.group(1)}', which could run code "
                "(only tensors and plain containers are read, weights_only=True)")
    if isinstance(err, pickle.UnpicklingError):
        if "Weights only load failed" in message:
            detail = _WEIGHTS_ERROR.search(message)
            return f"refused by the weights-only reader ({detail.group(1) if detail else 'unsupported content'})"
        return f"not a readable torch file ({_first_sentence(message)})"
    if isinstance(err, EOFError):
        return "truncated (the file ends early)"
    if isinstance(err, (RuntimeError, zipfile.BadZipFile)):
        return f"corrupt or truncated ({_first_sentence(err)})"
    if isinstance(err, OSError):
        return f"cannot be read ({err.strerror or err})"
    return f"not a torch file ({type(err).__name__}: {_first_sentence(err)})"  # KeyError, ValueError, ...


def torch_load(path: str | Path, what: str = "file") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; any failure is a one-line ClbenchError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ClbenchError(f"{what} {path}: {load_problem(err)}") from None


_FORCE, _FORCE_NO = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within the block every ``torch.load`` (also inside third-party code, e.g. timm's hub
    download) runs with ``weights_only=True``, whatever its caller passes."""
    saved = {name: os.environ.pop(name, None) for name in (_FORCE, _FORCE_NO)}
    os.environ[_FORCE] = "1"
    try:
        yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def load_safetensors(path: str | Path, what: str = "file") -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file on the CPU; a bad header or truncation is a one-line ClbenchError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise ClbenchError(f"{what} {path}: not a valid safetensors file ({_first_sentence(err)})") from None
    except OSError as err:
        raise ClbenchError(f"{what} {path}: cannot be read ({err.strerror or err})") from None


def tensor_state_dict(state: Any, path: str | Path, what: str = "file") -> dict[str, torch.Tensor]:
    """``state`` checked to be a state dict (str keys, tensor values), else a ClbenchError naming the file."""
    if not isinstance(state, dict):
        raise ClbenchError(f"{what} {path}: does not hold a state dict (got a {type(state).__name__})")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ClbenchError(f"{what} {path}: does not hold a state dict "
                               f"(entry {key!r} is a {type(value).__name__}, not a tensor)")
    return state
