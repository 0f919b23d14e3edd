"""Ray Tune sweeps, one per stage, each trial a Ray Train run of that stage.

A trial is a Tune function trainable that calls `stages.fit_stage` (Train V2: `trainer.fit()`
inside the trial, `TuneReportCallback` passing every epoch's metrics and checkpoint path to
Tune), so a trial can use several Train workers. The trial holds only a custom `tune_slot`
resource (`{"CPU": 0}` is rejected); its Train workers hold the CPUs. Stage N+1's trials start
from the best checkpoint of stage N's sweep. A sweep is idempotent by id: a stage with
`best.yaml` is never swept again, an interrupted one continues with `Tuner.restore`. Where a
sweep's files live (when finished it looks like a finished run to `mdfer export`): mdfer.layout.
"""

from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from ray import tune

from mdfer.config import DOMAIN_HEAD, Config, build_typed, config_from_dict, read_yaml
from mdfer.errors import ConfigError, MdferError
from mdfer.ingest import load_manifest
from mdfer.layout import (BEST_TRIAL_FILE, BEST_WEIGHTS_FILE, METRIC_PLOT_FILE, METRICS_FILE, SWEEP_FILE, TRIALS_CSV,
                          TRIALS_PARQUET, TUNE_DIR, stage_key, sweep_key, trial_key)
from mdfer.logs import VERBOSE, redact, verbosity
from mdfer.stages import (check_cpus_left_for_data, check_store_shared, initial_weights, root_cause,
                          check_dataset_matches, ensure_ray, fit_stage, seal_run, write_run_record)
from mdfer.storage import Store
from mdfer.train_loop import STATE_FILE, WEIGHTS_FILE

log = logging.getLogger(__name__)
METRIC = "val_macro_f1"  # ASHA and the choice of the winner follow validation macro-F1 (max)
TUNE_SLOT = "tune_slot"  # the custom resource a trial's Tune function holds
INIT_KEY = "init_weights"  # a constant in every trial's config: where its weights start
SEARCH_ALGORITHMS = ("random", "optuna")
SCHEDULERS = ("asha", "fifo")
DISTRIBUTIONS = ("loguniform", "uniform", "choice")


# ---------------------------------------------------------------- the search-space files


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


# ---------------------------------------------------------------- Ray Tune


def _param_space(sweep: StageSweep, init_weights: str | None) -> dict:
    """Tune's search space, plus where every trial's weights start (a constant, so each trial's
    recorded config says what it started from)."""
    def domain(dist: Distribution):
        if dist.loguniform:
            return tune.loguniform(*dist.loguniform)
        return tune.uniform(*dist.uniform) if dist.uniform else tune.choice(list(dist.choice))

    return {**{name: domain(dist) for name, dist in sweep.parameters().items()}, INIT_KEY: init_weights}


def _search_algorithm(spec: SearchSpec, concurrent: int):
    """The searcher, limited to `concurrent` live trials (TuneConfig.max_concurrent_trials is
    ignored for a search algorithm given as an object)."""
    if spec.algorithm == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch
        return ConcurrencyLimiter(OptunaSearch(seed=spec.seed), max_concurrent=concurrent)
    from ray.tune.search.basic_variant import BasicVariantGenerator
    return BasicVariantGenerator(max_concurrent=concurrent, random_state=spec.seed)


def _scheduler(spec: SchedulerSpec, epochs: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    if spec.name == "fifo":
        return FIFOScheduler()
    # "epoch", not training_iteration: it stays right when a trial's Train run resumes a checkpoint
    return ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=spec.grace_period,
                         reduction_factor=spec.reduction_factor)


def _trial_dirname(trial) -> str:
    return trial.trial_id


def _describe(hparams: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in hparams.items() if k != INIT_KEY)


