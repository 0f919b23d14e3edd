"""Stages 1 -> 2 -> 3 of a run, each a Ray Train job; the trainer only wires, the loop is in
`train_loop`. A run is idempotent by id: a stage with `done.json` is never run (or written)
again, an unfinished one resumes from its latest checkpoint. Where a run's files live: mdfer.layout.
"""

from __future__ import annotations

import logging
import json
import os
import signal
import socket
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mdfer.config import Config
from mdfer.console import WorkerConsole
from mdfer.errors import MdferError, root_cause, signal_handler_kept, stop_on_sigterm
from mdfer.dataset import DatasetManifest, read_manifest
from mdfer.layout import (BEST_WEIGHTS_FILE, CHECKPOINT_STATE_FILE, CHECKPOINT_WEIGHTS_FILE, METRICS_FILE,
                          STAGE_CHECKPOINTS_DIR, STAGE_DONE_FILE, TENSORBOARD_DIR, run_key, stage_key)
from mdfer.runs import check_dataset_matches, seal_run, start_run
from mdfer.storage import Store, file_exists
from mdfer.stream import EpochPlan, eval_dataset, plan_epoch, train_datasets
from mdfer.train_loop import VAL_DATASET, train_stage

if TYPE_CHECKING:
    import ray.train

log = logging.getLogger(__name__)


# On a small machine the Train actors use up Ray's idle-worker allowance (one per CPU), so the
# data stream's task workers were killed after 1 s idle and re-spawned (seconds of imports)
# every epoch. Keep them. Ray expects at most 4x its startup concurrency (one per CPU) of worker
# processes and prints a warning to the console at 8 on 2 cores, which one stage already has
# (its Train controller and worker, Ray Data's tasks and actors). `ray start --head
# --system-config` takes the same settings.
LOCAL_RAY_SYSTEM_CONFIG = {"num_workers_soft_limit": 32, "idle_worker_killing_time_threshold_ms": 600_000,
                           "worker_maximum_startup_concurrency": 8}


def ensure_ray(address: str | None = None, local_resources: dict[str, float] | None = None,
               **init_options) -> None:
    """Join the given cluster (or RAY_ADDRESS, as under `ray job submit`); else start a private one,
    with `local_resources` (custom resources; a running cluster declares its own at `ray start`).

    `address="local"` on purpose: a bare ray.init() would follow a stale /tmp/ray/ray_current_cluster.
    """
    import ray

    from mdfer.logs import VERBOSE, adopt_ray_logging, say_where_logs_are, verbosity
    if ray.is_initialized():
        return
    adopt_ray_logging()
    # workers' output (every library's start-up lines) stays in Ray's session logs unless
    # --verbose; what a person reads comes through mdfer.console
    init_options.setdefault("log_to_driver", verbosity() == VERBOSE)
    init_options.setdefault("configure_logging", verbosity() == VERBOSE)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **init_options)
        stop_on_sigterm()  # again: ray.init replaced it
        say_where_logs_are()
        return
    # Train's placement-group cleaner asks the State API whether a run's controller is alive;
    # with no address it may ask another local cluster's dashboard, hear "not found", and tear
    # this run's workers down. Pin it to this cluster's own dashboard (actors inherit the env).
    port = init_options.pop("dashboard_port", None) or _free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(address="local", dashboard_port=port, _system_config=LOCAL_RAY_SYSTEM_CONFIG,
             resources=local_resources, **init_options)
    stop_on_sigterm()
    say_where_logs_are()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def class_weights(config: Config, manifest: DatasetManifest) -> dict[str, list[float]]:
    """Inverse-frequency weights over the train split, mean 1 per dataset (rare classes count more)."""
    if not config.train.class_weighting:
        return {}
    weights = {}
    for name, classes in ((d.name, d.classes) for d in config.data.domains):
        counts = np.array([manifest.counts[name]["train"][c] for c in classes], float)
        inverse = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / len(classes), 0.0)
        weights[name] = (inverse / inverse[counts > 0].mean()).tolist()
    return weights


