"""`mdfer evaluate`: a run's best weights (or any weights/.keras file) on a prepared split, or
a run or any exported model on labelled class folders that were never part of its run.

Runs in one process, in split order, without augmentation: the same weights and split always
give the same numbers. Writes metrics.json, one confusion-matrix PNG per head and the
training curves to `runs/<run-id>/report/<split>/`. Class folders (`--data NAME=PATH`) are
checked, de-duplicated and stored exactly as `prepare` does (a dataset of one "test" split),
then scored the same way; their report goes to `runs/<run-id>/report/data-<dataset-id>/`, or
for an exported model to `evaluations/<model>-<sha>/<dataset-id>/`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs

from mdfer.config import DOMAIN_HEAD, Config, DataConfig, DomainConfig, TrainConfig, validate
from mdfer.errors import ConfigError, DataError, MdferError
from mdfer.dataset import DatasetManifest, iter_split, read_manifest
from mdfer.ingest import prepare
from mdfer.layout import (FINAL_WEIGHTS_FILE, FLIP_SUFFIX, HEADS_FILE, METRICS_FILE, RUN_FILE, data_report_name,
                          model_report_key, report_key, run_key, split_report_name)
from mdfer.metrics import sum_confusions, summarize
from mdfer.runs import check_dataset_matches, run_config
from mdfer.storage import Store, resolve, storage_error

FOLDER_SPLIT = "test"  # class folders given to evaluate become a dataset of this one split
Predict = Callable[[np.ndarray], dict[str, np.ndarray]]


def keras_predict(model) -> Predict:
    """A Keras model as a `Predict`: float32 0..255 images -> {head: probabilities}."""
    def predict(images: np.ndarray) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in model(images.astype(np.float32), training=False).items()}
    return predict


def with_flip(predict: Predict) -> Predict:
    """Test-time augmentation: the mean of the probabilities of each image and its mirror image
    (faces are near-symmetric, and training flips them, so both views are in-distribution)."""
    def flipped(images: np.ndarray) -> dict[str, np.ndarray]:
        plain, mirrored = predict(images), predict(np.ascontiguousarray(images[:, :, ::-1]))
        return {name: (plain[name] + mirrored[name]) / 2 for name in plain}
    return flipped


def evaluate_model(predict: Predict, store: Store, manifest: DatasetManifest, split: str, classes: dict[str, list[str]],
                   image_size: int, flip: bool = False, domain_index: np.ndarray | None = None) -> dict:
    """Score a model on a prepared split. `domain_index`: the model's domain index of each of the
    dataset's domains, when the dataset holds only some of the model's datasets, or holds them in
    another order."""
    if flip:
        predict = with_flip(predict)
    batches = iter_split(store, manifest, split, image_size)
    if domain_index is not None:
        batches = ({**batch, "domain": domain_index[batch["domain"]]} for batch in batches)
    totals = sum_confusions(batches, predict, classes)
    if not any(matrix.sum() for matrix in totals.values()):
        raise MdferError(f"dataset {manifest.dataset_id}: split {split!r} is empty")
    return summarize(totals, classes)


def _require_run(store: Store, run_id: str, weights: str | None) -> bool:
    """Whether the run is finished; an error unless it is, or was started and `weights` name a
    checkpoint of it."""
    finished = store.exists(run_key(run_id, METRICS_FILE))
    if not finished and not (weights and store.exists(run_key(run_id, RUN_FILE))):
        raise MdferError(f"{store.key_uri(run_key(run_id))}: no finished run with this id (train it first, "
                         f"or name a checkpoint of it with --weights)")
    return finished


def evaluate_run(store: Store, run_id: str, split: str = "test", weights: str | None = None,
                 inference_lowpass: int | None = None, flip: bool = False) -> dict:
    """Score a finished run's final weights (or `weights`, e.g. a stage's best of an unfinished
    run) on a split, with the run's own config (image size and class order must match the
    weights), and write the report beside the run. `inference_lowpass` other than the run's
    own: what that blur would do to a run already trained (a shift found afterwards); its
    report goes to report/<split>-lowpass<w>/, beside the run's own."""
    from mdfer.model import model_with_weights  # TensorFlow: only once the run is known
    from mdfer.report import write_report
    finished = _require_run(store, run_id, weights)
    config = run_config(store, run_id)
    report = report_key(run_id, split_report_name(split))
    if inference_lowpass is not None and inference_lowpass != config.model.inference_lowpass:
        config.model.inference_lowpass = inference_lowpass
        config.source = "--inference-lowpass"
        validate(config)  # names the option and what is wrong with the value
        report = report_key(run_id, split_report_name(split, inference_lowpass))
    if flip:
        report += FLIP_SUFFIX
    history = store.read_json(run_key(run_id, METRICS_FILE)) if finished else None
    dataset_id = store.read_json(run_key(run_id, RUN_FILE))["dataset_id"]
    manifest = read_manifest(store, dataset_id)
    check_dataset_matches(config, manifest)
    weights = weights or store.key_uri(run_key(run_id, FINAL_WEIGHTS_FILE))
    model = model_with_weights(config, weights)
    classes = config.classes()
    result = evaluate_model(keras_predict(model), store, manifest, split, classes, config.model.image_size, flip)
    result.update(run_id=run_id, dataset_id=dataset_id, split=split, weights=weights, flip_tta=flip,
                  inference_lowpass=config.model.inference_lowpass, report=store.key_uri(report))
    write_report(store, report, result, history)
    return result


