"""Read a golden written by ``tools/reference/<method>.py`` (see ``tools/reference/common.py``).

Goldens are safetensors files (tensors + string metadata): loading one runs no code."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

GOLDEN_DIR = Path(__file__).resolve().parent / "reference"


@dataclass
class Golden:
    name: str
    tensors: dict[str, torch.Tensor]
    repository: str
    commit: str
    files: list[str]
    script: str
    extra: dict = field(default_factory=dict)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]


def load_golden(name: str, directory: Path = GOLDEN_DIR) -> Golden:
    """The golden ``<directory>/<name>.safetensors``; its metadata must name repository, commit and script."""
    from safetensors import safe_open

    from clbench.safe_load import load_safetensors

    path = Path(directory) / f"{name}.safetensors"
    tensors = load_safetensors(path, "golden")
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    missing = [k for k in ("repository", "commit", "files", "script") if not meta.get(k)]
    if missing:
        raise AssertionError(f"golden {path.name}: metadata lacks {missing}")
    return Golden(name, tensors, meta["repository"], meta["commit"], json.loads(meta["files"]), meta["script"],
                  json.loads(meta.get("extra") or "{}"))


def all_goldens() -> list[str]:
    return sorted(p.stem for p in GOLDEN_DIR.glob("*.safetensors"))