class TrialLines(tune.Callback):
    """One log line per trial event, so a sweep's progress reads like a training run's."""

    def __init__(self, stage: str):
        self.stage = stage

    def on_trial_start(self, iteration, trials, trial, **info):
        log.info("%s trial %s started: %s", self.stage, trial.trial_id, _describe(trial.config))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        log.info("%s trial %s epoch %s: %s %.4f (best %.4f)", self.stage, trial.trial_id, result.get("epoch"),
                 METRIC, result.get(METRIC, float("nan")), result.get("best_val_macro_f1", float("nan")))

    def on_trial_complete(self, iteration, trials, trial, **info):
        log.info("%s trial %s finished after %s epoch(s)", self.stage, trial.trial_id,
                 trial.last_result.get("epoch"))

    def on_trial_error(self, iteration, trials, trial, **info):
        log.warning("%s trial %s failed", self.stage, trial.trial_id)


def run_trial(hparams: dict, *, base: Config, store_uri: str, sweep_id: str, stage_index: int,
              manifest: dict, folder: str) -> None:
    """One trial (in its Tune actor): the stage as a Ray Train run with these hyperparameters,
    its checkpoints under `<folder>/trials/<trial-id>/` so a restarted trial resumes them."""
    from ray.tune.integration.ray_train import TuneReportCallback

    config = with_hparams(base, stage_index, {k: v for k, v in hparams.items() if k != INIT_KEY})
    trial_id = tune.get_context().get_trial_id()
    fit_stage(config, Store(store_uri), sweep_id, stage_index, manifest, hparams[INIT_KEY],
              folder=trial_key(folder, trial_id), callbacks=[TuneReportCallback()])


def _tuner(base: Config, store: Store, sweep_id: str, stage_index: int, manifest: dict,
           sweep: StageSweep, init_weights: str | None):
    """A new Tuner for the stage, or the interrupted one restored from the store."""
    stage = base.train.stages[stage_index]
    folder = stage_key(sweep_key(sweep_id), stage.name)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, store_uri=store.uri, sweep_id=sweep_id,
                             stage_index=stage_index, manifest=manifest, folder=folder),
        {TUNE_SLOT: 1})
    experiment = store.path(f"{folder}/{TUNE_DIR}")
    if tune.Tuner.can_restore(experiment, storage_filesystem=store.fs):
        log.info("%s: continuing the interrupted sweep in %s", stage.name, store.key_uri(f"{folder}/{TUNE_DIR}"))
        return tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True,
                                  storage_filesystem=store.fs)
    log.info("%s: sweeping %d trial(s), %d at a time, %s search, %s scheduler", stage.name, sweep.num_samples,
             sweep.max_concurrent_trials, sweep.search.algorithm, sweep.scheduler.name)
    return tune.Tuner(
        trainable,
        param_space=_param_space(sweep, init_weights),
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", search_alg=_search_algorithm(sweep.search, sweep.max_concurrent_trials),
            scheduler=_scheduler(sweep.scheduler, stage.epochs), num_samples=sweep.num_samples,
            trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(name=TUNE_DIR, storage_path=store.path(folder), storage_filesystem=store.fs,
                                  callbacks=[TrialLines(stage.name)],
                                  verbose=1 if verbosity() == VERBOSE else 0))  # TrialLines say it


# ---------------------------------------------------------------- results


def _store_key(store: Store, fs_path: str) -> str:
    """The store key of a path Ray reports (a file-system path, no s3:// scheme)."""
    return fs_path[len(store.root):].lstrip("/")


def _experiment(store: Store, sweep_id: str, stage: str) -> tune.ExperimentAnalysis:
    """The stage's Tune experiment as saved in the store: what `Tuner.restore` would continue."""
    return tune.ExperimentAnalysis(store.path(stage_key(sweep_key(sweep_id), stage, TUNE_DIR)),
                                   storage_filesystem=store.fs)


def _check_finished(analysis: tune.ExperimentAnalysis, sweep: StageSweep, stage: str) -> None:
    """Tune returns normally after Ctrl-C (its trials in memory then all look stopped); the state
    it saved tells: a trial not TERMINATED or ERROR, or trials not yet created, is unfinished."""
    done = sum(trial.status in ("TERMINATED", "ERROR") for trial in analysis.trials)
    if done < max(sweep.num_samples, len(analysis.trials)):
        log.warning("%s: sweep interrupted with %d of %d trial(s) unfinished; run the same command "
                    "again to continue it", stage, sweep.num_samples - done, sweep.num_samples)
        raise KeyboardInterrupt


