"""The run directory's own records: ``metrics.jsonl``, ``run_info.json`` and ``summary.json``."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from clbench.logging.base import RunLogger
from clbench.logging.serialize import to_jsonable

METRICS_FILE = "metrics.jsonl"
RUN_INFO_FILE = "run_info.json"
SUMMARY_FILE = "summary.json"


class JsonlLogger(RunLogger):
    """Appends one JSON object per :meth:`log_metrics` call to ``run_dir/metrics.jsonl``:
    ``{"step", "kind", "time" (seconds since run start), **metrics}``.

    Every line is flushed as soon as it is written, so the file survives a crash; a resumed
    run appends to the same file (an unterminated last line left by a crash is repaired
    first). Its failures are fatal: without these records the run is lost.
    """

    fatal_errors = True

    def __init__(self, run_dir: str | os.PathLike[str]):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / METRICS_FILE
        _repair_tail(path)
        self._file = path.open("a", encoding="utf-8")
        self._t0 = time.monotonic()

    def on_run_start(self, info: dict[str, Any]) -> None:
        """Restart the clock and write the run info; a resumed run writes
        ``run_info.resume-<n>.json`` rather than overwriting the first one."""
        self._t0 = time.monotonic()
        path = self.run_dir / RUN_INFO_FILE
        n = 0
        while path.exists():
            n += 1
            path = self.run_dir / f"run_info.resume-{n}.json"
        _write_json_atomic(path, info)

    def log_metrics(self, metrics: dict[str, float | int], step: int, kind: str) -> None:
        record = {"step": step, "kind": kind, "time": round(time.monotonic() - self._t0, 3), **metrics}
        self._file.write(json.dumps(to_jsonable(record)) + "\n")
        self._file.flush()

    def on_run_end(self, summary: dict[str, Any]) -> None:
        """Write ``summary.json`` atomically (temporary file, then ``os.replace``)."""
        _write_json_atomic(self.run_dir / SUMMARY_FILE, summary)

    def close(self) -> None:
        self._file.close()


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl`` in order, skipping an unterminated last
    line that does not parse (a write cut short by a crash)."""
    text = (Path(run_dir) / METRICS_FILE).read_text(encoding="utf-8")
    lines = text.split("\n")
    tail = lines.pop()  # "" when the file ends with a newline
    records = [json.loads(line) for line in lines if line.strip()]
    if tail.strip():
        try:
            records.append(json.loads(tail))
        except json.JSONDecodeError:
            pass
    return records


def _repair_tail(path: Path) -> None:
    """Make ``path`` end with a newline before appending: an unterminated last line is
    completed when it is valid JSON and cut off otherwise."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        start = data.rfind(b"\n") + 1
        try:
            json.loads(data[start:])
            f.write(b"\n")
        except ValueError:
            f.truncate(start)


def _write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` through a temporary file and ``os.replace``."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(to_jsonable(obj), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