# ---------------------------------------------------------------- labelled class folders


def _check_class_folders(domain: DomainConfig) -> None:
    """Before reading every file: the root must hold at least one class folder of this dataset,
    else the usual mistake (the dataset's root with train/ and test/ in it) would reject every
    file one by one."""
    fs, root = resolve(domain.root)
    try:
        info = fs.get_file_info(root)
        entries = fs.get_file_info(pafs.FileSelector(root)) if info.type == pafs.FileType.Directory else None
    except Exception as exc:
        raise storage_error(domain.root, exc) from None
    if entries is None:
        raise DataError(f"--data {domain.name}={domain.root}: not a folder")
    folders = sorted(e.base_name for e in entries if e.type == pafs.FileType.Directory)
    known = {f.lower() for f in domain.folders}
    if not any(f.lower() in known for f in folders):
        raise DataError(f"--data {domain.name}={domain.root}: no class folder of {domain.name} in it "
                        f"(found {', '.join(folders) or 'no folders'}; expected some of "
                        f"{', '.join(sorted(domain.folders))}); point it at the folder that holds the class folders")


def prepare_folders(store: Store, domains: list[DomainConfig], checks: DataConfig) -> DatasetManifest:
    """The class folders as a dataset in the store (every file checked as `prepare` checks it,
    with the limits of `checks`, exact duplicates dropped, all of it one split); returns its
    manifest. Content-derived id: scoring the same folders again reuses it."""
    data = dataclasses.replace(checks, domains=domains)
    return prepare(Config(data=data, train=TrainConfig(stages=[]), source="--data"), store)


def _folder_domain(name: str, path: str, classes: dict[str, list[str]], folders: dict[str, dict[str, str]]) -> DomainConfig:
    if name not in classes or name == DOMAIN_HEAD:
        raise ConfigError(f"--data {name}=...: the model has no dataset {name!r} "
                          f"(it has {', '.join(n for n in classes if n != DOMAIN_HEAD)})")
    domain = DomainConfig(name=name, classes=list(classes[name]), folders=dict(folders[name]),
                          splits={FOLDER_SPLIT: ""}, root=path)
    _check_class_folders(domain)
    return domain