def _trial_rows(analysis: tune.ExperimentAnalysis, store: Store, names: list[str]) -> tuple[list[dict], list[dict]]:
    """(one row per trial, each trial's reported epochs)."""
    frames = analysis.trial_dataframes
    rows, histories = [], []
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):  # creation order, also after a restore
        frame = frames.get(trial.trial_id)
        reported = []
        if frame is not None and not frame.empty and METRIC in frame:
            frame = frame[frame[METRIC].notna()].drop_duplicates("epoch", keep="last").sort_values("epoch")
            reported = [{k: _plain(v) for k, v in row.items()} for row in frame.to_dict("records")]
        scored = [r for r in reported if r.get("checkpoint_path")]
        best = max(scored, key=lambda r: (r[METRIC], -r["epoch"])) if scored else None
        error = trial.get_error() if trial.status == "ERROR" else None
        rows.append({
            "trial_id": trial.trial_id, "status": trial.status,
            **{name: trial.config.get(name) for name in names},
            METRIC: best[METRIC] if best else None, "best_epoch": best["epoch"] if best else None,
            "epochs_run": len(reported),
            "checkpoint_path": store.key_uri(_store_key(store, best["checkpoint_path"])) if best else None,
            INIT_KEY: trial.config.get(INIT_KEY),
            "seconds_to_first_report": reported[0]["time_total_s"] if reported else None,
            "first_epoch_train_seconds": reported[0]["train_seconds"] if reported else None,
            "error": redact(root_cause(Exception(error))) if error else None,
        })
        histories.append(reported)
    return rows, histories


def _plain(value):
    """A pandas cell as a plain Python value (exact floats; NaN as None) for YAML and JSON."""
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and math.isnan(value) else value


def _winner(rows: list[dict], stage: str) -> int:
    """Index of the trial with the best reported metric; the earlier trial wins a tie."""
    scored = [i for i, row in enumerate(rows) if row[METRIC] is not None]
    if not scored:
        errors = [row["error"] for row in rows if row["error"]]
        raise MdferError(f"{stage}: no trial reported a checkpoint ({len(rows)} trial(s))"
                         + (f"; first error: {errors[0]}" if errors else ""))
    return max(scored, key=lambda i: (rows[i][METRIC], -i))


def _table_bytes(rows: list[dict]) -> tuple[bytes, bytes]:
    """The trials table as CSV and Parquet."""
    import pandas as pd
    frame = pd.DataFrame(rows)
    parquet = io.BytesIO()
    frame.to_parquet(parquet, index=False)
    return frame.to_csv(index=False).encode(), parquet.getvalue()


def trial_table(csv: bytes, names: list[str]) -> list[str]:
    """The stage's trials as an aligned table for the console: id, status, hyperparameters, the
    best val_macro_f1 and its epoch (the winner starred)."""
    import pandas as pd
    frame = pd.read_csv(io.BytesIO(csv))
    best = frame[METRIC].idxmax() if frame[METRIC].notna().any() else None
    header = ["trial", "status", *names, METRIC, "epoch"]
    cells = [[str(row["trial_id"]) + (" *" if i == best else ""), str(row["status"]),
              *(f"{row[n]:.3g}" if isinstance(row[n], float) else str(row[n]) for n in names),
              "-" if pd.isna(row[METRIC]) else f"{row[METRIC]:.4f}",
              "-" if pd.isna(row["best_epoch"]) else str(int(row["best_epoch"]))]
             for i, row in frame.iterrows()]
    widths = [max(len(r[c]) for r in [header, *cells]) for c in range(len(header))]
    return ["  ".join(text.ljust(width) for text, width in zip(r, widths)).rstrip() for r in [header, *cells]]


