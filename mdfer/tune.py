"""Ray Tune sweeps, one per stage, each trial a Ray Train run of that stage.

A trial is a Tune function trainable that calls `stages.fit_stage` (Train V2: `trainer.fit()`
inside the trial, `TuneReportCallback` passing every epoch's metrics and checkpoint path to
Tune), so a trial can use several Train workers. The trial holds only a custom `tune_slot`
resource (`{"CPU": 0}` is rejected); its Train workers hold the CPUs. Stage N+1's trials start
from the best checkpoint of stage N's sweep. A sweep is idempotent by id: a stage with
`best.yaml` is never swept again, an interrupted one continues with `Tuner.restore`. Where a
sweep's files live (when finished it looks like a finished run to `mdfer export`): mdfer.layout.
The search-space files: mdfer.sweep_spaces; a finished stage's table, picture and winner:
mdfer.sweep_results.
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml
from ray import tune

from mdfer.config import Config, config_from_dict
from mdfer.errors import MdferError
from mdfer.dataset import DatasetManifest, read_manifest
from mdfer.layout import (BEST_TRIAL_FILE, BEST_WEIGHTS_FILE, METRICS_FILE, SWEEP_FILE, TRIALS_CSV, TUNE_DIR,
                          stage_key, sweep_key, trial_key)
from mdfer.logs import VERBOSE, verbosity
from mdfer.runs import check_dataset_matches, seal_run, write_run_record
from mdfer.stages import check_cpus_left_for_data, check_store_shared, ensure_ray, fit_stage, initial_weights
from mdfer.storage import Store
from mdfer.sweep_results import seal_stage_sweep, trial_table
from mdfer.sweep_spaces import (INIT_KEY, METRIC, Distribution, SchedulerSpec, SearchSpec, StageSweep, describe,
                                load_sweeps, with_hparams)

log = logging.getLogger(__name__)
TUNE_SLOT = "tune_slot"  # the custom resource a trial's Tune function holds


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


class TrialLines(tune.Callback):
    """One log line per trial event, so a sweep's progress reads like a training run's."""

    def __init__(self, stage: str):
        self.stage = stage

    def on_trial_start(self, iteration, trials, trial, **info):
        log.info("%s trial %s started: %s", self.stage, trial.trial_id, describe(trial.config))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        log.info("%s trial %s epoch %s: %s %.4f (best %.4f)", self.stage, trial.trial_id, result.get("epoch"),
                 METRIC, result.get(METRIC, float("nan")), result.get("best_val_macro_f1", float("nan")))

    def on_trial_complete(self, iteration, trials, trial, **info):
        log.info("%s trial %s finished after %s epoch(s)", self.stage, trial.trial_id,
                 trial.last_result.get("epoch"))

    def on_trial_error(self, iteration, trials, trial, **info):
        log.warning("%s trial %s failed", self.stage, trial.trial_id)


def run_trial(hparams: dict, *, base: Config, store_uri: str, sweep_id: str, stage_index: int,
              manifest: DatasetManifest, folder: str) -> None:
    """One trial (in its Tune actor): the stage as a Ray Train run with these hyperparameters,
    its checkpoints under `<folder>/trials/<trial-id>/` so a restarted trial resumes them."""
    from ray.tune.integration.ray_train import TuneReportCallback

    config = with_hparams(base, stage_index, {k: v for k, v in hparams.items() if k != INIT_KEY})
    trial_id = tune.get_context().get_trial_id()
    fit_stage(config, Store(store_uri), sweep_id, stage_index, manifest, hparams[INIT_KEY],
              folder=trial_key(folder, trial_id), callbacks=[TuneReportCallback()])


def _tuner(base: Config, store: Store, sweep_id: str, stage_index: int, manifest: DatasetManifest,
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
    return prepare(config, store).dataset_id


def tune_sweep(config: Config, store: Store, sweep_id: str, dataset_id: str, spaces_dir: str | Path,
               ray_address: str | None = None) -> dict:
    """Sweep every stage in order, skipping finished ones; returns the sweep's metrics.json
    content. Stage N+1's trials start from stage N's winning weights and hyperparameters."""
    summary_key = sweep_key(sweep_id, METRICS_FILE)
    if store.exists(summary_key):
        log.info("sweep %s: already complete in %s", sweep_id, store.key_uri(sweep_key(sweep_id)))
        return store.read_json(summary_key)
    sweeps = load_sweeps(config, spaces_dir)  # every space is checked before any cluster time
    manifest = read_manifest(store, dataset_id)
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
            record = seal_stage_sweep(store, sweep_id, index, current, sweep)
            for line in trial_table(store.read_bytes(stage_key(sweep_key(sweep_id), stage.name, TRIALS_CSV)),
                                    list(sweep.parameters())):
                log.info("%s", line)
            log.info("%s: best trial %s, %s %.4f at epoch %d (%s)", stage.name, record["trial_id"], METRIC,
                     record[METRIC], record["epoch"], describe(record["hyperparameters"]))
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

