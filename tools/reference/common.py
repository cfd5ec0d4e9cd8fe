"""Shared plumbing for the reference scripts: check out the official code, write a golden file.

Each ``tools/reference/<method>.py`` script

1. gets the **official repository at a pinned commit** with :func:`official_source` (a checkout
   you pass with ``--source DIR``, or an extraction of a local git mirror; nothing is vendored into
   clbench and nothing is downloaded),
2. imports the official module(s) from it (:func:`imported_from`) and runs them on a tiny
   deterministic case built only from seeds (and, where stated, the shared ViT-Tiny/8 weights),
3. writes the outputs with :func:`write_golden` into ``tests/reference/<name>.safetensors``:
   tensors only (safetensors cannot execute code on load) plus string metadata naming the source
   repository, commit, files and the generating script.

The test ``tests/test_reference_<method>.py`` rebuilds the same case with clbench's own code
and compares with a stated tolerance. The goldens are figures; the scripts and the tests are ours.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
GOLDEN_DIR = REPO_ROOT / "tests" / "reference"
MIRRORS = Path(os.environ.get("CLBENCH_REFERENCE_MIRRORS", "/work/.mirror"))
CACHE = Path(os.environ.get("CLBENCH_REFERENCE_CACHE", Path.home() / ".cache" / "clbench" / "reference"))


def official_source(repository: str, commit: str, source: str | Path | None = None,
                    paths: tuple[str, ...] = ()) -> Path:
    """A directory holding ``repository`` (``owner/name``) at ``commit``.

    ``source``: a checkout you made yourself (``git clone https://github.com/<repository> && git
    checkout <commit>``); if it is a git work tree at another commit, this refuses. Without it, the
    commit is extracted (``git archive``) from the bare mirror ``$CLBENCH_REFERENCE_MIRRORS/<owner>+<name>/repo``
    into ``$CLBENCH_REFERENCE_CACHE/<owner>+<name>@<commit>`` once.  ``paths``: extract only these
    files/folders (for a mirror that lacks some large blobs of the commit, e.g. data split files)."""
    if source is not None:
        path = Path(source).resolve()
        if not path.is_dir():
            raise SystemExit(f"--source {path}: not a directory")
        if (path / ".git").exists():
            head = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True,
                                  text=True, check=True).stdout.strip()
            if not head.startswith(commit) and not commit.startswith(head):
                raise SystemExit(f"--source {path} is at {head[:12]}, the golden needs {repository}@{commit}")
        return path
    mirror = MIRRORS / repository.replace("/", "+") / "repo"
    if not mirror.exists():
        raise SystemExit(f"no checkout of {repository}: pass --source DIR (a clone at {commit}) "
                         f"or put a git mirror at {mirror}")
    suffix = "-" + "+".join(p.strip("/").replace("/", "_") for p in paths) if paths else ""
    target = CACHE / f"{repository.replace('/', '+')}@{commit}{suffix}"
    if not (target / ".complete").exists():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "--git-dir", str(mirror), "archive", "--format=tar", commit, "--", *paths],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
        (target / ".complete").write_text(commit + "\n")
    return target


@contextlib.contextmanager
def imported_from(path: Path, *package_prefixes: str) -> Iterator[None]:
    """``sys.path`` starts with ``path`` inside the block; modules under ``package_prefixes`` that the
    official code imported are dropped afterwards (so two official repos never share ``models``)."""
    sys.path.insert(0, str(path))
    try:
        yield
    finally:
        sys.path.remove(str(path))
        for name in list(sys.modules):
            if any(name == p or name.startswith(p + ".") for p in package_prefixes):
                del sys.modules[name]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def write_golden(name: str, tensors: Mapping[str, torch.Tensor], *, repository: str, commit: str,
                 files: list[str], script: str, notes: str = "", extra: Mapping[str, object] | None = None) -> Path:
    """Write ``tests/reference/<name>.safetensors``: the tensors (CPU, contiguous) and metadata.

    ``files``: the official files whose code produced the figures; ``script``: the generating
    script's path relative to the repo; ``extra``: JSON-serialisable case parameters the test reads."""
    from safetensors.torch import save_file

    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    meta = {"repository": repository, "commit": commit, "files": json.dumps(files), "script": script,
            "torch": torch.__version__, "notes": notes, "extra": json.dumps(dict(extra or {}))}
    out = GOLDEN_DIR / f"{name}.safetensors"
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    if _same_golden(out, tensors, meta):  # safetensors' header order varies: keep the bytes in git unchanged
        print(f"unchanged {out.relative_to(REPO_ROOT)} (same tensors and metadata, bit for bit)")
        return out
    save_file(tensors, str(out), metadata=meta)
    size = out.stat().st_size
    if size > 2 * 1024 * 1024:
        raise SystemExit(f"{out}: {size} bytes; keep goldens under 2 MiB (fewer batches / smaller model)")
    print(f"wrote {out.relative_to(REPO_ROOT)} ({size} bytes, {len(tensors)} tensors)")
    return out


def _same_golden(path: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> bool:
    """Whether ``path`` already holds exactly these tensors (dtype, shape, bits) and metadata."""
    from safetensors import safe_open

    if not path.exists():
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            if (handle.metadata() or {}) != dict(meta) or set(handle.keys()) != set(tensors):
                return False
            for key, value in tensors.items():
                old = handle.get_tensor(key)
                if old.dtype != value.dtype or old.shape != value.shape or not torch.equal(
                        old.reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)):
                    return False
    except Exception:  # unreadable: rewrite it
        return False
    return True
