"""The hand-written distributed steps: they learn, respect freezing, and split a global
batch across replicas without changing the update."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from mdfer.model import backbone_layers, build_model, set_trainable_fraction
from mdfer.steps import make_predict_step, make_train_step

DOMAINS = [("fer2013", 4), ("fane", 4)]
NAMES = [name for name, _ in DOMAINS]
WEIGHTS = {"fer2013": 1.0, "fane": 1.0, "domain": 0.1}
SIZE = 32
BATCH = 8


def quadrant_batch(n: int = BATCH, seed: int = 0) -> dict:
    """Learnable toy data: the class is which quadrant of a dark image is bright."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 4, n).astype("int32")
    image = rng.uniform(0, 40, (n, SIZE, SIZE, 3)).astype("float32")
    half = SIZE // 2
    for i, cls in enumerate(label):
        row, col = divmod(int(cls), 2)
        image[i, row * half : (row + 1) * half, col * half : (col + 1) * half] += 200
    domain = (np.arange(n) % 2).astype("int32")
    return {"image": tf.constant(image), "domain": tf.constant(domain), "label": tf.constant(label)}


@pytest.fixture(scope="module")
def strategy():
    return tf.distribute.OneDeviceStrategy("/cpu:0")


def test_train_step_learns_and_respects_freezing(strategy):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = build_model(DOMAINS, image_size=SIZE, dropout=0.0)
    set_trainable_fraction(model, 0.5)
    with strategy.scope():
        optimizer = keras.optimizers.AdamW(3e-4)
    step = make_train_step(strategy, model, optimizer, NAMES, WEIGHTS, global_batch_size=BATCH)

    counted = backbone_layers(model)
    frozen, live = counted[: len(counted) // 2], counted[len(counted) // 2 :]
    snapshot = lambda layers: [w.numpy() for layer in layers for w in layer.weights]
    frozen_before, live_before = snapshot(frozen), snapshot(live)

    batch = quadrant_batch()
    losses = []
    for _ in range(15):
        loss, parts = step(batch)
        losses.append(float(loss))
        assert sum(float(v) for v in parts.values()) == pytest.approx(losses[-1], rel=1e-4)

    assert np.all(np.isfinite(losses))
    # Batch-statistics BN on 8 samples makes single steps noisy: compare averages.
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:2]), losses
    # Frozen: weights and BN moving statistics untouched. Live: kernels moved.
    for old, new in zip(frozen_before, snapshot(frozen)):
        np.testing.assert_array_equal(old, new)
    moved = [not np.array_equal(old, new) for old, new in zip(live_before, snapshot(live))]
    assert sum(moved) > 0.9 * len(moved)

    # predict_step: probabilities per head, with targets in the same row order.
    probs, targets = make_predict_step(strategy, model)(batch)
    assert {k: tuple(v.shape) for k, v in probs.items()} == {
        "fer2013": (BATCH, 4),
        "fane": (BATCH, 4),
        "domain": (BATCH, 2),
    }
    np.testing.assert_array_equal(targets["label"].numpy(), batch["label"].numpy())

    # The LR is read from its variable by the traced step: an LR assigned later (the per-epoch
    # schedule) takes effect without retracing. At 0 no trainable weight moves.
    optimizer.learning_rate.assign(0.0)
    trainable_before = [w.numpy() for w in model.trainable_weights]
    step(batch)
    for old, new in zip(trainable_before, (w.numpy() for w in model.trainable_weights)):
        np.testing.assert_array_equal(old, new)

    # A new stage changes the trainable set: the old optimizer must not be reused.
    # (Freezing more rather than less keeps the retrace cheap; the mechanism is the same.)
    set_trainable_fraction(model, 1.0)
    with pytest.raises(RuntimeError, match="new train step"):
        step(batch)
    with pytest.raises(ValueError, match="new optimizer"):
        make_train_step(strategy, model, optimizer, NAMES, WEIGHTS, global_batch_size=BATCH)
    with strategy.scope():
        optimizer = keras.optimizers.AdamW(1e-4)
    step = make_train_step(strategy, model, optimizer, NAMES, WEIGHTS, global_batch_size=BATCH)
    assert np.isfinite(float(step(batch)[0]))


