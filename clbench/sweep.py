"""``clbench sweep``: a grid of ordinary runs, executed on Ray (default) or SLURM via submitit.

``clbench sweep [CONFIG.yaml] strategy=finetune,replay seed=0,1,2 train.epochs=1`` expands the
comma lists of the overrides (same grammar as ``clbench run``; a comma inside ``[...]``,
``{...}`` or quotes does not split) into their cartesian product; a ``sweep:`` section of the
YAML may hold the grid too (``sweep: {grid: {seed: [0, 1]}}``) and the sweep options
(:class:`SweepConfig`; also ``sweep.<key>=value`` on the command line or the ``--`` options).

Every point is a run directory ``<output_dir>/<sweep name>/<point name>/`` whose name comes
from the point's grid values (``strategy=ewc,seed=1``); ``sweep.json`` next to them lists the
points (overrides, run dir, status, error, wall time) and is rewritten atomically whenever a
status changes.  All point configs are resolved and validated before anything runs.

Rerunning the same command skips finished points, resumes killed/interrupted ones from their
checkpoints (:func:`clbench.engine.run` with ``resume``) and reruns failed ones only with
``retry_failed`` (from the beginning).  A point that raises is recorded as failed and the
others go on; Ctrl-C cancels the running points (they stop with a checkpoint, status
``interrupted``) and leaves every run directory resumable.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from clbench.registry import ClbenchError

LAUNCHERS = ("ray", "slurm", "submitit_local")
SWEEP_FILE = "sweep.json"
ENV_PREFIXES = ("CLBENCH_", "WANDB_")  # forwarded from the driver to every point


@dataclass
class SweepConfig:
    """Sweep options: the ``sweep:`` YAML section, ``sweep.<key>=value`` overrides, or ``--`` options."""

    name: Optional[str] = None  # sweep directory name (default: <config stem>-<hash of the arguments>)
    grid: Dict[str, Any] = field(default_factory=dict)  # key -> list of values
    cpus_per_run: float = 1.0  # CPUs reserved per point (torch threads: its floor, at least 1)
    gpus_per_run: float = 0.0  # GPUs per point (fractions share a GPU on Ray)
    max_concurrent: int = 0  # at most this many points at once (0: as many as the resources allow)
    launcher: str = "ray"  # ray | slurm | submitit_local (submitit's local executor: one subprocess per point)
    address: Optional[str] = None  # Ray: None (start Ray here), "auto" or "ray://host:port"
    partition: Optional[str] = None  # SLURM partition
    time_min: int = 60  # SLURM time limit per point, minutes


@dataclass
class Point:
    """One grid point: its name, its overrides and its resolved config."""

    name: str
    grid: dict[str, str]
    overrides: list[str]
    run_dir: Path
    config_yaml: str
    record: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------- grid expansion
def split_values(value: str) -> list[str]:
    """Split an override value at the commas that are not inside brackets, braces or quotes."""
    parts, depth, quote, current = [], 0, "", []
    for ch in value:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return parts


def format_value(value: Any) -> str:
    """A YAML grid value in override grammar (``true``, ``1e-3``, ``[10, 100]``)."""
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def expand(args: list[str], yaml_grid: dict[str, list[Any]] | None = None) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """``args`` (``key=value`` overrides, comma lists allowed) -> (run overrides without the
    swept keys, ``sweep.*`` option overrides, grid ``{key: [values]}``).  A key given on the
    command line replaces the same key of the YAML grid."""
    bad = [a for a in args if "=" not in a or a.startswith("=")]
    if bad:
        raise ClbenchError(f"overrides must look like key=value, got: {' '.join(bad)}")
    grid: dict[str, list[str]] = {}
    for key, values in (yaml_grid or {}).items():
        values = list(values) if isinstance(values, (list, tuple)) else [values]
        if not values:
            raise ClbenchError(f"sweep.grid.{key} is empty; give it at least one value")
        grid[str(key)] = [format_value(v) for v in values]
    base, options = [], []
    for arg in args:
        key, value = arg.split("=", 1)
        if key.startswith("sweep."):
            options.append(arg)
            continue
        grid.pop(key, None)
        values = split_values(value)
        if len(values) > 1:
            if any(v.strip() == "" for v in values):
                raise ClbenchError(f"empty value in the list of '{key}': {value!r}")
            grid[key] = values
        else:
            base = [b for b in base if b.split("=", 1)[0] != key] + [arg]
    return base, options, grid


def grid_points(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    """The cartesian product of the grid, first key slowest (``[{}]`` for an empty grid)."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in product(*(grid[k] for k in keys))]


