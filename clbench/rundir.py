"""The run directory's lock and checkpoint files.

* :class:`RunLock` -- an exclusive ``fcntl.flock`` on ``run_dir/run.lock`` (the holder's PID
  is written in it) held for the whole life of a run, so a second run or ``--resume`` of a live
  run directory is refused with the PID that holds it.  The kernel drops the lock when its
  process dies (even by SIGKILL): a lock file left by a killed run is simply taken over.
* :func:`save_checkpoint` / :func:`load_checkpoint` -- ``checkpoint.pt`` written atomically,
  the previous one kept as ``checkpoint.prev.pt``; loaded with ``weights_only=True`` (so
  nothing in the file can run code: only tensors, numbers, strings, lists, tuples and dicts),
  falling back to the previous checkpoint when the newest one is damaged.
* :func:`run_status` -- what state a run directory is in (for ``clbench sweep`` and friends).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from clbench.registry import ClbenchError
from clbench.safe_load import load_problem

CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"
LOCK_FILE = "run.lock"
SUMMARY_FILE = "summary.json"

RUN_STATUSES = ("missing", "running", "finished", "failed", "interrupted", "incomplete")


class RunInUseError(ClbenchError):
    """The run directory is locked by a live process."""


class CheckpointError(ClbenchError):
    """A checkpoint cannot be loaded (damaged, or holding objects that are not plain data)."""


def notice(message: str) -> None:
    """A one-line message to the user on stderr (``clbench: ...``)."""
    print(f"clbench: {message}", file=sys.stderr, flush=True)


class RunLock:
    """An exclusive lock on a run directory, held until :meth:`release` (or process death)."""

    def __init__(self, run_dir: str | os.PathLike[str]):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    @classmethod
    def acquire(cls, run_dir: str | os.PathLike[str]) -> "RunLock":
        """Lock ``run_dir`` or raise :class:`RunInUseError` naming the PID that holds it."""
        lock = cls(run_dir)
        fd = os.open(lock.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            pid = lock_holder(run_dir)
            who = f"process {pid}" if pid else "another process"
            raise RunInUseError(f"run directory {lock.run_dir} is in use by {who} (a live run); "
                                "wait for it to end or stop it, or choose another name=") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        lock._fd = fd
        return lock

    def release(self) -> None:
        """Unlock (the file stays: removing it would race with a process about to lock it)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def refuse_existing(path: Path) -> None:
    """Raise for a new run whose directory ``path`` exists: in use (by which PID) or resumable."""
    holder = lock_holder(path)
    if holder is not None:
        raise RunInUseError(f"run directory {path} is in use by process {holder} (a live run with the same name); "
                            "choose another name=")
    raise ClbenchError(f"run directory {path} already exists; choose another name= or resume it with --resume {path}")


def create_run_dir(path: str | os.PathLike[str]) -> RunLock:
    """Create the new run directory ``path`` already locked: it is made (and locked) under a
    temporary name and renamed into place, which fails if ``path`` exists, so of two runs
    started together with the same name the loser sees a locked directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.creating"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    lock = RunLock.acquire(tmp)
    try:
        os.rename(tmp, path)
    except OSError:
        lock.release()
        shutil.rmtree(tmp, ignore_errors=True)
        refuse_existing(path)
    lock.run_dir, lock.path = path, path / LOCK_FILE
    return lock


def lock_holder(run_dir: str | os.PathLike[str]) -> int | None:
    """The PID of the live process holding ``run_dir``'s lock, None when it is free."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            text = path.read_text().strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def read_summary(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``summary.json`` of ``run_dir``, None when absent or unreadable (a run killed mid-write)."""
    try:
        return json.loads((Path(run_dir) / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def run_status(run_dir: str | os.PathLike[str]) -> str:
    """One of :data:`RUN_STATUSES`: ``missing`` (no run there), ``running`` (locked by a live
    process), ``finished``, ``failed``, ``interrupted`` (as ``summary.json`` says), or
    ``incomplete`` (killed: no final summary, or one saying ``running`` without a live lock)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        return "missing"
    if lock_holder(run_dir) is not None:
        return "running"
    status = (read_summary(run_dir) or {}).get("status")
    return status if status in ("finished", "failed", "interrupted") else "incomplete"


# ---------------------------------------------------------------------- checkpoints
def save_checkpoint(state: dict[str, Any], run_dir: str | os.PathLike[str]) -> None:
    """Write ``checkpoint.pt`` atomically (temporary file, fsync, rename), keeping the one it
    replaces as ``checkpoint.prev.pt``."""
    run_dir = Path(run_dir)
    tmp = run_dir / (CHECKPOINT + ".tmp")
    with tmp.open("wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    current = run_dir / CHECKPOINT
    if current.exists():
        os.replace(current, run_dir / PREVIOUS_CHECKPOINT)
    os.replace(tmp, current)


def _load(path: Path, device: torch.device | str) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001 - classified by the one torch.load diagnosis (clbench.safe_load)
        if load_problem(err).startswith("refused"):
            raise CheckpointError(
                f"refusing to load {path}: it holds objects other than tensors and plain data "
                "(loading it could run code); it was not written by clbench or was tampered with. "
                f"Delete it to restart the run from the beginning with --resume") from None
        raise
    if not isinstance(state, dict) or "position" not in state:
        raise ValueError("not a clbench checkpoint")
    return state


def load_checkpoint(run_dir: str | os.PathLike[str], device: torch.device | str = "cpu") -> dict[str, Any] | None:
    """The newest loadable checkpoint of ``run_dir`` (None when it has none).  A damaged
    ``checkpoint.pt`` (truncated, empty) falls back to ``checkpoint.prev.pt``, saying so; a file
    that holds anything but plain data raises :class:`CheckpointError` without running it."""
    run_dir = Path(run_dir)
    current, previous = run_dir / CHECKPOINT, run_dir / PREVIOUS_CHECKPOINT
    if not current.exists() and not previous.exists():
        return None
    damaged: list[str] = []
    for path in (current, previous):
        if not path.exists():
            continue
        try:
            state = _load(path, device)
        except CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001 - any read/parse failure means a damaged file
            damaged.append(f"{path.name} ({load_problem(err)})")
            continue
        if damaged:
            notice(f"{damaged[0]} is damaged; resuming from the previous checkpoint {path}")
        return state
    raise CheckpointError(
        f"cannot resume {run_dir}: damaged checkpoint {', '.join(damaged)}. "
        f"Delete {', '.join(p.name for p in (current, previous) if p.exists())} and run "
        f"`clbench run --resume {run_dir}` to restart the run from the beginning")
