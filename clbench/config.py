"""Typed run configuration: YAML file + ``key=value`` overrides, checked against dataclass schemas.

The ``scenario``, ``model`` and ``strategy`` sections are typed by the component their
``name`` selects (its registered config dataclass, whose defaults are the paper's), so
``strategy=ewc strategy.lambda_=1e4`` validates ``lambda_`` against EWC's schema.  A name may
be given as a string (``strategy: ewc``).  Precedence: schema defaults < YAML < command line.
If the command line switches a section to another component, the YAML's keys for the old
one are dropped (they belong to a different schema), unless the two share a schema
(``scenario=task_incremental`` on a class_incremental YAML keeps its dataset and split).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from clbench import composite
from clbench.logging.config import LoggingConfig
from clbench.registry import MODELS, SCENARIOS, STRATEGIES, ClbenchError, Registry
from clbench.validation import bounded, choice, path, path_fields, require, validate

COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")  # train.compile / eval.compile
PRECISIONS = ("auto", "fp32", "bf16")  # eval.precision
SCHEDULERS = ("none", "cosine", "coda_cosine", "multistep")  # train.scheduler (clbench.engine.make_scheduler)

TYPED_SECTIONS: dict[str, tuple[Registry, str]] = {
    "scenario": (SCENARIOS, "class_incremental"),
    "model": (MODELS, "mlp"),
    "strategy": (STRATEGIES, "replay"),
}


def check_milestones(scheduler: str, milestones) -> None:
    """``train.scheduler=multistep`` needs strictly increasing ``train.milestones`` (at load and in
    :func:`clbench.engine.make_scheduler`)."""
    milestones = list(milestones or [])
    require(scheduler != "multistep" or (milestones and milestones == sorted(set(milestones))),
            f"train.scheduler=multistep needs train.milestones, strictly increasing epochs (e.g. [30, 60]); got {milestones}")


@dataclass
class TrainConfig:
    epochs: int = bounded(5, ge=0)  # passes over each experience's data (ignored when iterations is set)
    iterations: Optional[int] = bounded(None, ge=0)  # fixed number of iterations per experience
    batch_size: int = bounded(32, ge=1)
    optimizer: str = choice("sgd", "sgd", "adam", "adamw")  # sgd | adam | adamw
    lr: float = bounded(0.05, gt=0)
    momentum: float = bounded(0.0, ge=0, le=1)
    weight_decay: float = bounded(0.0, ge=0)
    # per experience: none | cosine (per iteration) | coda_cosine (CODA-Prompt code's epoch-wise
    # cos(99*pi*max(e-1,0) / (200*(K-1))), K epochs, as the released class runs) | multistep (x gamma at each of `milestones`, in epochs)
    scheduler: str = choice("none", *SCHEDULERS)
    milestones: List[int] = bounded(default_factory=list, ge=1)  # multistep: epochs at which the lr is multiplied by gamma
    gamma: float = bounded(0.1, gt=0, le=1)  # multistep: the factor
    warmup_iters: int = bounded(0, ge=0)
    amp: str = choice("none", "none", "bf16", "fp16")  # none | bf16 | fp16 (CUDA only)
    grad_clip: Optional[float] = bounded(None, gt=0)  # max global gradient norm
    # none | flip | crop_flip (random crop with 4-px padding + horizontal flip) | resized_crop_flip
    # (torchvision RandomResizedCrop to the model's input size + horizontal flip; FeTrIL's released initial model)
    augment: str = choice("none", "none", "flip", "crop_flip", "resized_crop_flip")
    reset_optimizer: bool = True  # new optimiser state at each experience
    data_on_device: bool = True  # hold the whole stream on the device as uint8
    channels_last: bool = False  # GPU: model weights and training inputs in channels-last (ignored on CPU)
    compile: str = choice("none", *COMPILE_MODES)  # torch.compile the model's forward: none | default | reduce-overhead | max-autotune
    online: bool = False  # online protocol: one pass in stream order, exposed-class masking (epochs/iterations ignored)
    online_iter: int = bounded(1, ge=1)  # online: gradient steps per incoming batch (Si-Blurry: 3)

    def validate(self) -> None:
        check_milestones(self.scheduler, self.milestones)


@dataclass
class EvalConfig:
    every: int = bounded(10, ge=0)  # evaluate every N training iterations (0: only at experience ends)
    subset_size: int = bounded(1000, ge=0)  # fixed, seeded test subset per task for periodic evaluation (0: all)
    batch_size: int = bounded(0, ge=0)  # 0: auto (256 on CPU, where larger batches run slower; 2048 on a GPU)
    precision: str = choice("auto", *PRECISIONS)  # auto (bf16 autocast on a GPU, fp32 on CPU) | fp32 | bf16
    channels_last: bool = True  # channels-last inputs on a GPU (ignored on CPU)
    compile: str = choice("none", *COMPILE_MODES)  # torch.compile strategy.predict: none | default | reduce-overhead (CUDA graphs) | max-autotune
    overlap: bool = False  # offline loop: evaluate a weight snapshot on a side CUDA stream while training goes on
    windows: List[int] = bounded(default_factory=lambda: [10, 100], ge=1)  # WF^w / WP^w window lengths, in training iterations
    recovery_tol: float = bounded(0.05, ge=0, le=1)  # stability gap: a gap when the window's min < pre-boundary acc - tol; recovered when acc >= pre - tol
    baseline: bool = True  # evaluate the untrained model on every task (FWT's baseline)
    wf_tasks: str = choice("previous", "previous", "seen")  # WF^w averaged over previous tasks (i < k) | seen (i <= k, as the authors' code logs it)
    gap_window: int = bounded(100, ge=1)  # stability gap: iterations after a boundary in which the dip is looked for
    every_samples: int = bounded(1000, ge=0)  # online: evaluate every N training samples on the exposed classes (0: task ends only)
    online_points: str = choice("official", "official", "inclusive_with_end")  # online A_auc points: official (Si-Blurry trainer: after the batch that takes the count past k*N, no end point) | inclusive_with_end (at >= k*N, plus the end of the stream; clbench before issue 13)


@dataclass
class CheckpointConfig:
    enabled: bool = True  # checkpoint at each experience end
    every: int = bounded(0, ge=0)  # also every N iterations (0: never mid-experience)


@dataclass
class RunConfig:
    seed: int = bounded(0, ge=0, lt=2**63)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    output_dir: str = "runs"
    name: Optional[str] = None  # run directory name (default: time stamp + scenario + strategy)
    cache_dir: Optional[str] = path(None)  # decoded-dataset cache (default: $CLBENCH_CACHE or ~/.cache/clbench)
    deterministic: bool = False  # torch.use_deterministic_algorithms
    plugins: List[str] = field(default_factory=list)  # .py files or module names to import (they register components)
    scenario: Any = None
    model: Any = None
    strategy: Any = None
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def validate(self) -> None:
        """Rules across fields and against the file system, checked before anything is written."""
        require(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device) is not None,
                f"device '{self.device}' is not one of auto, cpu, cuda, cuda:N, mps")
        check_output_dir(self.output_dir)


def check_output_dir(output_dir: str) -> None:
    """That runs can be created under ``output_dir``: it is a folder (or can be made one, i.e.
    its nearest existing ancestor is a writable folder)."""
    target = Path(output_dir).expanduser()
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == target else f"is under {existing}, which is a file"
        raise ClbenchError(f"output_dir {output_dir} {what}; set output_dir to a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == target else f" (its nearest existing folder {existing} is not writable)"
        raise ClbenchError(f"output_dir {output_dir} is not writable{where}; set output_dir to a writable folder")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """The resolved, validated run config from an optional YAML file and ``key=value`` overrides."""
    file_cfg = _load_yaml(path) if path else OmegaConf.create({})
    if path:
        _paths_relative_to(file_cfg, Path(path).absolute().parent)
    cli_cfg = _parse_overrides(overrides or [])
    for section in TYPED_SECTIONS:
        for source in (file_cfg, cli_cfg):
            if isinstance(source.get(section), str):
                source[section] = {"name": source[section]}
            elif OmegaConf.is_list(source.get(section)):  # strategy: [replay, ewc]
                source[section] = {"name": list(source[section])}
            if isinstance(source.get(section), DictConfig) and OmegaConf.is_list(source[section].get("name")):
                source[section].name = composite.SEPARATOR.join(map(str, source[section].name))  # -> replay+ewc
    cfg = _merge(OmegaConf.structured(RunConfig), [_without(file_cfg), _without(cli_cfg)], "")
    cfg.plugins = load_plugins(list(cfg.plugins), base_dir=Path(path).parent if path else Path.cwd())
    for section, (registry, default) in TYPED_SECTIONS.items():
        cfg[section] = typed_section(section, registry, default, file_cfg.get(section), cli_cfg.get(section))
    OmegaConf.resolve(cfg)
    validate_config(cfg)
    return cfg


def validate_config(cfg: DictConfig) -> None:
    """Check every value of a loaded config against its schema's ranges and choices and the
    ``validate()`` hooks (:mod:`clbench.validation`); a :class:`ClbenchError` names the first bad key."""
    run_config = OmegaConf.to_object(cfg)
    validate(run_config)


def _paths_relative_to(file_cfg: DictConfig, base_dir: Path) -> None:
    """Make the relative paths a YAML file sets (``plugins`` and the fields declared with
    :func:`clbench.validation.path`, e.g. ``scenario.data_root``, ``model.checkpoint``) relative to
    its folder ``base_dir``, so that a run started from any working directory finds them.  For
    configs written before this rule, a path that exists only relative to the working directory
    keeps that meaning."""
    def fix(value: Any) -> Any:
        if not isinstance(value, str) or not value or value.startswith("~") or Path(value).is_absolute():
            return value
        candidate = base_dir / value
        return os.path.normpath(candidate) if candidate.exists() or not Path(value).exists() else value

    def fix_keys(node: Any, keys: list[str]) -> None:
        for key in keys:
            if not isinstance(node, DictConfig) or key not in node:
                continue
            try:
                value = node[key]  # resolves ${oc.env:...}
            except OmegaConfBaseException:
                continue  # refers to keys of the merged config: left as written
            if isinstance(value, str):
                node[key] = fix(value)
            elif value is not None and OmegaConf.is_list(value):
                node[key] = [fix(v) for v in value]

    fix_keys(file_cfg, path_fields(RunConfig))
    if OmegaConf.is_list(file_cfg.get("plugins")):
        file_cfg.plugins = [fix(p) if str(p).endswith(".py") else p for p in file_cfg.plugins]
    for section, (registry, _) in TYPED_SECTIONS.items():
        part = file_cfg.get(section)
        name = part if isinstance(part, str) else part.get("name") if isinstance(part, DictConfig) else None
        if section == "strategy" and isinstance(part, DictConfig) and composite.is_composite(name):
            for n in str(name).split(composite.SEPARATOR):  # each component's sub-section
                n = n.strip()
                if isinstance(part.get(n), DictConfig) and n in registry and registry.get(n).config is not None:
                    fix_keys(part[n], path_fields(registry.get(n).config))
        elif isinstance(part, DictConfig) and name is not None and str(name) in registry:
            config = registry.get(str(name)).config
            if config is not None:
                fix_keys(part, path_fields(config))


def typed_section(section: str, registry: Registry, default: str, file_part: Any, cli_part: Any) -> DictConfig:
    """One ``name``-typed section: the component's schema, then the YAML's keys, then the CLI's."""
    cli_name = cli_part.get("name") if cli_part is not None else None
    file_name = file_part.get("name") if file_part is not None else None
    name = cli_name or file_name or default
    if section == "strategy" and composite.is_composite(name):
        return _composite_section(str(name), file_part, cli_part)
    entry = registry.get(str(name))
    if entry.config is None:
        raise ClbenchError(f"{registry.kind} '{name}' has no config dataclass")
    base = OmegaConf.structured(entry.config)
    base.name = str(name)
    keep_file = file_name in (None, name) or _same_schema(registry, str(file_name), entry.config)
    parts = [p for p in (file_part if keep_file else None, cli_part) if p is not None]
    return _merge(base, parts, section + ".")