def point_name(values: dict[str, str]) -> str:
    """A filesystem-safe directory name from a point's grid values, e.g. ``strategy=ewc,seed=1``."""
    if not values:
        return "default"
    raw = ",".join(f"{k}={v}" for k, v in values.items())
    name = re.sub(r"[^A-Za-z0-9._=,+\-]+", "_", raw).strip("._") or "point"
    if len(name) > 120 or name != raw:
        name = f"{name[:100]}-{hashlib.sha1(raw.encode()).hexdigest()[:8]}"
    return name


# ---------------------------------------------------------------------- planning
def sweep_options(section: Any, overrides: list[str]) -> SweepConfig:
    """The validated sweep options: schema defaults < YAML ``sweep:`` section < ``sweep.*`` overrides."""
    schema = OmegaConf.structured(SweepConfig)
    try:
        cli = OmegaConf.from_dotlist([o[len("sweep."):] for o in overrides])
        for part in (section, cli):
            if part is not None:
                schema = OmegaConf.merge(schema, part)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or getattr(err, "key", None) or ""
        raise ClbenchError(f"invalid sweep option 'sweep.{key}': {str(err).splitlines()[0]}. "
                           f"Valid keys: {', '.join(SweepConfig.__dataclass_fields__)}") from None
    opts: SweepConfig = OmegaConf.to_object(schema)  # type: ignore[assignment]
    if opts.launcher not in LAUNCHERS:
        raise ClbenchError(f"sweep.launcher must be one of {', '.join(LAUNCHERS)}, got '{opts.launcher}'")
    if opts.cpus_per_run <= 0 or opts.gpus_per_run < 0 or opts.max_concurrent < 0 or opts.time_min <= 0:
        raise ClbenchError("sweep.cpus_per_run must be > 0, sweep.gpus_per_run, sweep.max_concurrent >= 0, sweep.time_min > 0")
    return opts