def metric_png(rows: list[dict], sweep: StageSweep, stage: str, winner: int) -> bytes:
    """val_macro_f1 against each hyperparameter, one panel each; the winner is the red star."""
    from matplotlib.ticker import NullFormatter

    from mdfer.report import figure_png, plt
    parameters = sweep.parameters()
    figure, axes = plt.subplots(1, len(parameters), figsize=(3.6 * len(parameters), 3.4), squeeze=False,
                                sharey=True)
    for axis, (name, dist) in zip(axes[0], parameters.items()):
        for i, row in enumerate(rows):
            if row[METRIC] is not None:
                axis.scatter(row[name], row[METRIC], marker="*" if i == winner else "o",
                             s=160 if i == winner else 40, color="tab:red" if i == winner else "tab:blue")
        if dist.loguniform:  # the whole searched range, ticks at its ends and middle
            low, high = dist.loguniform
            axis.set_xscale("log")
            axis.set_xlim(low / 1.2, high * 1.2)
            ticks = [low, math.sqrt(low * high), high]
            axis.set_xticks(ticks, [f"{t:.2g}" for t in ticks])
            axis.xaxis.set_minor_formatter(NullFormatter())
        elif dist.uniform:
            low, high = dist.uniform
            axis.set_xlim(low - 0.05 * (high - low), high + 0.05 * (high - low))
        else:
            axis.set_xticks(dist.choice)
        axis.set_xlabel(name)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel(METRIC)
    figure.suptitle(f"{stage}: {METRIC} of each trial vs its hyperparameters ({len(rows)} trials)")
    figure.tight_layout()
    return figure_png(figure)


def _seal_stage_sweep(store: Store, sweep_id: str, stage_index: int, base: Config, sweep: StageSweep) -> dict:
    """Table, picture and the winner's weights next to the stage's sweep; best.yaml last."""
    stage = base.train.stages[stage_index].name
    folder = stage_key(sweep_key(sweep_id), stage)
    names = list(sweep.parameters())
    analysis = _experiment(store, sweep_id, stage)
    _check_finished(analysis, sweep, stage)
    rows, histories = _trial_rows(analysis, store, names)
    winner = _winner(rows, stage)
    best_row = rows[winner]
    checkpoint = best_row["checkpoint_path"].removeprefix(store.uri).lstrip("/")  # back to a key
    store.write_bytes(f"{folder}/{BEST_WEIGHTS_FILE}", store.read_bytes(f"{checkpoint}/{WEIGHTS_FILE}"))
    best_metrics = json.loads(store.read_bytes(f"{checkpoint}/{STATE_FILE}"))["history"][-1]
    csv, parquet = _table_bytes(rows)
    store.write_bytes(f"{folder}/{TRIALS_CSV}", csv)
    store.write_bytes(f"{folder}/{TRIALS_PARQUET}", parquet)
    store.write_bytes(f"{folder}/{METRIC_PLOT_FILE}", metric_png(rows, sweep, stage, winner))
    hparams = {name: best_row[name] for name in names}
    record = {
        "stage": stage, "trial_id": best_row["trial_id"], METRIC: best_row[METRIC], "epoch": best_row["best_epoch"],
        "hyperparameters": hparams, "checkpoint_path": best_row["checkpoint_path"], INIT_KEY: best_row[INIT_KEY],
        "best": best_metrics, "history": [{k: r.get(k) for k in best_metrics} for r in histories[winner]],
        "config": with_hparams(base, stage_index, hparams).to_dict(),
    }
    store.write_bytes(f"{folder}/{BEST_TRIAL_FILE}", yaml.safe_dump(record, sort_keys=False).encode())  # last
    return record


# ---------------------------------------------------------------- the sweep


