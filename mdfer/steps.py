"""Distributed train and predict steps, written by hand.

Keras 3 `model.fit` fails under a multi-worker MultiWorkerMirroredStrategy
(keras-team/keras#20585), so training is `strategy.run` inside a `tf.function`.

Contract for the caller (one stage):

    with strategy.scope():
        model = build_model(...)                 # variables must be created in scope
    set_trainable_fraction(model, frozen)        # BEFORE the optimizer and the step
    with strategy.scope():
        optimizer = keras.optimizers.Adam(lr)   # a NEW optimizer for every stage
    step = make_train_step(strategy, model, optimizer, ...)
    for batch in batches:                        # same number of steps on every worker
        loss, parts = step(batch)

A batch is a dict of tensors {"image", "domain", "label"}: either a plain per-worker batch
(one replica per worker, which is what Ray Train on CPU gives) or a per-replica value from
`strategy.experimental_distribute_dataset`. With several local replicas, distribute first:
a plain batch would be fed whole to every replica.
"""

from __future__ import annotations

from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from mdfer.losses import masked_multi_domain_loss

SUM = tf.distribute.ReduceOp.SUM


def make_train_step(
    strategy: tf.distribute.Strategy,
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    domain_names: list[str],
    loss_weights: dict[str, float],
    global_batch_size: int,
    label_smoothing: float = 0.0,
    class_weights: dict[str, np.ndarray | tf.Tensor | None] | None = None,
) -> Callable[[dict], tuple[tf.Tensor, dict[str, tf.Tensor]]]:
    """A compiled step: forward, masked loss, backward, update. Returns the loss and its
    parts, each already the mean over the GLOBAL batch (summed across replicas).

    The step captures the model's trainable variables when it is made: after
    `set_trainable_fraction`, make a new optimizer and a new step (the old step refuses
    to run, rather than silently updating layers that are now frozen).
    """
    variables = model.trainable_variables
    _build_optimizer(strategy, optimizer, variables)
    class_weights = {
        name: tf.constant(w, tf.float32)
        for name, w in (class_weights or {}).items()
        if w is not None
    }

    def replica_step(batch: dict) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        with tf.GradientTape() as tape:
            outputs = model(batch["image"], training=True)
            per_example, parts = masked_multi_domain_loss(
                outputs,
                batch["domain"],
                batch["label"],
                domain_names,
                loss_weights,
                label_smoothing=label_smoothing,
                class_weights=class_weights,
            )
            # Divide by the global batch: the optimizer SUMs gradients across replicas.
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch_size)
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
        grads = tape.gradient(loss, variables)
        # Keras 3's TF optimizer all-reduces the gradients itself in a replica context.
        optimizer.apply_gradients(zip(grads, variables))
        # parts are local means; rescale so that summing over replicas gives global means.
        share = tf.cast(tf.shape(per_example)[0], tf.float32) / global_batch_size
        return loss, {name: value * share for name, value in parts.items()}

    @tf.function(reduce_retracing=True)  # a last, smaller batch must not cost a full retrace
    def distributed_step(batch: dict) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        loss, parts = strategy.run(replica_step, args=(batch,))
        loss = strategy.reduce(SUM, loss, axis=None)
        parts = {name: strategy.reduce(SUM, value, axis=None) for name, value in parts.items()}
        return loss, parts

    expected = [id(v) for v in variables]

    def train_step(batch: dict) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        if [id(v) for v in model.trainable_variables] != expected:  # ~0.2 ms
            raise RuntimeError(
                "the model's trainable variables changed since this step was made: "
                "make a new optimizer and a new train step"
            )
        return distributed_step(batch)

    return train_step


def _build_optimizer(
    strategy: tf.distribute.Strategy,
    optimizer: keras.optimizers.Optimizer,
    variables: list,
) -> None:
    """Create the optimizer's slots now, in scope: creating them lazily inside the first
    traced replica step is not allowed under a distribution strategy. Also catch the
    scope mistakes that otherwise surface as obscure errors deep inside tf.distribute."""
    if variables and not strategy.extended.variable_created_in_scope(_tf_variable(variables[0])):
        raise ValueError("the model must be built inside strategy.scope()")
    if getattr(optimizer, "_distribution_strategy", strategy) is not strategy:
        raise ValueError("the optimizer must be created inside strategy.scope()")
    if optimizer.built:
        known = {id(v) for v in getattr(optimizer, "_trainable_variables", [])}
        if known != {id(v) for v in variables}:
            raise ValueError(
                "optimizer was built for another set of trainable variables (a previous "
                "stage?): create a new optimizer after set_trainable_fraction"
            )
        return
    with strategy.scope():
        optimizer.build(variables)


def _tf_variable(variable):
    """The tf.Variable under a Keras 3 variable."""
    return getattr(variable, "value", variable)


def make_predict_step(
    strategy: tf.distribute.Strategy, model: keras.Model
) -> Callable[[dict], tuple[dict[str, tf.Tensor], dict[str, tf.Tensor]]]:
    """A compiled inference step: batch dict -> (probs per head, targets), where targets
    holds the batch's "domain" and "label" (those present) in the same row order.

    Results are this worker's replicas concatenated, with no cross-worker communication,
    so one worker may evaluate alone without the others joining in.
    """

    def replica_predict(batch: dict) -> tuple[dict, dict]:
        probs = model(batch["image"], training=False)
        targets = {k: batch[k] for k in ("domain", "label") if k in batch}
        return probs, targets

    @tf.function(reduce_retracing=True)  # a last, smaller batch must not cost a full retrace
    def predict_step(batch: dict) -> tuple[dict[str, tf.Tensor], dict[str, tf.Tensor]]:
        per_replica = strategy.run(replica_predict, args=(batch,))
        return tf.nest.map_structure(
            lambda value: tf.concat(strategy.experimental_local_results(value), axis=0),
            per_replica,
        )

    return predict_step