def _split_yaml(path: str | None) -> tuple[Any, str | None, Path | None]:
    """The YAML's ``sweep:`` section and the path of a copy without it (``None`` if there was
    none to strip; relative plug-in files are made absolute in the copy)."""
    if path is None:
        return None, None, None
    p = Path(path)
    if not p.is_file():
        raise ClbenchError(f"config file not found: {p} (run `clbench list` for the shipped configs under configs/)")
    raw = OmegaConf.load(p)
    if not isinstance(raw, DictConfig) or "sweep" not in raw:
        return None, str(p), None
    section = raw.pop("sweep")
    for i, plugin in enumerate(raw.get("plugins") or []):
        if str(plugin).endswith(".py") and not Path(plugin).is_file() and (p.parent / plugin).is_file():
            raw.plugins[i] = str((p.parent / plugin).resolve())
    try:  # beside the original: paths in the YAML stay relative to its folder
        fd, tmp = tempfile.mkstemp(prefix=f".{p.stem}-sweep-", suffix=".yaml", dir=p.parent)
    except OSError:  # a read-only config folder: plug-ins were made absolute above, other relative paths move
        import warnings

        warnings.warn(f"cannot write beside {p}; relative paths in it other than plugins now resolve against "
                      "the temporary directory: make them absolute, or move the sweep: section to the command line",
                      stacklevel=2)
        fd, tmp = tempfile.mkstemp(prefix=f"{p.stem}-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        f.write(OmegaConf.to_yaml(raw))  # interpolations stay unresolved, as in the original
    return section, tmp, Path(tmp)


def default_name(config_path: str | None, base: list[str], grid: dict[str, list[str]]) -> str:
    """A stable sweep name for the same command: ``<config stem>-<hash of the arguments>``."""
    stem = Path(config_path).stem if config_path else "default"
    key = json.dumps([str(Path(config_path).resolve()) if config_path else None, base, grid])
    return f"{stem}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def plan(config_path: str | None, args: list[str]) -> tuple[SweepConfig, Path, list[Point]]:
    """Parse, expand and validate the whole sweep before anything runs."""
    from clbench.config import config_to_yaml, load_config

    section, run_yaml, tmp = _split_yaml(config_path)
    try:
        grid_section = section.get("grid") if section is not None else None
        base, option_overrides, grid = expand(args, OmegaConf.to_container(grid_section) if grid_section is not None else None)
        opts = sweep_options(section, option_overrides)
        combos = grid_points(grid)
        names = [point_name(c) for c in combos]
        if len(set(names)) != len(names):
            raise ClbenchError("two grid points map to the same directory name; make the values distinct")
        points: list[Point] = []
        sweep_dir: Path | None = None
        for combo, name in zip(combos, names):
            overrides = base + [f"{k}={v}" for k, v in combo.items()]
            try:
                cfg = load_config(run_yaml, overrides)
            except ClbenchError as err:
                where = f" (grid point {name})" if combo else ""
                raise ClbenchError(f"{err}{where}") from None
            if sweep_dir is None:
                sweep_dir = Path(cfg.output_dir).resolve() / (opts.name or default_name(config_path, base, grid))
            cfg.output_dir, cfg.name = str(sweep_dir), name
            points.append(Point(name, dict(combo), overrides, sweep_dir / name, config_to_yaml(cfg)))
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    assert sweep_dir is not None
    return opts, sweep_dir, points


# ---------------------------------------------------------------------- one point (in the worker)
def run_point(config_yaml: str, run_dir: str, resume: bool, env: dict[str, str], threads: int,
              cwd: str) -> dict[str, Any]:
    """Run (or resume) one point where the launcher put it; a failure comes back as a record."""
    os.environ.update(env)
    if Path(cwd).is_dir():
        os.chdir(cwd)
    import torch

    torch.set_num_threads(threads)
    from clbench.config import load_config
    from clbench.engine import run

    start = time.time()
    try:
        if resume:
            summary = run(resume=run_dir)
        else:
            with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
                f.write(config_yaml)
                f.flush()
                cfg = load_config(f.name)
            summary = run(cfg)
        return {"status": summary.get("status", "finished"), "error": summary.get("error"), "wall_time_s": time.time() - start}
    except Exception as err:  # noqa: BLE001 - a point's failure is recorded, the sweep goes on
        return {"status": "failed", "error": f"{type(err).__name__}: {err}".splitlines()[0][:2000],
                "wall_time_s": time.time() - start}


# ---------------------------------------------------------------------- launchers
class RayLauncher:
    """Points as Ray tasks (local Ray started here, or an existing cluster at ``address``)."""

    def __init__(self, opts: SweepConfig):
        import ray

        self.ray = ray
        self.owns = not ray.is_initialized()
        if self.owns:
            kwargs: dict[str, Any] = {"address": opts.address} if opts.address else {"include_dashboard": False}
            ray.init(log_to_driver=False, **kwargs)
        self.task = ray.remote(run_point).options(num_cpus=opts.cpus_per_run, num_gpus=opts.gpus_per_run,
                                                  max_retries=0, retry_exceptions=False)
        resources = ray.cluster_resources()
        fits = [resources.get("CPU", 1) / opts.cpus_per_run]
        if opts.gpus_per_run:
            fits.append(resources.get("GPU", 0) / opts.gpus_per_run)
        self.capacity = max(1, int(min(fits) + 1e-9))

    def submit(self, *args: Any) -> Any:
        return self.task.remote(*args)

    def wait(self, handles: list[Any], timeout: float) -> list[Any]:
        done, _ = self.ray.wait(handles, num_returns=1, timeout=timeout)
        if done:  # everything else already finished too
            done, _ = self.ray.wait(handles, num_returns=len(handles), timeout=0)
        return done

    def result(self, handle: Any) -> dict[str, Any]:
        return self.ray.get(handle)

    def cancel(self, handle: Any, force: bool = False) -> None:
        self.ray.cancel(handle, force=force)

    def close(self) -> None:
        if self.owns:
            self.ray.shutdown()


class SubmititLauncher:
    """Points as submitit jobs: SLURM, or submitit's local executor (``local=True``)."""

    def __init__(self, opts: SweepConfig, folder: Path, local: bool):
        import submitit

        self.executor = submitit.AutoExecutor(folder=str(folder), cluster="local" if local else "slurm")
        params: dict[str, Any] = {"timeout_min": opts.time_min, "cpus_per_task": max(1, math.ceil(opts.cpus_per_run)),
                                  "name": "clbench-sweep"}
        if opts.gpus_per_run:
            params["gpus_per_node"] = math.ceil(opts.gpus_per_run)
        if opts.partition and not local:
            params["slurm_partition"] = opts.partition
        self.executor.update_parameters(**params)
        self.capacity = max(1, int((os.cpu_count() or 1) / opts.cpus_per_run)) if local else 10**6

    def submit(self, *args: Any) -> Any:
        return self.executor.submit(run_point, *args)

    def wait(self, handles: list[Any], timeout: float) -> list[Any]:
        end = time.time() + timeout
        while True:
            done = [h for h in handles if h.done()]
            if done or time.time() >= end:
                return done
            time.sleep(min(0.5, max(0.0, end - time.time())))

    def result(self, handle: Any) -> dict[str, Any]:
        return handle.result()

    def cancel(self, handle: Any, force: bool = False) -> None:
        handle.cancel(check=False)

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------- progress and records
class Display:
    """Points done/running/failed and an ETA: a rich bar on a terminal, plain lines otherwise."""

    def __init__(self, total: int, stream: Any = None):
        self.stream = stream or sys.stderr
        self.total, self.last = total, ""
        self.progress = None
        if getattr(self.stream, "isatty", lambda: False)():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[line]}"),
                                     TimeElapsedColumn(), console=Console(file=self.stream))
            self.task = self.progress.add_task("sweep", total=total, line="")
            self.progress.start()

    def update(self, counts: dict[str, int], eta: float | None) -> None:
        eta_text = "?" if eta is None else f"{int(eta) // 60}m{int(eta) % 60:02d}s"
        line = (f"{counts.get('finished', 0)} done, {counts.get('running', 0)} running, {counts.get('failed', 0)} failed, "
                f"{counts.get('pending', 0)} pending, ETA {eta_text}")
        if self.progress is not None:
            self.progress.update(self.task, completed=counts.get("finished", 0) + counts.get("failed", 0), line=line)
        elif line.split(", ETA")[0] != self.last.split(", ETA")[0]:
            print(f"[sweep] {line}", file=self.stream, flush=True)
        self.last = line

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON atomically (temporary file + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


# ---------------------------------------------------------------------- the driver
def sweep(config_path: str | None, args: list[str], retry_failed: bool = False, stream: Any = None) -> dict[str, Any]:
    """Plan, then run every point that is not finished; returns the content of ``sweep.json``."""
    from clbench.engine import run_status

    opts, sweep_dir, points = plan(config_path, args)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    previous = _previous_records(sweep_dir / SWEEP_FILE)
    todo: list[tuple[Point, bool]] = []  # (point, resume)
    for point in points:
        old = previous.get(point.name, {})
        status = run_status(point.run_dir)
        record = {"name": point.name, "grid": point.grid, "overrides": point.overrides, "run_dir": str(point.run_dir),
                  "status": status, "error": old.get("error"), "wall_time_s": old.get("wall_time_s")}
        if status == "running":
            raise ClbenchError(f"point {point.name} is running in another process ({point.run_dir}); "
                               "stop that sweep or wait for it, then rerun this command")
        if status == "missing" and old.get("status") == "failed":
            record["status"] = "failed"  # failed before its run directory existed
        if status != "missing":
            _check_same_config(point)
        if record["status"] == "failed" and retry_failed:
            record.update(status="pending", error=None)
            todo.append((point, False))
        elif record["status"] in ("missing", "interrupted", "incomplete"):
            todo.append((point, record["status"] != "missing"))
            record["status"] = "pending"
        point.record = record
    state = {"name": sweep_dir.name, "sweep_dir": str(sweep_dir), "config": config_path, "args": args,
             "launcher": opts.launcher, "options": {k: getattr(opts, k) for k in SweepConfig.__dataclass_fields__ if k != "grid"},
             "points": [p.record for p in points]}
    save = lambda: write_json(sweep_dir / SWEEP_FILE, state)  # noqa: E731
    for point, resume in todo:  # every point was checked: now clear the failed ones being retried
        if not resume:
            shutil.rmtree(point.run_dir, ignore_errors=True)
    save()
    skipped = len(points) - len(todo)
    print(f"sweep {sweep_dir}: {len(points)} points, {len(todo)} to run, {skipped} skipped "
          f"(finished{'' if retry_failed else ' or failed; --retry-failed reruns failed ones'})",
          file=stream or sys.stderr, flush=True)
    if todo:
        launcher = _launcher(opts, sweep_dir)
        try:
            _execute(launcher, opts, todo, save, Display(len(todo), stream))
        finally:
            launcher.close()
    return state


def _launcher(opts: SweepConfig, sweep_dir: Path) -> RayLauncher | SubmititLauncher:
    if opts.launcher == "ray":
        return RayLauncher(opts)
    return SubmititLauncher(opts, sweep_dir / ".submitit", local=opts.launcher == "submitit_local")


def _execute(launcher: Any, opts: SweepConfig, todo: list[tuple[Point, bool]], save: Callable[[], None],
             display: Display) -> None:
    """Keep at most ``max_concurrent`` points in flight; record each outcome as it arrives."""
    env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}
    threads = max(1, int(opts.cpus_per_run))
    limit = min(opts.max_concurrent or launcher.capacity, launcher.capacity if opts.launcher == "ray" else 10**6)
    queue = list(todo)
    running: dict[Any, tuple[Point, float]] = {}
    walls: list[float] = []
    all_records = [p.record for p, _ in todo]

    def refresh() -> None:
        save()
        counts: dict[str, int] = {}
        for rec in all_records:
            counts[rec["status"]] = counts.get(rec["status"], 0) + 1
        remaining = len(queue) + len(running)
        eta = (sum(walls) / len(walls)) * remaining / max(1, min(limit, remaining)) if walls else None
        display.update(counts, eta)

    try:
        while queue or running:
            while queue and len(running) < limit:
                point, resume = queue.pop(0)
                handle = launcher.submit(point.config_yaml, str(point.run_dir), resume, env, threads, os.getcwd())
                running[handle] = (point, time.time())
                point.record.update(status="running", error=None)
            refresh()
            for handle in launcher.wait(list(running), timeout=1.0):
                point, started = running.pop(handle)
                try:
                    outcome = launcher.result(handle)
                except Exception as err:  # noqa: BLE001 - the worker itself died (crash, OOM kill)
                    outcome = {"status": "failed", "error": f"{type(err).__name__}: {err}".splitlines()[0][:2000],
                               "wall_time_s": time.time() - started}
                point.record.update(outcome)
                if outcome["status"] == "finished":
                    walls.append(float(outcome["wall_time_s"]))
    except KeyboardInterrupt:
        _interrupt(launcher, running)
        raise
    finally:
        display.close()
        for point, _ in running.values():  # the driver stops on an error: nothing runs on unsupervised
            if point.record["status"] == "running":
                point.record.update(status="interrupted", error="the sweep driver stopped")
        save()