def fit_stage(config: Config, store: Store, run_id: str, stage_index: int, manifest: DatasetManifest,
              init_weights: str | None, folder: str | None = None,
              callbacks: list | None = None, console: bool = False) -> "ray.train.Result":
    """One stage as a Ray Train run; returns Ray's Result. `folder` (a store key; default the
    run's stage folder) holds its checkpoints and TensorBoard files; `callbacks` go to Ray Train
    (a Tune trial passes TuneReportCallback); `console`: show the workers' epoch lines and
    progress here (the driver of `mdfer train`)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer  # TensorflowTrainer's base

    from mdfer.multiworker import MultiWorkerTensorflow

    stage = config.train.stages[stage_index]
    folder = folder or stage_key(run_key(run_id), stage.name)
    workers = config.train.workers
    check_cpus_left_for_data(config)
    plan = plan_epoch(manifest, config, workers)
    datasets = train_datasets(store, manifest, config, plan, stage_index)
    datasets[VAL_DATASET] = eval_dataset(store, manifest, config, "val")
    shown = WorkerConsole() if console else nullcontext()
    trainer = DataParallelTrainer(  # a TensorflowTrainer whose controller loads no TensorFlow
        train_stage, backend_config=MultiWorkerTensorflow(),
        train_loop_config={
            "config": config.to_dict(), "config_source": config.source, "stage_index": stage_index,
            "plan": plan_as_dict(plan), "init_weights": init_weights,
            "tensorboard_uri": store.key_uri(f"{folder}/{TENSORBOARD_DIR}"),
            "class_weights": class_weights(config, manifest),
            "console": shown.queue if console else None,
        },
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=config.train.gpus_per_worker > 0,
            placement_strategy=config.train.placement_strategy,
            resources_per_worker={"CPU": config.train.cpus_per_worker,
                                  **({"GPU": config.train.gpus_per_worker} if config.train.gpus_per_worker else {})}),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[n for n in datasets if n != VAL_DATASET]),
        run_config=RunConfig(
            name=STAGE_CHECKPOINTS_DIR, storage_path=store.path(folder), storage_filesystem=store.fs,
            callbacks=callbacks,
            failure_config=FailureConfig(max_failures=config.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="val_macro_f1",
                                               checkpoint_score_order="max")),
    )
    try:
        with shown, signal_handler_kept(signal.SIGINT):
            result = trainer.fit()
    except SystemExit as exc:  # how fit() ends after its SIGINT handler aborted the run (Ctrl-C or,
        raise KeyboardInterrupt from exc  # through mdfer.errors.stop_on_sigterm, SIGTERM): "interrupted"
    except Exception as exc:  # Ray wraps the workers' errors; the last error line is the cause
        raise MdferError(f"{stage.name}: training failed: {root_cause(exc)}") from exc
    if result.error:
        raise MdferError(f"{stage.name}: training failed: {root_cause(result.error)}")
    return result


def check_store_shared(store: Store) -> None:
    """Checkpoints and weights go to the store from whichever node a worker runs on, and a stage
    resumes from them anywhere: a local folder is seen by one node only, so on a cluster of
    several nodes it is refused before any work (an s3:// store serves every node)."""
    import ray
    if store.is_s3:
        return
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if len(nodes) > 1:
        raise MdferError(f"store {store.uri}: a local folder, but the Ray cluster has {len(nodes)} nodes and "
                         f"the others cannot see it; use an s3:// store (--store s3://BUCKET/PREFIX)")


def check_cpus_left_for_data(config: Config, runs: int = 1) -> None:
    """Ray Data's decode tasks need CPUs the Train workers do not hold, or the stream stalls.
    `runs`: Train runs at the same time (a sweep's concurrent trials)."""
    import ray
    total = ray.cluster_resources().get("CPU", 0)
    held = runs * config.train.workers * config.train.cpus_per_worker
    if total - held < 0.5:
        times = f"{runs} concurrent trials x " if runs > 1 else ""
        raise MdferError(f"{config.source}: {times}train.workers x train.cpus_per_worker = {held:g} CPUs of "
                         f"the cluster's {total:g}; leave at least half a CPU (better one) for the data stream "
                         f"(e.g. train.cpus_per_worker: {max(0.25, (total - 1) / runs / config.train.workers):g})")


def plan_as_dict(plan: EpochPlan) -> dict:
    return {"domains": list(plan.domains), "per_worker_batch": plan.per_worker_batch,
            "steps_per_epoch": plan.steps_per_epoch, "num_workers": plan.num_workers}


def _best_checkpoint(result) -> tuple[object, dict]:
    """The checkpoint with the highest val_macro_f1; the earlier epoch wins a tie."""
    candidates = [(c, m) for c, m in result.best_checkpoints if m.get("val_macro_f1") is not None]
    if not candidates:
        raise MdferError("the stage reported no checkpoint")
    return max(candidates, key=lambda cm: (cm[1]["val_macro_f1"], -cm[1]["epoch"]))


def _seal_stage(store: Store, run_id: str, stage_name: str, result) -> dict:
    """Copy the best weights next to the stage and write done.json last.

    The history comes from the latest checkpoint's state, which the loop carries across
    restarts; Ray's own metrics table drops the epochs whose checkpoints it deleted."""
    checkpoint, metrics = _best_checkpoint(result)
    with checkpoint.as_directory() as folder:
        weights = (Path(folder) / CHECKPOINT_WEIGHTS_FILE).read_bytes()
        best_state = json.loads((Path(folder) / CHECKPOINT_STATE_FILE).read_text())
    with result.checkpoint.as_directory() as folder:
        history = json.loads((Path(folder) / CHECKPOINT_STATE_FILE).read_text())["history"]
    store.write_bytes(stage_key(run_key(run_id), stage_name, BEST_WEIGHTS_FILE), weights)
    done = {"stage": stage_name, "best": metrics, "evaluation": best_state.get("evaluation"),
            "history": history, "checkpoint": checkpoint.path}
    store.write_json(stage_key(run_key(run_id), stage_name, STAGE_DONE_FILE), done)
    return done


def train_run(config: Config, store: Store, run_id: str, dataset_id: str,
              ray_address: str | None = None) -> dict:
    """All stages of a run, skipping finished ones; returns the run's metrics.json content.
    A finished run (metrics.json present) is left exactly as it is."""
    manifest = read_manifest(store, dataset_id)
    check_dataset_matches(config, manifest)
    start_run(config, store, run_id, dataset_id)
    stages = {}
    init_weights_uri = None
    for index, stage in enumerate(config.train.stages):
        done_key = stage_key(run_key(run_id), stage.name, STAGE_DONE_FILE)
        if store.exists(done_key):
            log.info("%s: already complete in %s, skipped", stage.name, store.key_uri(run_key(run_id)))
            stages[stage.name] = store.read_json(done_key)
        else:
            if index == 0:
                init_weights_uri = initial_weights(config)
            ensure_ray(ray_address)
            check_store_shared(store)
            log.info("%s: training (%d epochs max, %d worker%s)", stage.name, stage.epochs, config.train.workers,
                     "s" if config.train.workers > 1 else "")
            stages[stage.name] = _seal_stage(store, run_id, stage.name,
                                             fit_stage(config, store, run_id, index, manifest, init_weights_uri,
                                                       console=True))
            best = stages[stage.name]["best"]
            log.info("%s: done, best val_macro_f1 %.4f at epoch %d", stage.name, best["val_macro_f1"], best["epoch"])
        init_weights_uri = store.key_uri(stage_key(run_key(run_id), stage.name, BEST_WEIGHTS_FILE))
    if store.exists(run_key(run_id, METRICS_FILE)):
        return store.read_json(run_key(run_id, METRICS_FILE))
    return seal_run(store, run_key(run_id), run_id, dataset_id, stages)


def initial_weights(config: Config) -> str | None:
    """Stage 1's starting point; a weights file must exist before any cluster time is spent."""
    weights = config.model.weights
    if weights.lower() in ("none", "imagenet"):
        return None if weights.lower() == "none" else "imagenet"
    if not file_exists(weights):
        raise MdferError(f"{config.source}: model.weights: {weights} not found")
    return weights