def _composite_section(name: str, file_part: Any, cli_part: Any) -> DictConfig:
    """A composition's section (``strategy.name: replay+ewc``): one typed sub-section per component
    (:func:`clbench.composite.composite_config`), then the YAML's keys, then the CLI's.  A YAML
    written for one of the components (``strategy: {name: replay, buffer_size: 500}``) keeps its
    keys in that component's sub-section; one written for another composition keeps the
    sub-sections of the components the two share."""
    names = composite.component_names(name)
    composite.check_composition(names)
    base = OmegaConf.structured(composite.composite_config(names))
    base.name = name
    parts = []
    file_name = str(file_part.get("name")) if file_part is not None and file_part.get("name") is not None else None
    if file_part is not None and file_name in (None, name):
        parts.append(file_part)
    elif file_part is not None and file_name in names:
        parts.append({file_name: {k: v for k, v in file_part.items() if k != "name"}})
    elif file_part is not None and composite.is_composite(file_name):
        shared = [n for n in names if n in file_part]
        if shared:
            parts.append({n: file_part[n] for n in shared})
    if cli_part is not None:
        parts.append(cli_part)
    return _merge(base, parts, "strategy.")


def _same_schema(registry: Registry, other: str, config: type) -> bool:
    """Whether component ``other``'s config has exactly ``config``'s keys (e.g. class_incremental
    and task_incremental), so that the YAML's keys for it still apply after a switch."""
    old = registry.get(other).config if other in registry else None
    names = lambda c: {f.name for f in dataclasses.fields(c)}  # noqa: E731
    return old is not None and names(old) == names(config)