def _interrupt(launcher: Any, running: dict[Any, tuple[Point, float]]) -> None:
    """Ask the running points to stop with a checkpoint; force those that do not within 20 s."""
    for handle in running:
        launcher.cancel(handle)
    end = time.time() + 20
    pending = list(running)
    while pending and time.time() < end:
        try:
            done = launcher.wait(pending, timeout=1.0)
        except KeyboardInterrupt:  # a second Ctrl-C: stop at once
            break
        pending = [h for h in pending if h not in done]
    for handle in pending:
        launcher.cancel(handle, force=True)
    for point, _ in running.values():
        point.record.update(status="interrupted", error="interrupted by the sweep driver (Ctrl-C)")


def _previous_records(path: Path) -> dict[str, dict[str, Any]]:
    try:
        return {p["name"]: p for p in json.loads(path.read_text()).get("points", [])}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _check_same_config(point: Point) -> None:
    """Refuse to reuse a run directory made with another config (``--name`` reused with new overrides)."""
    saved = OmegaConf.to_container(OmegaConf.load(point.run_dir / "config.yaml"))
    wanted = OmegaConf.to_container(OmegaConf.create(point.config_yaml))
    if saved != wanted:
        changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        raise ClbenchError(f"{point.run_dir} was made with another config (differs in: {', '.join(changed)}); "
                           "choose another --name for this sweep")