def test_optimizer_outside_scope_is_refused(strategy):
    with strategy.scope():
        model = build_model(DOMAINS, image_size=SIZE)
    with pytest.raises(ValueError, match="scope"):
        make_train_step(strategy, model, keras.optimizers.Adam(), NAMES, WEIGHTS, BATCH)


# Two CPU replicas need the device split before TensorFlow starts: own process.
TWO_REPLICAS = textwrap.dedent(
    """
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import numpy as np, tensorflow as tf, keras
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    sys.path.insert(0, sys.argv[1])
    from test_steps import quadrant_batch, DOMAINS, NAMES, WEIGHTS, SIZE, BATCH
    from mdfer.model import BACKBONE, build_model, set_trainable_fraction
    from mdfer.steps import make_train_step

    def one_step(strategy, batch, init):
        with strategy.scope():
            model = build_model(DOMAINS, image_size=SIZE, dropout=0.0)
        model.set_weights(init)
        for layer in model.get_layer(BACKBONE).layers:  # no randomness: stochastic depth off
            if isinstance(layer, keras.layers.Dropout):
                layer.rate = 0.0
        set_trainable_fraction(model, 1.0)  # BN in inference mode: no per-replica stats
        with strategy.scope():
            optimizer = keras.optimizers.SGD(0.5)
        step = make_train_step(strategy, model, optimizer, NAMES, WEIGHTS, BATCH)
        loss, _ = step(batch)
        return float(loss), [w.numpy() for w in model.trainable_weights]

    keras.utils.set_random_seed(0)
    init = build_model(DOMAINS, image_size=SIZE).get_weights()
    batch = quadrant_batch()
    single = one_step(tf.distribute.OneDeviceStrategy("/cpu:0"), batch, init)

    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert mirrored.num_replicas_in_sync == 2
    data = tf.data.Dataset.from_tensor_slices(batch).batch(BATCH)
    split = next(iter(mirrored.experimental_distribute_dataset(data)))
    assert mirrored.experimental_local_results(split["label"])[0].shape[0] == BATCH // 2
    double = one_step(mirrored, split, init)

    assert abs(single[0] - double[0]) < 1e-4 * abs(single[0]), (single[0], double[0])
    for a, b in zip(single[1], double[1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    print("OK", single[0], double[0])
    """
)


def test_two_replicas_match_one_device():
    """compute_average_loss + the optimizer's own all-reduce must give the same update
    whether the global batch runs on one replica or is split over two."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = [os.path.dirname(here), here, os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    run = subprocess.run(
        [sys.executable, "-c", TWO_REPLICAS, here],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0 and "OK" in run.stdout, run.stderr[-3000:]


def test_several_workers_without_a_tf_config_naming_them_are_refused(monkeypatch):
    """Without TF_CONFIG (mdfer.multiworker sets it on each Train worker) MultiWorkerMirroredStrategy
    would make every worker a cluster of one, each training alone: refused instead."""
    import json

    from mdfer.multiworker import set_tf_config
    from mdfer.train_loop import make_strategy

    monkeypatch.setenv("TF_CONFIG", "")  # monkeypatch puts back what was there (set_tf_config below too)
    with pytest.raises(RuntimeError, match=r"TF_CONFIG names 0 worker\(s\), Ray Train started 2"):
        make_strategy(2, 0)
    set_tf_config(["127.0.0.1:1"], 0)
    with pytest.raises(RuntimeError, match=r"TF_CONFIG names 1 worker\(s\), Ray Train started 2"):
        make_strategy(2, 0)
    assert json.loads(os.environ["TF_CONFIG"]) == {"cluster": {"worker": ["127.0.0.1:1"]},
                                                   "task": {"type": "worker", "index": 0}}
