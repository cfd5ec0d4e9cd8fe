"""Command line: ``clbench run [CONFIG.yaml] [key=value ...]``, ``clbench list``.

Examples::

    clbench run                                        # built-in default: class-IL digits, replay
    clbench run configs/split_mnist.yaml strategy=ewc strategy.lambda_=1e4 eval.every=1
    clbench run configs/split_mnist.yaml --print-config
    clbench run --resume runs/<run-dir>                # continue a killed run
    clbench list                                       # strategies, scenarios, datasets, models
    clbench sweep configs/split_mnist.yaml strategy=finetune,replay seed=0,1,2   # a grid on Ray
    clbench compare runs/<sweep> --format latex          # mean ± std over seeds per strategy
    clbench report runs/<sweep> -o report/                 # HTML page + PNG/PDF figures
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clbench", description="Continual-learning benchmark runner.")
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="run a strategy on a scenario",
                           description="Run a config; later key=value overrides win (e.g. strategy=ewc strategy.lambda_=1e4).")
    run_p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
    run_p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    run_p.add_argument("--resume", metavar="RUN_DIR",
                       help="continue a run from its last checkpoint (restart it if it has none; a finished run is left as is)")
    run_p.add_argument("--force-config-change", action="store_true",
                       help="with --resume: continue even though config.yaml changed since the checkpoint (recorded in run_info)")
    sub.add_parser("list", help="list strategies, scenarios, datasets and models")
    from clbench import sweep as sweep_mod

    sweep_mod.add_arguments(sub.add_parser("sweep", help="a grid of runs on Ray or SLURM (key=v1,v2 ...)",
                                           description="Run the cartesian product of the comma lists (e.g. strategy=finetune,ewc seed=0,1,2)."))
    from clbench import report as report_mod, results as results_mod

    results_mod.add_arguments(sub.add_parser("compare", help="table of summary metrics over seeds (md, csv, latex, json)",
                                             description="Mean ± std over seeds per group of runs; failed/incomplete runs listed, never averaged."))
    report_mod.add_arguments(sub.add_parser("report", help="HTML page and PNG/PDF figures of runs or sweeps",
                                            description="Write a self-contained HTML report with the figures of runs and sweeps."))
    args, extra = parser.parse_known_args(argv)
    if args.command in ("run", "sweep"):  # key=value after an option (`run CFG --print-config seed=1`)
        args.args += [e for e in extra if not e.startswith("-")]
        extra = [e for e in extra if e.startswith("-")]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")

    from clbench.registry import ClbenchError

    try:
        if args.command == "list":
            return _list()
        if args.command == "sweep":
            return sweep_mod.main(args)
        if args.command == "compare":
            return results_mod.main(args)
        if args.command == "report":
            return report_mod.main(args)
        return _run(args)
    except ClbenchError as err:
        print(f"clbench: error: {err}", file=sys.stderr)
        return 2 if not type(err).__name__ == "NonFiniteLossError" else 1
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM (clbench.engine.Interrupted)
        run_dir = getattr(err, "run_dir", None)
        hint = f"; resume with `clbench run --resume {run_dir}`" if run_dir else ""
        print(f"clbench: interrupted{hint}", file=sys.stderr)
        return 128 + getattr(err, "signum", 2)


def _run(args: argparse.Namespace) -> int:
    from clbench.registry import ClbenchError

    config_path = None
    overrides = list(args.args)
    if overrides and "=" not in overrides[0]:
        config_path = overrides.pop(0)
    if args.resume:
        if config_path or overrides:
            raise ClbenchError("--resume continues a run with its own saved config; drop the config file and overrides "
                               "(edit its config.yaml and pass --force-config-change to change it)")
        from clbench.engine import run

        run(resume=args.resume, force_config_change=args.force_config_change)
        return 0
    if args.force_config_change:
        raise ClbenchError("--force-config-change only applies with --resume RUN_DIR")
    from clbench.config import config_to_yaml, load_config

    cfg = load_config(config_path, overrides)
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    from clbench.engine import run

    run(cfg)
    return 0


def _list() -> int:
    from rich.console import Console
    from rich.table import Table

    from clbench.registry import DATASETS, MODELS, SCENARIOS, STRATEGIES

    console = Console()
    for title, registry in (("strategies", STRATEGIES), ("scenarios", SCENARIOS), ("datasets", DATASETS), ("models", MODELS)):
        table = Table(title=title, title_justify="left", show_header=False, box=None, padding=(0, 2))
        for entry in registry.entries():
            table.add_row(f"[bold]{entry.name}[/bold]", entry.description)
        console.print(table)
        console.print()
    configs = sorted(Path("configs").glob("*.yaml")) if Path("configs").is_dir() else []
    if configs:
        console.print("configs: " + "  ".join(str(c) for c in configs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