# ---------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``clbench sweep`` arguments (each option is also a ``sweep.<key>=value`` override)."""
    parser.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=v1,v2 ...]")
    parser.add_argument("--name", help="sweep directory name under output_dir (default: config stem + hash of the arguments)")
    parser.add_argument("--retry-failed", action="store_true", help="rerun failed points from the beginning")
    parser.add_argument("--launcher", choices=LAUNCHERS, help="ray (default), slurm (submitit), submitit_local")
    parser.add_argument("--address", help="Ray cluster: 'auto' or 'ray://host:port' (default: start Ray on this machine)")
    parser.add_argument("--cpus-per-run", type=float, help="CPUs per point (default 1)")
    parser.add_argument("--gpus-per-run", type=float, help="GPUs per point, fractions allowed (default 0)")
    parser.add_argument("--max-concurrent", type=int, help="at most this many points at once (default: as resources allow)")
    parser.add_argument("--partition", help="SLURM partition")
    parser.add_argument("--time-min", type=int, help="SLURM time limit per point in minutes (default 60)")


def _sigterm(signum: int, frame: Any) -> None:
    """SIGTERM stops the driver like Ctrl-C (running points are interrupted with a checkpoint)."""
    raise KeyboardInterrupt


def main(args: argparse.Namespace) -> int:
    """``clbench sweep``: exit 0 when every point finished, 1 when some failed, 130 on Ctrl-C."""
    rest = list(args.args)
    config_path = rest.pop(0) if rest and "=" not in rest[0] else None
    for key in ("name", "launcher", "address", "cpus_per_run", "gpus_per_run", "max_concurrent", "partition", "time_min"):
        if getattr(args, key, None) is not None:
            rest.append(f"sweep.{key}={getattr(args, key)}")
    previous = signal.signal(signal.SIGTERM, _sigterm)
    try:
        state = sweep(config_path, rest, retry_failed=args.retry_failed)
    except KeyboardInterrupt:
        print("clbench: sweep interrupted; rerun the same command to resume it", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    counts: dict[str, int] = {}
    for rec in state["points"]:
        counts[rec["status"]] = counts.get(rec["status"], 0) + 1
    print(f"sweep {state['sweep_dir']}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    for rec in state["points"]:
        if rec["status"] == "failed":
            print(f"  failed: {rec['name']}: {rec['error']}")
    return 0 if counts.get("finished", 0) == len(state["points"]) else 1
