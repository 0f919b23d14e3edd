"""The masked loss: a sample trains its own dataset's head and never the other's."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf

from mdfer.losses import cross_entropy, masked_multi_domain_loss
from mdfer.model import build_model

DOMAINS = [("fer2013", 4), ("fane", 3)]
NAMES = [name for name, _ in DOMAINS]
WEIGHTS = {"fer2013": 2.0, "fane": 2.0, "domain": 0.1}


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    return build_model(DOMAINS, image_size=32, dropout=0.0)


def _images(n, seed=0):
    return tf.constant(np.random.default_rng(seed).uniform(0, 255, (n, 32, 32, 3)), tf.float32)


def _head_vars(model, name):
    layer = model.get_layer(name)
    return [layer.kernel, layer.bias]


def _is_zero(grad):
    return grad is None or not np.any(grad.numpy())


def test_other_head_gets_exactly_zero_gradient(model):
    # Only FER samples, with labels (3) that are out of range for the 3-class FANE head.
    domain = tf.constant([0, 0, 0, 0], tf.int32)
    label = tf.constant([3, 0, 3, 1], tf.int32)
    with tf.GradientTape() as tape:
        outputs = model(_images(4), training=True)
        per_example, _ = masked_multi_domain_loss(outputs, domain, label, NAMES, WEIGHTS)
        loss = tf.reduce_mean(per_example)
    fer, fane = _head_vars(model, "fer2013"), _head_vars(model, "fane")
    grads = tape.gradient(loss, fer + fane)

    assert np.isfinite(loss.numpy())
    assert all(np.any(g.numpy()) for g in grads[:2]), "own head must learn"
    assert all(_is_zero(g) for g in grads[2:]), "other head must get no gradient"


def test_each_sample_only_reaches_its_own_head(model):
    domain = tf.constant([0, 1, 0, 1], tf.int32)
    label = tf.constant([3, 2, 0, 1], tf.int32)  # 3 is valid only for FER
    heads = {name: _head_vars(model, name) for name in NAMES}
    with tf.GradientTape(persistent=True) as tape:
        outputs = model(_images(4, seed=1), training=False)
        per_example, _ = masked_multi_domain_loss(outputs, domain, label, NAMES, WEIGHTS)
        losses = [per_example[i] for i in range(4)]

    assert np.all(np.isfinite(per_example.numpy()))
    for i, d in enumerate(domain.numpy()):
        own, other = NAMES[d], NAMES[1 - d]
        assert all(np.any(g.numpy()) for g in tape.gradient(losses[i], heads[own]))
        assert all(_is_zero(g) for g in tape.gradient(losses[i], heads[other]))
    del tape


def _uniform(batch, num_classes):
    """What a head with constant logits outputs."""
    return tf.fill([batch, num_classes], 1.0 / num_classes)


def test_class_weights_scale_by_true_class():
    outputs = {"fer2013": _uniform(3, 4), "fane": _uniform(3, 3), "domain": _uniform(3, 2)}
    domain = tf.constant([0, 0, 1], tf.int32)
    label = tf.constant([1, 3, 2], tf.int32)
    weights = {"fer2013": 1.5, "fane": 1.0, "domain": 0.0}
    class_weights = {"fer2013": tf.constant([1.0, 2.0, 3.0, 4.0]), "fane": None}

    per_example, _ = masked_multi_domain_loss(
        outputs, domain, label, NAMES, weights, class_weights=class_weights
    )
    expected = [1.5 * 2.0 * np.log(4), 1.5 * 4.0 * np.log(4), 1.0 * np.log(3)]
    np.testing.assert_allclose(per_example.numpy(), expected, rtol=1e-5)


def test_label_smoothing_matches_hand_math_and_keras():
    probs = tf.constant([[0.7, 0.2, 0.1]])
    label = tf.constant([0])
    plain = cross_entropy(probs, label).numpy()[0]
    smooth = cross_entropy(probs, label, label_smoothing=0.3).numpy()[0]

    target = np.array([0.7 + 0.1, 0.1, 0.1])  # (1 - 0.3) * one_hot + 0.3 / 3
    by_hand = -np.sum(target * np.log([0.7, 0.2, 0.1]))
    by_keras = keras.losses.CategoricalCrossentropy(label_smoothing=0.3)(
        tf.constant([[1.0, 0.0, 0.0]]), probs
    )
    assert plain == pytest.approx(-np.log(0.7), rel=1e-5)
    assert smooth == pytest.approx(by_hand, rel=1e-5)
    assert smooth == pytest.approx(float(by_keras), rel=1e-5)
    assert smooth != pytest.approx(plain)


def test_label_smoothing_spares_domain_head():
    outputs = {
        "fer2013": tf.constant([[0.7, 0.1, 0.1, 0.1]]),
        "fane": _uniform(1, 3),
        "domain": tf.constant([[0.8, 0.2]]),
    }
    args = (outputs, tf.constant([0]), tf.constant([0]), NAMES, WEIGHTS)
    _, plain = masked_multi_domain_loss(*args)
    _, smooth = masked_multi_domain_loss(*args, label_smoothing=0.2)
    assert float(smooth["fer2013"]) > float(plain["fer2013"])
    assert float(smooth["domain"]) == pytest.approx(float(plain["domain"]))


def test_loss_weights_scale_parts_and_parts_add_up():
    rng = np.random.default_rng(0)
    outputs = {
        name: tf.nn.softmax(tf.constant(rng.normal(size=(6, n)), tf.float32))
        for name, n in [*DOMAINS, ("domain", 2)]
    }
    domain = tf.constant([0, 1, 0, 1, 1, 0])
    label = tf.constant([3, 2, 1, 0, 1, 2])

    base, parts = masked_multi_domain_loss(outputs, domain, label, NAMES, WEIGHTS)
    doubled = dict(WEIGHTS, fer2013=2 * WEIGHTS["fer2013"])
    _, parts2 = masked_multi_domain_loss(outputs, domain, label, NAMES, doubled)

    assert float(parts2["fer2013"]) == pytest.approx(2 * float(parts["fer2013"]), rel=1e-6)
    assert float(parts2["fane"]) == pytest.approx(float(parts["fane"]), rel=1e-6)
    assert sum(float(v) for v in parts.values()) == pytest.approx(float(tf.reduce_mean(base)))
    # The domain part covers every sample.
    domain_ce = cross_entropy(outputs["domain"], domain)
    assert float(parts["domain"]) == pytest.approx(0.1 * float(tf.reduce_mean(domain_ce)))


def test_third_domain_needs_no_code_change():
    names = ["fer2013", "fane", "sfew"]
    outputs = {"fer2013": _uniform(3, 7), "fane": _uniform(3, 9), "sfew": _uniform(3, 7)}
    outputs["domain"] = _uniform(3, 3)
    weights = {"fer2013": 1.0, "fane": 1.0, "sfew": 1.0, "domain": 0.0}
    per_example, parts = masked_multi_domain_loss(
        outputs, tf.constant([0, 1, 2]), tf.constant([6, 8, 6]), names, weights
    )
    np.testing.assert_allclose(per_example.numpy(), np.log([7, 9, 7]), rtol=1e-5)
    assert set(parts) == {"fer2013", "fane", "sfew", "domain"}


def test_missing_loss_weight_is_named():
    outputs = {"fer2013": _uniform(1, 4), "fane": _uniform(1, 3), "domain": _uniform(1, 2)}
    with pytest.raises(ValueError, match="domain"):
        masked_multi_domain_loss(
            outputs, tf.constant([0]), tf.constant([0]), NAMES, {"fer2013": 1, "fane": 1}
        )