def load_plugins(plugins: list[str], base_dir: Path | None = None) -> list[str]:
    """Import user plug-ins so their ``@register_*`` decorators run: a ``.py`` file path
    (relative to the working directory, or else to ``base_dir``; ``load_config`` has already made
    a YAML file's relative plug-in paths relative to its folder) or a module name.
    Returns the plug-ins with file paths made absolute (what the run directory records)."""
    import importlib
    import importlib.util
    import sys

    resolved = []
    for plugin in plugins:
        if not plugin.endswith(".py"):
            try:
                importlib.import_module(plugin)
            except ImportError as err:
                raise ClbenchError(f"cannot import plug-in module '{plugin}': {err}") from None
            resolved.append(plugin)
            continue
        candidates = [Path(plugin)] + ([base_dir / plugin] if base_dir is not None else [])
        file = next((c.resolve() for c in candidates if c.is_file()), None)
        if file is None:
            raise ClbenchError(f"plug-in file not found: {plugin} (looked in {', '.join(str(c) for c in candidates)})")
        resolved.append(str(file))
        name = f"clbench_plugin_{file.stem}"
        if name in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return resolved


def to_dict(cfg: DictConfig) -> dict:
    """A plain, JSON-serialisable dict of a config."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def component_config(section: DictConfig) -> Any:
    """The section as an instance of its registered dataclass (what builders receive)."""
    return OmegaConf.to_object(section)


def config_to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def _load_yaml(path: str | Path) -> DictConfig:
    p = Path(path)
    if not p.is_file():
        raise ClbenchError(f"config file not found: {p} (run `clbench list` for the shipped configs under configs/)")
    try:
        loaded = OmegaConf.load(p)
    except Exception as err:
        raise ClbenchError(f"cannot parse config file {p}: {err}") from None
    if not isinstance(loaded, DictConfig):
        raise ClbenchError(f"config file {p} must hold a mapping at the top level")
    return loaded


def _parse_overrides(overrides: list[str]) -> DictConfig:
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ClbenchError(f"overrides must look like key=value, got: {' '.join(bad)}")
    # `strategy=ewc` -> `strategy.name=ewc`: a later `strategy.lambda_=...` would otherwise
    # replace the string with a dict and lose the name.
    overrides = [f"{o.split('=', 1)[0]}.name={o.split('=', 1)[1]}"
                 if o.split("=", 1)[0] in TYPED_SECTIONS and not o.split("=", 1)[1].lstrip().startswith("{") else o
                 for o in overrides]
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise ClbenchError(f"bad override ({err.msg if hasattr(err, 'msg') else err}); "
                           "to switch a component and set its keys write e.g. strategy=ewc strategy.lambda_=1e4") from None


def _without(cfg: DictConfig) -> DictConfig:
    return OmegaConf.create({k: v for k, v in cfg.items() if k not in TYPED_SECTIONS})


def _merge(base: DictConfig, parts: list[Any], prefix: str) -> DictConfig:
    """Merge ``parts`` into the structured ``base``, turning OmegaConf errors into actionable ones."""
    for part in parts:
        try:
            base = OmegaConf.merge(base, part)
        except ConfigKeyError as err:
            raise ClbenchError(_unknown_key_message(base, err, prefix)) from None
        except (ValidationError, OmegaConfBaseException) as err:
            key = f"{prefix}{err.full_key}" if getattr(err, "full_key", None) else prefix.rstrip(".")
            msg = str(err).splitlines()[0]
            raise ClbenchError(f"invalid value for config key '{key}': {msg}") from None
    return base  # type: ignore[return-value]


def _unknown_key_message(base: DictConfig, err: ConfigKeyError, prefix: str) -> str:
    full_key = str(getattr(err, "full_key", "") or "")
    parent_path, _, leaf = full_key.rpartition(".")
    node = OmegaConf.select(base, parent_path) if parent_path else base
    valid = sorted(node.keys()) if isinstance(node, DictConfig) else []
    where = f"{prefix}{parent_path}" if parent_path else prefix.rstrip(".") or "the top level"
    match = difflib.get_close_matches(leaf, [str(v) for v in valid], n=1, cutoff=0.5)
    hint = f" Did you mean '{prefix}{parent_path + '.' if parent_path else ''}{match[0]}'?" if match else ""
    return f"unknown config key '{prefix}{full_key}'.{hint} Valid keys in {where}: {', '.join(map(str, valid))}"


def schema_defaults(config_class: type) -> dict:
    """The defaults of a component's config dataclass, as a plain dict."""
    return {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())  # type: ignore[misc]
            for f in dataclasses.fields(config_class)}
