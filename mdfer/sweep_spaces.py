"""The search-space files (tune_spaces/<stage>.yaml): what a stage's sweep may vary, checked
against the config before any cluster time, and a trial's hyperparameters put into a config.
No Ray: `mdfer tune` refuses a bad file in a second."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mdfer.config import DOMAIN_HEAD, Config, build_typed, config_from_dict, read_yaml
from mdfer.errors import ConfigError, MdferError

METRIC = "val_macro_f1"  # ASHA and the choice of the winner follow validation macro-F1 (max)
INIT_KEY = "init_weights"  # a constant in every trial's config: where its weights start
SEARCH_ALGORITHMS = ("random", "optuna")
SCHEDULERS = ("asha", "fifo")
DISTRIBUTIONS = ("loguniform", "uniform", "choice")


@dataclass
class Distribution:
    """One hyperparameter's values: exactly one of these."""

    loguniform: list[float] | None = None  # [low, high], sampled on a log scale
    uniform: list[float] | None = None  # [low, high]
    choice: list[float] | None = None  # the values to pick from


@dataclass
class SearchSpace:
    lr: Distribution | None = None  # the stage's learning rate
    loss_weights: dict[str, Distribution] = field(default_factory=dict)  # head name -> weight
    batch_size: Distribution | None = None  # global batch (stream.batch_size): a choice of integers
    label_smoothing: Distribution | None = None  # train.label_smoothing


@dataclass
class SearchSpec:
    algorithm: str = "random"  # random | optuna (needs `pip install optuna`)
    seed: int = 0


@dataclass
class SchedulerSpec:
    name: str = "asha"  # asha: stop poor trials early on val_macro_f1 | fifo: run every trial out
    grace_period: int = 1  # epochs a trial runs before ASHA may stop it
    reduction_factor: float = 2.0


@dataclass
class StageSweep:
    """A stage's sweep, from tune_spaces/<stage>.yaml."""

    space: SearchSpace
    search: SearchSpec = field(default_factory=SearchSpec)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    num_samples: int = 8
    max_concurrent_trials: int = 1
    source: str = "<sweep>"

    def parameters(self) -> dict[str, Distribution]:
        """Flat names (`lr`, `loss_weights.fane`, ...) -> distribution, as in the results table."""
        space = self.space
        found = {"lr": space.lr, **{f"loss_weights.{h}": d for h, d in space.loss_weights.items()},
                 "batch_size": space.batch_size, "label_smoothing": space.label_smoothing}
        return {name: d for name, d in found.items() if d is not None}


def load_sweeps(config: Config, spaces_dir: str | Path) -> list[StageSweep]:
    """`<spaces_dir>/<stage>.yaml` for every stage of `config`, each validated against it."""
    return [load_sweep(Path(spaces_dir) / f"{stage.name}.yaml", config, index)
            for index, stage in enumerate(config.train.stages)]


def load_sweep(path: Path, config: Config, stage_index: int) -> StageSweep:
    """One search-space file; every error names the file and the dotted key."""
    if not path.is_file():
        raise ConfigError(f"{path}: search space file not found (one per stage of {config.source}: "
                          f"{', '.join(s.name + '.yaml' for s in config.train.stages)})")
    raw = read_yaml(path.read_bytes(), str(path))
    sweep = build_typed(StageSweep, raw, "", str(path))  # the main config's loader: unknown keys, types
    sweep.source = str(path)
    _validate_sweep(sweep, config, stage_index)
    return sweep


def _validate_sweep(sweep: StageSweep, config: Config, stage_index: int) -> None:
    """Ranges, names and choices; every value a trial can draw must give a valid config."""
    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"{sweep.source}: {key}: {message}")

    stage = config.train.stages[stage_index]
    heads = [*config.domain_names(), DOMAIN_HEAD]
    for head in sweep.space.loss_weights:
        need(head in heads, f"space.loss_weights.{head}",
             f"no dataset or head {head!r} in {config.source} (heads: {', '.join(heads)})")
    parameters = sweep.parameters()
    need(bool(parameters), "space", "nothing to search; give lr, loss_weights, batch_size or label_smoothing")
    for name, dist in parameters.items():
        kinds = [kind for kind in DISTRIBUTIONS if getattr(dist, kind) is not None]
        need(len(kinds) == 1, f"space.{name}", "give exactly one of loguniform: [low, high], "
                                               "uniform: [low, high], choice: [values]")
        kind, values = kinds[0], getattr(dist, kinds[0])
        key = f"space.{name}.{kind}"
        if kind == "choice":
            need(len(values) >= 1, key, "give at least one value")
        else:
            need(len(values) == 2, key, f"expected [low, high], got {values}")
            need(values[0] < values[1], key, f"low {values[0]:g} must be < high {values[1]:g}")
            need(kind != "loguniform" or values[0] > 0, key, f"low {values[0]:g} must be > 0 on a log scale")
        if name == "batch_size":
            need(kind == "choice" and all(float(v).is_integer() for v in values), f"space.{name}",
                 "give a choice of whole numbers, e.g. choice: [16, 32]")
            dist.choice = [int(v) for v in values]
        for value in values:  # the ends of a range and every choice: the config's own validation
            try:
                with_hparams(config, stage_index, {name: value})
            except ConfigError as exc:
                need(False, key, f"{value:g} is not valid for {config.source}: "
                                 f"{str(exc).removeprefix(config.source + ': ')}")
    search, scheduler = sweep.search, sweep.scheduler
    need(search.algorithm in SEARCH_ALGORITHMS, "search.algorithm",
         f"unknown search algorithm {search.algorithm!r} (use {', '.join(SEARCH_ALGORITHMS)})")
    if search.algorithm == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            need(False, "search.algorithm", "optuna is not installed (pip install optuna); or use random")
    need(scheduler.name in SCHEDULERS, "scheduler.name",
         f"unknown scheduler {scheduler.name!r} (use {', '.join(SCHEDULERS)})")
    need(1 <= scheduler.grace_period <= stage.epochs, "scheduler.grace_period",
         f"{scheduler.grace_period} must be within 1 and the {stage.epochs} epoch(s) of {stage.name} "
         f"in {config.source}")
    need(scheduler.reduction_factor > 1, "scheduler.reduction_factor", "must be > 1")
    need(sweep.num_samples >= 1, "num_samples", "must be >= 1")
    need(sweep.max_concurrent_trials >= 1, "max_concurrent_trials", "must be >= 1")


def with_hparams(config: Config, stage_index: int, hparams: dict) -> Config:
    """`config` with one trial's hyperparameters (flat names) put in place, validated again."""
    raw = config.to_dict()
    stage = raw["train"]["stages"][stage_index]
    for name, value in hparams.items():
        if name == "lr":
            stage["lr"] = float(value)
        elif name.startswith("loss_weights."):
            stage["loss_weights"][name.split(".", 1)[1]] = float(value)
        elif name == "batch_size":
            raw["stream"]["batch_size"] = int(value)
        elif name == "label_smoothing":
            raw["train"]["label_smoothing"] = float(value)
        else:
            raise MdferError(f"unknown hyperparameter {name!r}")
    return config_from_dict(raw, config.source)


def describe(hparams: dict) -> str:
    """`lr 0.001, loss_weights.domain 0.1`: a trial's hyperparameters on one line."""
    return ", ".join(f"{k} {v:g}" for k, v in hparams.items() if k != INIT_KEY)
