"""A run's records in the store, for every command that trains, sweeps, evaluates or exports:
run.json and config.yaml (what was asked for), the dataset check, and metrics.json (written last:
the run is finished). A finished sweep writes the same records, so it reads like a run. No Ray,
no TensorFlow. Where the files live: mdfer.layout."""

from __future__ import annotations

import hashlib

import yaml

from mdfer.config import Config, config_from_dict
from mdfer.dataset import DatasetManifest
from mdfer.errors import MdferError
from mdfer.layout import BEST_WEIGHTS_FILE, CONFIG_FILE, FINAL_WEIGHTS_FILE, METRICS_FILE, RUN_FILE, run_key, stage_key
from mdfer.storage import Store


def check_dataset_matches(config: Config, manifest: DatasetManifest) -> None:
    """The model's heads come from the config; the shards must hold the same datasets and classes."""
    for domain in config.data.domains:
        found = manifest.domains.get(domain.name)
        if found is None:
            raise MdferError(f"dataset {manifest.dataset_id} has no {domain.name!r} "
                             f"(it holds {', '.join(manifest.domains)}); prepare it with this config")
        if found.classes != domain.classes:
            raise MdferError(f"dataset {manifest.dataset_id}: classes of {domain.name!r} differ "
                             f"from {config.source}: {found.classes} vs {domain.classes}")


def derived_run_id(config: Config, dataset_id: str) -> str:
    """`mdfer pipeline`'s run id when none is given: the config's identity (so any `--set` that
    changes what is trained makes another run) and the dataset; the same again resumes the run."""
    identity = yaml.safe_dump(config.identity(), sort_keys=True) + dataset_id
    return f"run-{hashlib.sha256(identity.encode()).hexdigest()[:10]}"


def read_run_config(store: Store, prefix: str) -> Config:
    """The config a run (or finished sweep) at `prefix` was trained with (what its weights are for)."""
    key = f"{prefix}/{CONFIG_FILE}"
    return config_from_dict(yaml.safe_load(store.read_bytes(key)), store.key_uri(key))


def run_config(store: Store, run_id: str) -> Config:
    """The config run `run_id` was started with."""
    return read_run_config(store, run_key(run_id))


def start_run(config: Config, store: Store, run_id: str, dataset_id: str) -> None:
    """Record what the run is; refuse to continue a run id under a different config or dataset.
    Data roots may differ (a local copy vs s3://): they do not change what is trained."""
    key = run_key(run_id, CONFIG_FILE)
    if store.exists(key):
        run = store.read_json(run_key(run_id, RUN_FILE))
        if run_config(store, run_id).identity() != config.identity() or run["dataset_id"] != dataset_id:
            raise MdferError(f"{store.key_uri(run_key(run_id))}: this run id was started with a "
                             f"different config or dataset ({run['dataset_id']}); use a new --run-id")
        return
    write_run_record(store, run_key(run_id), config, run_id, dataset_id)


def write_run_record(store: Store, prefix: str, config: Config, run_id: str, dataset_id: str) -> None:
    """run.json and config.yaml under `prefix`: what `evaluate` and `export` read about a run
    (or about a finished sweep, which looks like a run to them)."""
    store.write_json(f"{prefix}/{RUN_FILE}", {"run_id": run_id, "dataset_id": dataset_id,
                                               "config_source": config.source})
    store.write_bytes(f"{prefix}/{CONFIG_FILE}", yaml.safe_dump(config.to_dict(), sort_keys=True).encode())


def seal_run(store: Store, prefix: str, run_id: str, dataset_id: str, stages: dict[str, dict]) -> dict:
    """The last stage's best weights as the run's model, then metrics.json, written last: it
    marks the run (or sweep) under `prefix` finished. `stages`: name -> {"best", "history", ...}
    in stage order, each stage's best weights already at `<prefix>/<stage>/best.weights.h5`."""
    last = list(stages)[-1]
    store.write_bytes(f"{prefix}/{FINAL_WEIGHTS_FILE}", store.read_bytes(stage_key(prefix, last, BEST_WEIGHTS_FILE)))
    summary = {"run_id": run_id, "dataset_id": dataset_id, "final_stage": last,
               "val_macro_f1": stages[last]["best"]["val_macro_f1"],
               "stages": {name: {"best": s["best"], "history": s["history"]} for name, s in stages.items()}}
    store.write_json(f"{prefix}/{METRICS_FILE}", summary)
    return summary
