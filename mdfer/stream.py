"""The Ray Data stream: shards -> decoded, resized, augmented, domain-mixed batches.

Driver side, `plan_epoch` fixes how many samples of each dataset go into every batch and how
many steps an epoch has; `train_datasets` builds one Ray Dataset per dataset holding exactly
steps x per-batch rows, so Ray Train's equal split gives every worker the same number of steps
(unequal steps hang the collective ops). Worker side, `iter_train_batches` zips the datasets'
batches into mixed batches. Evaluation streams are deterministic: no augmentation, no shuffle.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import ray.data
from ray.data import RandomSeedConfig
from ray.data._internal.execution.execution_callback import ExecutionCallback

from mdfer.config import Config
from mdfer.dataset import DatasetManifest
from mdfer.images import AugmentBatch, DecodeBatch
from mdfer.storage import Store

TRAIN_PREFIX = "train_"  # Ray Train dataset names: train_<domain>
BATCH_KEYS = ("image", "domain", "label")
DECODE_BATCH = 256
BLOCK_ROWS = 512
# Ray Data's decode/augment tasks ask for half a CPU (Ray's default is one): the check in
# stages.check_cpus_left_for_data promises the stream can run with half a CPU left over.
DATA_TASK_CPUS = 0.5


@dataclass(frozen=True)
class EpochPlan:
    """How one epoch is laid out over workers; identical on every worker by construction."""

    domains: tuple[str, ...]
    per_worker_batch: dict[str, int]  # samples of each dataset in one worker's batch
    steps_per_epoch: int
    num_workers: int

    @property
    def global_batch_size(self) -> int:
        return sum(self.per_worker_batch.values()) * self.num_workers

    def rows_per_epoch(self, domain: str) -> int:
        return self.steps_per_epoch * self.per_worker_batch[domain] * self.num_workers


def plan_epoch(manifest: DatasetManifest, config: Config, num_workers: int) -> EpochPlan:
    """Share each worker's batch between datasets by `stream.domain_mix` (default: by size).

    Every dataset gets at least one sample per batch. The epoch is long enough to show the
    dataset that needs most steps each of its images once; the others are re-drawn as needed.
    """
    sizes = manifest.split_sizes("train")
    domains = tuple(d for d in config.domain_names() if sizes.get(d, 0) > 0)
    if not domains:
        raise ValueError("the dataset has no training rows")
    worker_batch = config.stream.batch_size // num_workers
    if worker_batch < len(domains):
        raise ValueError(f"a worker batch of {worker_batch} cannot hold {len(domains)} datasets")
    weights = {d: config.stream.domain_mix.get(d, 0.0) if config.stream.domain_mix else sizes[d]
               for d in domains}
    missing = [d for d in domains if weights[d] <= 0]
    if missing:
        raise ValueError(f"stream.domain_mix gives no share to {', '.join(missing)}")
    total = sum(weights.values())
    # largest-remainder allocation with a floor of one sample per dataset
    exact = {d: 1 + (worker_batch - len(domains)) * weights[d] / total for d in domains}
    shares = {d: int(exact[d]) for d in domains}
    for d in sorted(domains, key=lambda d: exact[d] - shares[d], reverse=True)[:worker_batch - sum(shares.values())]:
        shares[d] += 1
    steps = max(math.ceil(sizes[d] / (shares[d] * num_workers)) for d in domains)
    return EpochPlan(domains, shares, steps, num_workers)


# ---------------------------------------------------------------- datasets (driver side)


def _shard_paths(store: Store, manifest: DatasetManifest, split: str, domain: str | None = None) -> list[str]:
    return [store.path(key) for key in manifest.shard_keys(split, domain)]


IDLE_STEP_SLEEP_S = 0.01
# "0": leave Ray Data's loop as it is (benchmarks). Read where the datasets are built: the
# driver of `mdfer train` / a `ray job submit` entrypoint, or the trial process of `mdfer tune`.
IDLE_BACKOFF_ENV = "MDFER_DATA_IDLE_BACKOFF"


class IdleBackoff(ExecutionCallback):
    """Ray Data 2.60's scheduling loop only blocks (in `ray.wait`) while some task runs; once
    the stream is ahead of training and every task has finished, it spins at full speed. Ray
    Train runs that loop in its SplitCoordinator actor, where on 2 cores it took a core from
    training (py-spy: 89% of the actor's time in the loop; the real FER2013 run went from 101 to
    127 img/s with this). Pausing 10 ms per idle step costs the stream nothing: it is idle
    because its output waits for a consumer. Relies on the executor's `_topology`; without it
    (another Ray version) it does nothing rather than slow a busy loop."""

    def on_execution_step(self, executor) -> None:
        try:
            operators = executor._topology
            idle = (not executor._shutdown
                    and not any(op.num_active_tasks() for op in operators)
                    and not all(op.has_completed() for op in operators))  # finished: let it end
        except Exception:  # noqa: BLE001 - never let a pause hint break the data stream
            return
        if idle:
            time.sleep(IDLE_STEP_SLEEP_S)


def configure_data_context() -> None:
    """Settings every mdfer Dataset carries into whatever executes it (driver, Ray Train's
    SplitCoordinator): per-operator bars every second from every worker bury the per-epoch lines
    in a job log, so keep one bar per dataset and only where a person watches a terminal; blocks
    in order (tasks finish in any order; a seeded run must see the same batches again); the
    idle back-off above; and Ray Data's first Parquet reader: the newer one (DataSourceV2) starts
    a pool of new actor processes to read a few shard footers on every read, 5-9 processes and
    3-4 s more per stage on 2 cores (measured on the tests' 2,069-row dataset; the same rows)."""
    context = ray.data.DataContext.get_current()
    context.use_datasource_v2 = False
    context.execution_options.preserve_order = True  # blocks reach training in the seeded order
    context.enable_operator_progress_bars = False
    context.enable_progress_bars = sys.stderr.isatty()
    wanted = os.environ.get(IDLE_BACKOFF_ENV, "1") != "0"
    if wanted and IdleBackoff not in context.custom_execution_callback_classes:
        context.custom_execution_callback_classes.append(IdleBackoff)


def _read(store: Store, paths: list[str]) -> ray.data.Dataset:
    """Shards, cut into small blocks: whole-shard blocks meant one decode task per shard, a
    long wait for the first batch, and too few blocks for `randomize_block_order` to shuffle
    (measured in benchmarks/data_throughput.py)."""
    return (ray.data.read_parquet(paths, filesystem=store.fs)
            .select_columns(["image", "domain_index", "label"])
            .repartition(target_num_rows_per_block=BLOCK_ROWS))


def _decoded(store: Store, paths: list[str], size: int) -> ray.data.Dataset:
    """Decoded once and kept in the object store for the whole stage: each epoch then only
    shuffles block order and augments, instead of re-reading and re-decoding every image."""
    return _read(store, paths).map_batches(DecodeBatch(size), batch_size=DECODE_BATCH,
                                             num_cpus=DATA_TASK_CPUS).materialize()


def train_datasets(store: Store, manifest: DatasetManifest, config: Config, plan: EpochPlan,
                   stage_index: int = 0) -> dict[str, ray.data.Dataset]:
    """One augmented dataset per domain, each exactly `plan.rows_per_epoch(domain)` rows long:
    whole passes over the decoded images and, last, the part of one more pass that the epoch
    needs, each pass in its own block order with its own augmentation (Ray Data's union takes a
    block from each pass in turn). Block order and augmentation follow `train.seed`, the stage and
    the epoch (Ray Data's execution index), so the same config and seed give the same batches
    again. The index counts the executions of this stage's datasets: a stage resumed after a
    failure starts it again, and its later epochs draw what its first ones drew."""
    configure_data_context()
    sizes = manifest.split_sizes("train")
    datasets = {}
    for domain_index, domain in enumerate(plan.domains):
        base = _decoded(store, _shard_paths(store, manifest, "train", domain), config.model.image_size)
        needed = plan.rows_per_epoch(domain)
        passes = []
        for copy in range(math.ceil(needed / sizes[domain])):
            seed = [config.train.seed, stage_index, domain_index, copy]
            passes.append(base.randomize_block_order(seed=RandomSeedConfig(seed=int_seed(seed)))
                          .limit(min(sizes[domain], needed - copy * sizes[domain]))
                          .map_batches(AugmentBatch(config.stream.augment, seed), batch_size=DECODE_BATCH,
                                       num_cpus=DATA_TASK_CPUS))
        # a single pass (the epoch takes the dataset exactly once) must not be a union: Ray Data
        # plans a union of one input as an error when the epoch starts
        joined = passes[0].union(*passes[1:]) if len(passes) > 1 else passes[0]
        datasets[TRAIN_PREFIX + domain] = joined.limit(needed)  # limit: a guard
    return datasets


def int_seed(parts: list[int]) -> int:
    """One 63-bit integer from several (Ray Data's seeds are single ints)."""
    return int(np.random.SeedSequence(parts).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


def eval_dataset(store: Store, manifest: DatasetManifest, config: Config, split: str) -> ray.data.Dataset:
    """All rows of a split, decoded once, without augmentation."""
    configure_data_context()
    return _decoded(store, _shard_paths(store, manifest, split), config.model.image_size)


# ---------------------------------------------------------------- batches (worker side)


def iter_train_batches(shards: dict[str, ray.data.DataIterator], plan: EpochPlan,
                       shuffle_buffer: int = 0, seed: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Exactly `plan.steps_per_epoch` mixed batches: each holds every dataset's share. `seed`
    (e.g. from train.seed, stage and epoch) makes the local shuffle repeatable."""
    iterators = {
        d: iter(shards[TRAIN_PREFIX + d].iter_batches(
            batch_size=plan.per_worker_batch[d], drop_last=True, batch_format="numpy",
            local_shuffle_buffer_size=shuffle_buffer or None,
            local_shuffle_seed=None if seed is None or not shuffle_buffer else seed + index))
        for index, d in enumerate(plan.domains)
    }
    for _ in range(plan.steps_per_epoch):
        parts = [next(iterators[d]) for d in plan.domains]
        yield {k: np.concatenate([p[k] for p in parts]) for k in BATCH_KEYS}
    for iterator in iterators.values():  # run each epoch to its end so Ray can start the next
        for _ in iterator:
            pass