def _start_sweep(config: Config, store: Store, sweep_id: str, dataset_id: str) -> None:
    """Record what the sweep is; refuse to continue a sweep id under another config or dataset."""
    key = sweep_key(sweep_id, SWEEP_FILE)
    if store.exists(key):
        recorded = store.read_json(key)
        if (config_from_dict(recorded["config"], store.key_uri(key)).identity() != config.identity()
                or recorded["dataset_id"] != dataset_id):
            raise MdferError(f"{store.key_uri(sweep_key(sweep_id))}: this sweep id was started with a "
                             f"different config or dataset ({recorded['dataset_id']}); use a new --sweep-id")
        return
    store.write_json(key, {"sweep_id": sweep_id, "dataset_id": dataset_id, "config_source": config.source,
                           "config": config.to_dict()})


def sweep_dataset(config: Config, store: Store, sweep_id: str, dataset_id: str | None) -> str:
    """The dataset given; else the one the sweep was started on; else prepare it (a no-op when
    the store already holds it)."""
    if dataset_id:
        return dataset_id
    if store.exists(sweep_key(sweep_id, SWEEP_FILE)):
        return store.read_json(sweep_key(sweep_id, SWEEP_FILE))["dataset_id"]
    from mdfer.config import require_roots
    from mdfer.ingest import prepare
    require_roots(config)
    return prepare(config, store)["dataset_id"]


def tune_sweep(config: Config, store: Store, sweep_id: str, dataset_id: str, spaces_dir: str | Path,
               ray_address: str | None = None) -> dict:
    """Sweep every stage in order, skipping finished ones; returns the sweep's metrics.json
    content. Stage N+1's trials start from stage N's winning weights and hyperparameters."""
    summary_key = sweep_key(sweep_id, METRICS_FILE)
    if store.exists(summary_key):
        log.info("sweep %s: already complete in %s", sweep_id, store.key_uri(sweep_key(sweep_id)))
        return store.read_json(summary_key)
    sweeps = load_sweeps(config, spaces_dir)  # every space is checked before any cluster time
    manifest = load_manifest(store, dataset_id)
    check_dataset_matches(config, manifest)
    _start_sweep(config, store, sweep_id, dataset_id)
    current, init_weights, records = config, initial_weights(config), {}
    for index, (stage, sweep) in enumerate(zip(config.train.stages, sweeps)):
        best_key = stage_key(sweep_key(sweep_id), stage.name, BEST_TRIAL_FILE)
        if store.exists(best_key):
            log.info("%s: sweep already complete in %s, skipped", stage.name, store.key_uri(best_key))
            record = yaml.safe_load(store.read_bytes(best_key))
        else:
            slots = max(s.max_concurrent_trials for s in sweeps)
            ensure_ray(ray_address, local_resources={TUNE_SLOT: slots})
            _check_tune_slots()
            check_store_shared(store)
            check_cpus_left_for_data(current, sweep.max_concurrent_trials)
            _tuner(current, store, sweep_id, index, manifest, sweep, init_weights).fit()
            record = _seal_stage_sweep(store, sweep_id, index, current, sweep)
            for line in trial_table(store.read_bytes(stage_key(sweep_key(sweep_id), stage.name, TRIALS_CSV)),
                                    list(sweep.parameters())):
                log.info("%s", line)
            log.info("%s: best trial %s, %s %.4f at epoch %d (%s)", stage.name, record["trial_id"], METRIC,
                     record[METRIC], record["epoch"], _describe(record["hyperparameters"]))
        records[stage.name] = record
        current = config_from_dict(record["config"], config.source)
        init_weights = store.key_uri(stage_key(sweep_key(sweep_id), stage.name, BEST_WEIGHTS_FILE))
    write_run_record(store, sweep_key(sweep_id), current, sweep_id, dataset_id)
    return seal_run(store, sweep_key(sweep_id), sweep_id, dataset_id, records)


def _check_tune_slots() -> None:
    import ray
    if ray.cluster_resources().get(TUNE_SLOT, 0) < 1:
        raise MdferError(f"the Ray cluster has no {TUNE_SLOT!r} resource, which each trial's Tune function "
                         f"holds; start its head with: ray start --head --resources '{{\"{TUNE_SLOT}\": 4}}'")