def _score_folders(store: Store, load: Callable[[], tuple[Predict, int]], classes: dict[str, list[str]],
                   domains: list[DomainConfig], checks: DataConfig, flip: bool, report_prefix: Callable[[str], str],
                   **facts) -> dict:
    """Prepare the folders, then (only then: a bad folder costs no model load) load the model
    with `load() -> (predict, image size)` and score it."""
    from mdfer.report import write_report
    manifest = prepare_folders(store, domains, checks)
    predict, image_size = load()
    order = list(classes)  # the model's domain order
    domain_index = np.asarray([order.index(d.name) for d in domains])
    result = evaluate_model(predict, store, manifest, FOLDER_SPLIT, classes, image_size, flip, domain_index)
    report = report_prefix(manifest.dataset_id) + (FLIP_SUFFIX if flip else "")
    stored = manifest.to_dict()
    result.update(**facts, dataset_id=manifest.dataset_id, data={d.name: d.root for d in domains},
                  split=FOLDER_SPLIT, flip_tta=flip, totals=stored["totals"], rejected=stored["rejected"],
                  summary=manifest.summary_lines(), report=store.key_uri(report))
    result["heads"] = {name: metrics for name, metrics in result["heads"].items()
                       if metrics["n"] or name == DOMAIN_HEAD}
    write_report(store, report, result, None)
    return result


def evaluate_run_on_folders(store: Store, run_id: str, data: dict[str, str], weights: str | None = None,
                            flip: bool = False) -> dict:
    """A finished run's final weights on class folders: each dataset name is one of the run's,
    its folders mapped through the run config's folder map for it."""
    from mdfer.model import model_with_weights
    _require_run(store, run_id, weights)
    config = run_config(store, run_id)
    classes = config.classes()
    domains = [_folder_domain(name, path, classes, {d.name: d.folders for d in config.data.domains})
               for name, path in data.items()]
    weights = weights or store.key_uri(run_key(run_id, FINAL_WEIGHTS_FILE))
    return _score_folders(store, lambda: (keras_predict(model_with_weights(config, weights)), config.model.image_size),
                          classes, domains, config.data, flip,
                          lambda ds: report_key(run_id, data_report_name(ds)), run_id=run_id, weights=weights)


def evaluate_model_file(store: Store, model_path: str, data: dict[str, str], config: Config | None = None,
                        flip: bool = False) -> dict:
    """An exported .keras/.tflite/.onnx (with its heads.json) on class folders. The class lists
    and the domain order come from heads.json; folder names map to classes case-insensitively,
    or through `config`'s folder maps when one is given."""
    from mdfer.predict import head_classes, open_model
    if not Path(model_path).is_file():
        raise MdferError(f"{model_path}: model file not found")
    heads = head_classes(model_path)
    if not heads:
        raise MdferError(f"{model_path}: no {HEADS_FILE} beside it (every mdfer export has one: it names "
                         f"the heads and their classes)")
    if DOMAIN_HEAD not in heads:
        raise MdferError(f"{Path(model_path).with_name(HEADS_FILE)}: no {DOMAIN_HEAD!r} head listed")
    classes = {name: heads[name] for name in heads[DOMAIN_HEAD]}  # the model's domain order
    folders = {name: {c: c for c in cls} for name, cls in classes.items()}
    if config is not None:
        for d in config.data.domains:
            if d.name in folders:
                if d.classes != classes[d.name]:
                    raise ConfigError(f"{config.source}: dataset {d.name}: classes {d.classes} differ from "
                                      f"the model's {classes[d.name]}")
                folders[d.name] = d.folders
    domains = [_folder_domain(name, path, classes, folders) for name, path in data.items()]

    def load() -> tuple[Predict, int]:
        runner = open_model(model_path)
        missing = [name for name in (*classes, DOMAIN_HEAD) if name not in runner.heads]
        if missing:
            raise MdferError(f"{model_path}: its outputs ({', '.join(runner.heads)}) lack {', '.join(missing)} "
                             f"named in {HEADS_FILE}")
        return runner, runner.image_size

    digest = hashlib.sha256(Path(model_path).read_bytes()).hexdigest()[:12]
    checks = config.data if config is not None else DataConfig(domains=[])
    return _score_folders(store, load, classes, domains, checks, flip,
                          lambda ds: model_report_key(Path(model_path).stem, digest, ds),
                          model=str(model_path), model_sha256_12=digest)
