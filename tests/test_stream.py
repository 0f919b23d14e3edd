"""The Ray Data stream: decoding, domain mixing, equal steps per worker, deterministic eval."""

from __future__ import annotations

import copy
import io
import sys
import time

import numpy as np
from PIL import Image
from ray.data._internal.execution.execution_callback import ExecutionCallback

from mdfer.config import AugmentConfig
from mdfer.dataset import DatasetManifest, DomainClasses, Totals
from mdfer.images import augment_image, decode_image
from mdfer.stream import (IDLE_STEP_SLEEP_S, TRAIN_PREFIX, EpochPlan, IdleBackoff,
                          configure_data_context, eval_dataset, iter_train_batches,
                          plan_epoch, train_datasets)


def manifest_with(train_sizes: dict[str, int]) -> DatasetManifest:
    return DatasetManifest(dataset_id="ds-x", schema_version=1, mdfer_version="0", config={},
                           domains={d: DomainClasses(["a"]) for d in train_sizes},
                           counts={d: {"train": {"a": n}} for d, n in train_sizes.items()},
                           totals=Totals(scanned=sum(train_sizes.values()), accepted=sum(train_sizes.values()),
                                         rejected=0, duplicates=0, duplicate_groups=0, conflicting_label_groups=0),
                           rejected=[], duplicates=[], shards={})


