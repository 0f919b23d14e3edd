"""The multi-domain loss: each sample trains only its own dataset's head, plus the domain
head on every sample.

A sample carries one emotion label, from its own dataset; a FER2013 label means nothing to
the FANE head, so that head's loss for the sample is masked out (its gradient is exactly 0).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from mdfer.model import DOMAIN_HEAD


def cross_entropy(
    probs: tf.Tensor,
    label: tf.Tensor,
    label_smoothing: float = 0.0,
    class_weight: tf.Tensor | None = None,
) -> tf.Tensor:
    """Per-example categorical cross-entropy of softmax `probs` [B, C] against int `label`
    [B]; the same math as keras.losses.CategoricalCrossentropy on smoothed one-hot targets.

    class_weight [C] scales each example by the weight of its true class (as Keras's
    class_weight does); smoothing does not move that weight to other classes.
    """
    probs = tf.cast(probs, tf.float32)
    num_classes = probs.shape[-1]
    target = tf.one_hot(label, num_classes, dtype=tf.float32)
    if label_smoothing:
        target = target * (1.0 - label_smoothing) + label_smoothing / num_classes
    # Clipping keeps log() finite, so masked examples get 0 * finite = 0 gradients, not NaN.
    eps = keras.config.epsilon()
    probs = probs / tf.reduce_sum(probs, axis=-1, keepdims=True)
    probs = tf.clip_by_value(probs, eps, 1.0 - eps)
    loss = -tf.reduce_sum(target * tf.math.log(probs), axis=-1)
    if class_weight is not None:
        loss = loss * tf.gather(tf.cast(class_weight, tf.float32), label)
    return loss


def masked_multi_domain_loss(
    outputs: dict[str, tf.Tensor],
    domain: tf.Tensor,
    label: tf.Tensor,
    domain_names: list[str],
    loss_weights: dict[str, float],
    label_smoothing: float = 0.0,
    class_weights: dict[str, tf.Tensor | None] | None = None,
) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
    """Total loss per example [B] and its parts for logging.

    outputs: the model's dict of softmax probabilities; domain: [B] index into
    domain_names; label: [B] class index within the sample's own dataset.
    loss_weights: one weight per name in domain_names plus "domain".
    label_smoothing applies to the emotion heads only: emotion labels are noisy, the
    domain label (which dataset a sample came from) is not.

    parts[name] is the batch mean of that head's weighted contribution, so the parts add
    up to the mean of the per-example loss.
    """
    missing = [n for n in [*domain_names, DOMAIN_HEAD] if n not in loss_weights]
    if missing:
        raise ValueError(f"loss_weights has no entry for {missing}")
    class_weights = class_weights or {}
    domain = tf.cast(domain, tf.int32)
    label = tf.cast(label, tf.int32)

    total = tf.zeros(tf.shape(domain), tf.float32)
    parts = {}
    for index, name in enumerate(domain_names):
        mine = tf.equal(domain, index)
        # Other datasets' labels may be out of range for this head: give them a valid
        # class (0); their loss is multiplied by 0 below anyway.
        safe_label = tf.where(mine, label, tf.zeros_like(label))
        ce = cross_entropy(outputs[name], safe_label, label_smoothing, class_weights.get(name))
        term = float(loss_weights[name]) * ce * tf.cast(mine, tf.float32)
        total += term
        parts[name] = tf.reduce_mean(term)

    domain_ce = cross_entropy(outputs[DOMAIN_HEAD], domain)
    term = float(loss_weights[DOMAIN_HEAD]) * domain_ce
    total += term
    parts[DOMAIN_HEAD] = tf.reduce_mean(term)
    return total, parts
