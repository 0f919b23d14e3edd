"""The per-worker loop of one training stage; Ray Train runs `train_stage` on every worker.

Plain code, top to bottom: build the model under MultiWorkerMirroredStrategy (one device when
there is one worker: no gRPC server, no collectives), start from the
latest checkpoint of this stage (after a worker failure or a resubmitted job) or else from the
previous stage's best weights, then epochs of train steps, a sharded validation pass, and one
`ray.train.report` per epoch with a checkpoint. Every worker runs the same number of steps
and reports; rank 0 writes the checkpoint: weights, optimizer state and the loop's state, so a
resumed stage goes on exactly where it stopped (its files: mdfer.layout).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mdfer.config import DOMAIN_HEAD, Config, StageConfig, config_from_dict
from mdfer.console import WorkerSide
from mdfer.layout import CHECKPOINT_OPTIMIZER_FILE, CHECKPOINT_STATE_FILE, CHECKPOINT_WEIGHTS_FILE, new_stage_state
from mdfer.optimizer_state import read_optimizer_file, restore_optimizer, save_optimizer
from mdfer.storage import Store, local_copy
from mdfer.images import EVAL_BATCH
from mdfer.stream import TRAIN_PREFIX, EpochPlan, int_seed, iter_train_batches

VAL_DATASET = "val"


def scheduled_lr(stage: StageConfig, epoch: int, step: int = 0, steps: int = 1) -> float:
    """The learning rate at `step` of `steps` in a stage's epoch (1-based): a linear warm-up over
    `warmup_epochs`, then constant or a cosine from `lr` to `lr_end` at the stage's last step.
    A function of the position alone, so a stage resumed from a checkpoint continues the curve."""
    done = (epoch - 1) + step / steps  # epochs done, fractional
    if done < stage.warmup_epochs:
        return stage.lr * (done + 1 / steps) / stage.warmup_epochs
    if stage.lr_schedule == "cosine":
        progress = (done - stage.warmup_epochs) / (stage.epochs - stage.warmup_epochs)
        return stage.lr_end + (stage.lr - stage.lr_end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return stage.lr


def epoch_lr(stage: StageConfig, epoch: int, steps: int = 1) -> float:
    """The learning rate of an epoch's first step (of `steps`): what its metrics report as `lr`."""
    return scheduled_lr(stage, epoch, 0, steps)


def make_optimizer(name: str, lr: float, weight_decay: float):
    """A new Keras optimizer (call inside strategy.scope()). Weight decay is Keras's decoupled one,
    applied by the optimizer to every trainable variable, scaled by the learning rate."""
    import keras
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=0.9, nesterov=True,
                                    weight_decay=weight_decay or None)
    if name == "adamw":
        return keras.optimizers.AdamW(learning_rate=lr, weight_decay=weight_decay)
    return keras.optimizers.Adam(learning_rate=lr)


def intra_op_threads(cpus: float) -> int:
    """The TensorFlow threads a worker holding `cpus` CPUs computes with."""
    return max(1, round(cpus))


def limit_threads(cpus: float) -> None:
    """One worker, its own CPUs: TensorFlow would otherwise use every core of the node."""
    import tensorflow as tf
    threads = intra_op_threads(cpus)
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(max(2, threads))


def make_strategy(world: int, gpus: float):
    """MultiWorkerMirroredStrategy for several workers (Ray Train set TF_CONFIG); one device
    for one worker: MWMS would start a gRPC server on every interface (TensorFlow binds 0.0.0.0,
    no option) and run collectives with nobody else."""
    import tensorflow as tf
    if world > 1:
        named = json.loads(os.environ.get("TF_CONFIG") or "{}").get("cluster", {}).get("worker", [])
        if len(named) != world:  # else each worker would train alone, silently (mdfer.multiworker sets it)
            raise RuntimeError(f"TF_CONFIG names {len(named)} worker(s), Ray Train started {world}")
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus > 0 else "/cpu:0")