def test_plan_shares_batches_by_size_or_mix(synth_dataset):
    config = copy.deepcopy(synth_dataset["config"])
    config.stream.batch_size = 32
    plan = plan_epoch(manifest_with({"fer2013": 900, "fane": 100}), config, num_workers=2)
    assert plan.per_worker_batch == {"fer2013": 14, "fane": 2}
    assert plan.global_batch_size == 32
    # the epoch shows every image of the dataset that needs most steps once
    assert plan.steps_per_epoch == max(-(-900 // 28), -(-100 // 4))
    config.stream.domain_mix = {"fer2013": 0.5, "fane": 0.5}
    plan = plan_epoch(manifest_with({"fer2013": 900, "fane": 100}), config, num_workers=2)
    assert plan.per_worker_batch == {"fer2013": 8, "fane": 8}
    assert plan.rows_per_epoch("fane") == plan.steps_per_epoch * 16 > 100  # re-drawn: oversampled
    # a tiny dataset still gets one sample per batch
    config.stream.domain_mix = {}
    plan = plan_epoch(manifest_with({"fer2013": 100000, "fane": 10}), config, num_workers=1)
    assert plan.per_worker_batch["fane"] == 1 and sum(plan.per_worker_batch.values()) == 32


def _encoded(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def test_decode_gray_rgba_and_sizes():
    gray = Image.fromarray(np.arange(48 * 48, dtype=np.uint8).reshape(48, 48), "L")
    pixels = np.asarray(decode_image(_encoded(gray, "PNG"), 64))
    assert pixels.shape == (64, 64, 3)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    rgba = Image.new("RGBA", (90, 120), (200, 10, 30, 40))
    pixels = np.asarray(decode_image(_encoded(rgba, "PNG"), 32))
    assert pixels.shape == (32, 32, 3) and tuple(pixels[5, 5]) == (200, 10, 30)


def test_augment_changes_pixels_and_off_is_identity():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    off = AugmentConfig(flip=False, max_shift=0, max_rotation_deg=0, brightness=0, contrast=0)
    assert (augment_image(pixels, off, rng) == pixels).all()
    on = augment_image(pixels, AugmentConfig(), rng)
    assert on.shape == (32, 32, 3) and on.dtype == np.uint8
    assert not (on == pixels).all()


def test_two_workers_get_equal_steps_with_every_dataset_in_every_batch(synth_dataset, ray_session):
    config, store, manifest = (synth_dataset[k] for k in ("config", "store", "manifest"))
    config = copy.deepcopy(config)
    config.model.image_size = 32
    config.stream.batch_size = 16
    plan = plan_epoch(manifest, config, num_workers=2)
    datasets = train_datasets(store, manifest, config, plan)
    splits = {name: ds.streaming_split(2, equal=True) for name, ds in datasets.items()}
    import ray

    @ray.remote(num_cpus=0)
    def consume(shards: dict, plan: EpochPlan) -> list[list[int]]:
        batches = list(iter_train_batches(shards, plan, shuffle_buffer=64))
        return [np.bincount(b["domain"], minlength=2).tolist() for b in batches]

    per_worker = ray.get([consume.remote({n: s[i] for n, s in splits.items()}, plan) for i in range(2)])
    expected = [plan.per_worker_batch["fer2013"], plan.per_worker_batch["fane"]]
    for domain_counts in per_worker:
        assert len(domain_counts) == plan.steps_per_epoch
        assert all(counts == expected for counts in domain_counts)
    assert set(datasets) == {TRAIN_PREFIX + "fer2013", TRAIN_PREFIX + "fane"}


def test_an_epoch_that_takes_a_dataset_exactly_once_streams(synth_dataset, ray_session):
    """The demo pipeline's case: a dataset whose rows fill its share of the epoch exactly (one
    pass, no re-drawn part) streams through Ray Train's split like the others."""
    config, store, manifest = (synth_dataset[k] for k in ("config", "store", "manifest"))
    config = copy.deepcopy(config)
    config.model.image_size = 32
    sizes = manifest.split_sizes("train")
    plan = EpochPlan(("fer2013", "fane"), {"fer2013": 1, "fane": 1}, sizes["fer2013"], 1)
    assert plan.rows_per_epoch("fer2013") == sizes["fer2013"] and plan.rows_per_epoch("fane") != sizes["fane"]
    shards = {name: ds.streaming_split(1, equal=True)[0]
              for name, ds in train_datasets(store, manifest, config, plan).items()}
    batches = list(iter_train_batches(shards, plan))
    assert len(batches) == plan.steps_per_epoch
    fer_labels = np.concatenate([b["label"][b["domain"] == 0] for b in batches])
    classes = config.data.domains[0].classes
    assert np.bincount(fer_labels, minlength=len(classes)).tolist() == \
        [manifest.counts["fer2013"]["train"][c] for c in classes]  # every image once


def _epochs_of_batches(store, manifest, config, epochs: int = 2, shuffle_buffer: int = 64) -> list[str]:
    """A one-worker stage's stream as Ray Train feeds it (streaming_split, one execution per
    epoch): a digest of every epoch's batches, pixels and labels in order."""
    import hashlib

    plan = plan_epoch(manifest, config, num_workers=1)
    shards = {name: ds.streaming_split(1, equal=True)[0]
              for name, ds in train_datasets(store, manifest, config, plan).items()}
    digests = []
    for epoch in range(1, epochs + 1):
        digest = hashlib.sha256()
        for batch in iter_train_batches(shards, plan, shuffle_buffer, seed=epoch):
            digest.update(batch["image"].tobytes() + batch["label"].tobytes())
        digests.append(digest.hexdigest())
    return digests


def test_the_same_seed_gives_the_same_batches_and_every_epoch_its_own(synth_dataset, ray_session):
    """Block order, augmentation (in Ray Data tasks that finish in any order) and the local
    shuffle follow train.seed and the epoch: a run again sees the same batches."""
    config = copy.deepcopy(synth_dataset["config"])
    store, manifest = synth_dataset["store"], synth_dataset["manifest"]
    config.model.image_size = 32
    config.stream.batch_size = 16
    first = _epochs_of_batches(store, manifest, config)
    assert first == _epochs_of_batches(store, manifest, config)
    unshuffled = _epochs_of_batches(store, manifest, config, shuffle_buffer=0)
    assert unshuffled[0] != unshuffled[1]  # a new block order and augmentation every epoch
    config.train.seed += 1
    assert _epochs_of_batches(store, manifest, config, epochs=1)[0] != first[0]


def test_eval_stream_is_deterministic_and_complete(synth_dataset, ray_session):
    config, store, manifest = (synth_dataset[k] for k in ("config", "store", "manifest"))
    config = copy.deepcopy(config)
    config.model.image_size = 32
    first = eval_dataset(store, manifest, config, "val").take_all()
    second = eval_dataset(store, manifest, config, "val").take_all()
    n_val = sum(manifest.split_sizes("val").values())
    assert len(first) == n_val
    key = lambda r: (int(r["domain"]), int(r["label"]), r["image"].tobytes())  # noqa: E731
    assert sorted(map(key, first)) == sorted(map(key, second))
    assert first[0]["image"].shape == (32, 32, 3)
    # reading the shards starts no actor processes of its own (Ray Data's newer Parquet reader
    # started a pool of FooterReader actors on every read: seconds per stage on 2 cores)
    from ray.util.state import list_actors
    assert list_actors(filters=[("class_name", "=", "FooterReader")], raise_on_missing_output=False) == []


class _MarkSteps(ExecutionCallback):
    """Leaves a byte in `path` per scheduling-loop step, wherever the loop runs."""
    path = ""

    def on_execution_step(self, executor) -> None:
        with open(self.path, "ab") as marks:
            marks.write(b".")


class _Operator:
    def __init__(self, active: int, completed: bool = False):
        self.active, self.completed = active, completed

    def num_active_tasks(self) -> int:
        return self.active

    def has_completed(self) -> bool:
        return self.completed


def _step_seconds(executor) -> float:
    started = time.perf_counter()
    IdleBackoff().on_execution_step(executor)
    return time.perf_counter() - started


def test_idle_backoff_pauses_only_an_idle_unfinished_loop():
    from types import SimpleNamespace as Executor

    idle = Executor(_topology={_Operator(0): None, _Operator(0): None}, _shutdown=False)
    assert _step_seconds(idle) >= IDLE_STEP_SLEEP_S
    busy = Executor(_topology={_Operator(0): None, _Operator(2): None}, _shutdown=False)
    finished = Executor(_topology={_Operator(0, completed=True): None}, _shutdown=False)
    stopping = Executor(_topology={_Operator(0): None}, _shutdown=True)
    unknown = Executor()  # another Ray's executor without these attributes: leave it alone
    for executor in (busy, finished, stopping, unknown):  # the best of 3: another test may hold the CPU
        assert min(_step_seconds(executor) for _ in range(3)) < IDLE_STEP_SLEEP_S / 2


def test_backoff_switch_and_it_travels_into_ray_trains_split(ray_session, monkeypatch, tmp_path):
    """Ray Train feeds workers through `streaming_split`, whose loop runs in a SplitCoordinator
    actor: the dataset's context must carry the callbacks there. (What the back-off saves is
    measured in benchmarks/train_throughput.py, variants ray1 vs ray1_spin.)"""
    import ray.cloudpickle
    import ray.data

    context = ray.data.DataContext.get_current()
    saved = list(context.custom_execution_callback_classes)
    # the context travels to the actor, callback classes included; it cannot import this module
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        context.custom_execution_callback_classes[:] = [c for c in saved if c is not IdleBackoff]
        monkeypatch.setenv("MDFER_DATA_IDLE_BACKOFF", "0")
        configure_data_context()
        assert IdleBackoff not in context.custom_execution_callback_classes
        monkeypatch.delenv("MDFER_DATA_IDLE_BACKOFF")
        configure_data_context()
        configure_data_context()  # idempotent
        assert context.custom_execution_callback_classes.count(IdleBackoff) == 1

        _MarkSteps.path = str(tmp_path / "steps")
        context.custom_execution_callback_classes.append(_MarkSteps)
        dataset = ray.data.range(64, override_num_blocks=8).map_batches(lambda b: b, batch_size=8)
        (split,) = dataset.streaming_split(1, equal=True)
        assert sum(len(b["id"]) for b in split.iter_batches(batch_size=8)) == 64
    finally:
        context.custom_execution_callback_classes[:] = saved
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert (tmp_path / "steps").stat().st_size > 0  # the loop in the actor ran our callbacks
