"""`mdfer evaluate`: a run's best weights (or any weights/.keras file) on a prepared split.

Runs in one process, in split order, without augmentation: the same weights and split always
give the same numbers. Writes metrics.json, one confusion-matrix PNG per head and the
training curves to `runs/<run-id>/report/<split>/`.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Iterator

import numpy as np
import pyarrow.parquet as pq

from mdfer.config import Config, validate
from mdfer.errors import MdferError
from mdfer.ingest import dataset_key, load_manifest
from mdfer.metrics import sum_confusions, summarize
from mdfer.storage import Store, local_copy
from mdfer.stream import EVAL_BATCH, DecodeBatch



def iter_split(store: Store, manifest: dict, split: str, image_size: int,
               batch_size: int = EVAL_BATCH, rows: np.ndarray | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Decoded batches of one split, shard by shard, in the order they were written.
    `rows`: only these sorted row numbers of the split (counted over its shards in order), and
    only they are decoded."""
    if split not in manifest["shards"]:
        raise MdferError(f"dataset {manifest['dataset_id']} has no split {split!r} "
                         f"(it has {', '.join(manifest['shards'])})")
    decode = DecodeBatch(image_size)
    offset = 0
    for shard in manifest["shards"][split]:
        table = pq.read_table(io.BytesIO(store.read_bytes(f"{dataset_key(manifest['dataset_id'])}/{shard['file']}")),
                              columns=["image", "domain_index", "label"])
        if rows is not None:
            local = rows[(rows >= offset) & (rows < offset + table.num_rows)] - offset
            offset += table.num_rows
            table = table.take(local)
        for start in range(0, table.num_rows, batch_size):
            chunk = table.slice(start, batch_size)
            yield decode({name: chunk.column(name).to_numpy(zero_copy_only=False)
                          for name in ("image", "domain_index", "label")})


def evaluate_model(model, store: Store, manifest: dict, split: str, classes: dict[str, list[str]],
                   image_size: int) -> dict:
    def predict(images: np.ndarray) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in model(images.astype(np.float32), training=False).items()}

    totals = sum_confusions(iter_split(store, manifest, split, image_size), predict, classes)
    if not any(matrix.sum() for matrix in totals.values()):
        raise MdferError(f"dataset {manifest['dataset_id']}: split {split!r} is empty")
    return summarize(totals, classes)


def load_for_eval(config: Config, weights_uri: str):
    """Build the configured model and load weights (a .weights.h5 or .keras, local or s3://)."""
    from mdfer.model import load_weights_file, model_from_config
    model = model_from_config(config)
    with tempfile.TemporaryDirectory() as folder:
        load_weights_file(model, local_copy(weights_uri, folder))
    return model


def evaluate_run(store: Store, run_id: str, split: str = "test", weights: str | None = None,
                 inference_lowpass: int | None = None) -> dict:
    """Score a finished run's final weights (or `weights`, e.g. a stage's best of an unfinished
    run) on a split, with the run's own config (image size and class order must match the
    weights), and write the report beside the run. `inference_lowpass` other than the run's
    own: what that blur would do to a run already trained (a shift found afterwards); its
    report goes to report/<split>-lowpass<w>/, beside the run's own."""
    from mdfer.report import write_report
    from mdfer.stages import HAILO_WEIGHTS, check_dataset_matches, run_config, run_key
    finished = store.exists(run_key(run_id, "metrics.json"))
    if not finished and not (weights and store.exists(run_key(run_id, "run.json"))):
        raise MdferError(f"{store.key_uri(run_key(run_id))}: no finished run with this id (train it first, "
                         f"or name a checkpoint of it with --weights)")
    config = run_config(store, run_id)
    report = run_key(run_id, "report", split)
    if inference_lowpass is not None and inference_lowpass != config.model.inference_lowpass:
        config.model.inference_lowpass = inference_lowpass
        config.source = "--inference-lowpass"
        validate(config)  # names the option and what is wrong with the value
        report = run_key(run_id, "report", f"{split}-lowpass{inference_lowpass}")
    history = store.read_json(run_key(run_id, "metrics.json")) if finished else None
    dataset_id = store.read_json(run_key(run_id, "run.json"))["dataset_id"]
    manifest = load_manifest(store, dataset_id)
    check_dataset_matches(config, manifest)
    weights = weights or store.key_uri(run_key(run_id, HAILO_WEIGHTS))
    model = load_for_eval(config, weights)
    classes = {d.name: d.classes for d in config.data.domains}
    result = evaluate_model(model, store, manifest, split, classes, config.model.image_size)
    result.update(run_id=run_id, dataset_id=dataset_id, split=split, weights=weights,
                  inference_lowpass=config.model.inference_lowpass, report=store.key_uri(report))
    write_report(store, report, result, history)
    return result