def allreduce_sum(strategy, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Sum numpy arrays over all workers (one traced collective call for the whole dict: an
    eager one costs a warning and a slow path under MultiWorkerMirroredStrategy)."""
    import tensorflow as tf

    @tf.function
    def summed(values):
        local = strategy.run(lambda v: v, args=(values,))
        return {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in local.items()}

    return {k: v.numpy() for k, v in summed({k: tf.constant(v) for k, v in arrays.items()}).items()}


def evaluate_shard(predict_step, batches, classes: dict[str, list[str]], rank: int, world: int,
                   strategy) -> dict:
    """Every worker scores every `world`-th batch; confusion matrices are summed over workers,
    so the numbers equal a single-process pass over the whole split."""
    from mdfer.metrics import sum_confusions, summarize

    def predict(images: np.ndarray) -> dict[str, np.ndarray]:
        padded = np.zeros((EVAL_BATCH, *images.shape[1:]), np.float32)
        padded[:len(images)] = images  # one fixed shape for the traced step
        probs, _ = predict_step({"image": padded})
        return {name: value.numpy()[:len(images)] for name, value in probs.items()}

    mine = (batch for index, batch in enumerate(batches) if index % world == rank)
    return summarize(allreduce_sum(strategy, sum_confusions(mine, predict, classes)), classes)


WORKER_TMP_PREFIX = "mdfer-worker-"  # + "<pid>-": the folder of one Train worker's temporary files


@contextmanager
def worker_temp_folder() -> Iterator[str]:
    """Every temporary file this worker makes goes into one folder of its own (Python's
    `tempfile.tempdir`), removed when the stage ends. Why: a Train worker is a Ray actor, which
    ends without Python's exit handlers, and TensorFlow's autograph writes each traced function's
    source to `/tmp/__autograph_generated_file*.py` and removes it only at exit: dozens of files per
    stage, kept for ever on a long-lived node. A worker killed by SIGKILL (a lost node, `ray job
    stop`) skips `finally` as well, so each new worker first removes the folders its dead
    predecessors left (their pid is in the name)."""
    parent = tempfile.gettempdir()
    remove_dead_workers_folders(parent)
    folder = tempfile.mkdtemp(prefix=f"{WORKER_TMP_PREFIX}{os.getpid()}-", dir=parent)
    previous, tempfile.tempdir = tempfile.tempdir, folder
    try:
        yield folder
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(folder, ignore_errors=True)


def remove_dead_workers_folders(parent: str) -> list[str]:
    """Remove this user's worker folders in `parent` whose worker process is gone; returns their
    names. A live pid (or one now reused by another process) keeps its folder."""
    removed = []
    for folder in Path(parent).glob(f"{WORKER_TMP_PREFIX}*-*"):
        pid = folder.name[len(WORKER_TMP_PREFIX):].split("-", 1)[0]
        try:
            if not pid.isdigit() or folder.is_symlink() or folder.stat().st_uid != os.getuid():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
        except OSError:  # no permission to signal (alive, someone else's), or the folder went meanwhile
            continue
    return removed


class TensorBoard:
    """Scalars per epoch, written locally by rank 0 and copied to the store after each epoch
    (event files cannot go straight to s3://). tensorboardX: TensorFlow 2.21 no longer ships
    the `tensorboard` package its own tf.summary needs. The local folder is a temporary one, so
    it lies in the worker's own folder (`worker_temp_folder`) and goes with it."""

    def __init__(self, uri: str | None):
        from tensorboardX import SummaryWriter
        self.store = Store(uri) if uri else None
        self.folder = tempfile.mkdtemp(prefix="tensorboard-")
        self.writer = SummaryWriter(self.folder)

    def write(self, epoch: int, metrics: dict) -> None:
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "epoch":
                self.writer.add_scalar(name, value, global_step=epoch)
        self.writer.flush()
        if self.store:
            for path in Path(self.folder).iterdir():
                self.store.write_bytes(path.name, path.read_bytes())

    def close(self) -> None:
        self.writer.close()


def _flat_metrics(stage: str, epoch: int, evaluation: dict) -> dict:
    metrics = {"stage": stage, "epoch": epoch, "val_macro_f1": evaluation["macro_f1"],
               "val_domain_accuracy": evaluation["domain_accuracy"]}
    for head, values in evaluation["heads"].items():
        if head != DOMAIN_HEAD:
            metrics[f"val_{head}_macro_f1"] = values["macro_f1"]
            metrics[f"val_{head}_accuracy"] = values["accuracy"]
    return metrics


def epoch_line(stage: str, epoch: int, epochs: int, metrics: dict, evaluation: dict, data_wait: float) -> str:
    """`stage1 epoch 3/18: loss 1.7990, lr 9.9e-04, val macro-F1 0.2270 (fer2013 0.355/0.227,
    sfew 0.281/0.092, domain 0.990), 122 img/s, 1% waiting for data`; per head accuracy/macro-F1."""
    heads = ", ".join(f"{head} {values['accuracy']:.3f}/{values['macro_f1']:.3f}"
                      for head, values in evaluation["heads"].items() if head != DOMAIN_HEAD)
    waiting = 100 * data_wait / max(metrics["train_seconds"], 1e-9)
    return (f"{stage} epoch {epoch}/{epochs}: loss {metrics['loss']:.4f}, lr {metrics['lr']:.1e}, "
            f"val macro-F1 {metrics['val_macro_f1']:.4f} ({heads}, domain {metrics['val_domain_accuracy']:.3f}), "
            f"{metrics['images_per_second']:.0f} img/s, {waiting:.0f}% waiting for data"
            f"{', best' if metrics['is_best'] else ''}")


@dataclass
class StageParts:
    """What one worker trains a stage with, built in the order the steps need (model, then the
    restored weights, then freezing, then a new optimizer and the traced steps, then the
    optimizer's restored state)."""

    strategy: Any
    model: Any
    optimizer: Any
    train_step: Callable
    predict_step: Callable
    state: dict  # layout.new_stage_state's keys: what a checkpoint's state.json holds


def build_stage(config: Config, stage_index: int, plan: EpochPlan, world: int, init_weights: str | None,
                checkpoint, class_weights: dict[str, list[float]], say: Callable[[str], None]) -> StageParts:
    """Model, restored weights (this stage's checkpoint after a failure, else `init_weights`: the
    previous stage's best, a file, or "imagenet"), frozen layers, optimizer and steps; from a
    checkpoint, the optimizer's iteration and slots too (weights only, said so, from a checkpoint
    written before they were saved)."""
    from mdfer.model import load_weights_file, model_from_config, set_trainable_fraction
    from mdfer.steps import make_predict_step, make_train_step

    stage = config.train.stages[stage_index]
    strategy = make_strategy(world, config.train.gpus_per_worker)
    with strategy.scope():  # ImageNet weights only for a fresh start, never under a checkpoint
        model = model_from_config(config, "imagenet" if init_weights == "imagenet" and not checkpoint else None,
                                  training=True, stage_index=stage_index)
    state, saved_optimizer = new_stage_state(), None
    if checkpoint:  # resuming this stage: a worker died or the job was resubmitted
        with checkpoint.as_directory() as folder:  # maybe a temporary download: read it all now
            model.load_weights(Path(folder) / CHECKPOINT_WEIGHTS_FILE)
            state = json.loads((Path(folder) / CHECKPOINT_STATE_FILE).read_text())
            saved_optimizer = read_optimizer_file(Path(folder) / CHECKPOINT_OPTIMIZER_FILE)
    elif init_weights and init_weights != "imagenet":
        with tempfile.TemporaryDirectory() as folder:
            loaded = load_weights_file(model, local_copy(init_weights, folder))
        say(f"{stage.name}: starting from {init_weights} ({', '.join(loaded)})")
    frozen = set_trainable_fraction(model, stage.frozen_fraction)
    with strategy.scope():
        optimizer = make_optimizer(config.train.optimizer, stage.lr, config.train.weight_decay)
    train_step = make_train_step(strategy, model, optimizer, list(config.classes()), stage.loss_weights,
                                 plan.global_batch_size, config.train.label_smoothing,
                                 {k: np.asarray(v, np.float32) for k, v in class_weights.items()})
    if checkpoint:  # the step has built the optimizer's slots: now they can take the saved values
        say(f"{stage.name}: resuming after epoch {state['epoch']}{_resumed_optimizer(optimizer, saved_optimizer)}")
    if state["epoch"] == 0:
        say(f"{stage.name}: lr {stage.lr:g}, frozen {frozen['n_frozen']}/{frozen['n_backbone_layers']} "
            f"backbone layers, {plan.steps_per_epoch} steps x {plan.global_batch_size} images "
            f"per epoch on {world} worker(s)")
    return StageParts(strategy, model, optimizer, train_step, make_predict_step(strategy, model), state)


def _resumed_optimizer(optimizer, saved: dict[str, np.ndarray] | None) -> str:
    """Restore the optimizer's saved state; the end of the resume line says how it went."""
    if saved is None:
        return "; weights only: the checkpoint predates saved optimizer state, the optimizer starts over"
    refused = restore_optimizer(optimizer, saved)
    if refused:
        return f"; weights only: the checkpoint's optimizer state {refused}; the optimizer starts over"
    return f", optimizer at step {int(optimizer.iterations.numpy())}"


def train_epoch(parts: StageParts, stage: StageConfig, epoch: int, batches: Iterator[dict],
                plan: EpochPlan, progress: Callable[[int, float], None]) -> dict:
    """One epoch of train steps, the LR following `scheduled_lr` step by step; returns the
    epoch's loss, LR, time, data wait and img/s."""
    import tensorflow as tf

    per_step_lr = stage.lr_schedule != "constant" or epoch <= stage.warmup_epochs
    start_lr = epoch_lr(stage, epoch, plan.steps_per_epoch)
    parts.optimizer.learning_rate.assign(start_lr)
    started = time.perf_counter()
    loss_sum, steps, data_wait = 0.0, 0, 0.0
    while True:
        waited = time.perf_counter()
        batch = next(batches, None)
        data_wait += time.perf_counter() - waited
        if batch is None:
            break
        batch["image"] = batch["image"].astype(np.float32)
        if per_step_lr and steps:  # step 0's LR is set above
            parts.optimizer.learning_rate.assign(scheduled_lr(stage, epoch, steps, plan.steps_per_epoch))
        loss, _ = parts.train_step({k: tf.constant(v) for k, v in batch.items()})
        loss_sum, steps = loss_sum + float(loss), steps + 1
        progress(steps, time.perf_counter() - started)
    seconds = time.perf_counter() - started
    return {"loss": loss_sum / max(steps, 1), "lr": start_lr, "train_seconds": seconds,
            "data_wait_seconds": data_wait, "images_per_second": steps * plan.global_batch_size / seconds}


def update_state(state: dict, metrics: dict) -> None:
    """Best epoch so far (by val macro-F1) and the epochs since; the metrics get the best's figures."""
    if metrics["val_macro_f1"] > state["best_macro_f1"]:
        state.update(best_macro_f1=metrics["val_macro_f1"], best_epoch=metrics["epoch"], since_best=0)
    else:
        state["since_best"] += 1
    state["epoch"] = metrics["epoch"]
    state["history"].append(metrics)
    metrics.update(best_val_macro_f1=state["best_macro_f1"], best_epoch=state["best_epoch"],
                   is_best=state["best_epoch"] == metrics["epoch"])


def report_epoch(parts: StageParts, metrics: dict, evaluation: dict, rank: int) -> None:
    """`ray.train.report` on every worker; rank 0 attaches the checkpoint (weights, optimizer
    state, the loop's state)."""
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        saved = None
        if rank == 0:
            parts.model.save_weights(os.path.join(folder, CHECKPOINT_WEIGHTS_FILE))
            save_optimizer(parts.optimizer, os.path.join(folder, CHECKPOINT_OPTIMIZER_FILE))
            Path(folder, CHECKPOINT_STATE_FILE).write_text(json.dumps({**parts.state, "evaluation": evaluation}))
            saved = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=saved)


def train_stage(loop_config: dict) -> None:
    """One stage on one worker; `loop_config` comes from `stages.fit_stage` (plain data only,
    because Ray ships it to every worker)."""
    with worker_temp_folder():
        _train_stage(loop_config)


def _train_stage(loop_config: dict) -> None:
    import keras
    import ray.train

    config: Config = config_from_dict(loop_config["config"], loop_config["config_source"])
    stage_index = loop_config["stage_index"]
    stage = config.train.stages[stage_index]
    plan = EpochPlan(**loop_config["plan"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    limit_threads(config.train.cpus_per_worker)
    keras.utils.set_random_seed(config.train.seed + stage_index)
    if config.train.mixed_precision and config.train.gpus_per_worker > 0:
        keras.mixed_precision.set_global_policy("mixed_float16")
    console = WorkerSide(loop_config.get("console"), muted=rank != 0)
    checkpoint = ray.train.get_checkpoint()
    parts = build_stage(config, stage_index, plan, world, loop_config.get("init_weights"), checkpoint,
                        loop_config.get("class_weights", {}), console.line)
    state = parts.state
    board = TensorBoard(loop_config.get("tensorboard_uri")) if rank == 0 else None
    train_shards = {TRAIN_PREFIX + d: ray.train.get_dataset_shard(TRAIN_PREFIX + d) for d in plan.domains}
    val_shard = ray.train.get_dataset_shard(VAL_DATASET)
    reported = False
    try:
        for epoch in range(state["epoch"] + 1, stage.epochs + 1):
            if state["since_best"] >= stage.patience:  # also right after a restart: no extra epoch
                console.line(f"{stage.name}: early stop, no better val_macro_f1 for {stage.patience} epoch(s)")
                break
            label = f"{stage.name} epoch {epoch}/{stage.epochs}"
            batches = iter_train_batches(train_shards, plan, config.stream.shuffle_buffer,
                                         int_seed([config.train.seed, stage_index, epoch, rank]))
            trained = train_epoch(parts, stage, epoch, batches, plan, lambda steps, seconds: console.progress(
                label, steps, plan.steps_per_epoch, plan.global_batch_size, seconds))
            evaluation = evaluate_shard(parts.predict_step,
                                        val_shard.iter_batches(batch_size=EVAL_BATCH, batch_format="numpy"),
                                        config.classes(), rank, world, parts.strategy)
            metrics = {**_flat_metrics(stage.name, epoch, evaluation), **trained}
            update_state(state, metrics)
            console.line(epoch_line(stage.name, epoch, stage.epochs, metrics, evaluation, trained["data_wait_seconds"]))
            if board:
                board.write(epoch, metrics)
            report_epoch(parts, metrics, evaluation, rank)
            reported = True
    finally:
        if board:
            board.close()  # the event files are in the store; the folder goes with the worker's
    if checkpoint and not reported and state["history"]:
        # Resumed after the stage's last epoch (or its early stop): report that epoch again, so
        # whoever drives this run (a restored Tune trial) gets its result and checkpoint.
        with checkpoint.as_directory() as folder:
            ray.train.report(dict(state["history"][-1]),
                             checkpoint=ray.train.Checkpoint.from_directory(folder) if rank == 0 else None)
