"""An optimizer's saved state comes back exactly, leaves the learning rate alone, and is refused
whole when it belongs to another optimizer or other trainable variables. A stage resumed on Ray
Train: tests/test_worker_loss.py."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

from mdfer.optimizer_state import ITERATION_KEY, optimizer_state, read_optimizer_file, restore_optimizer, save_optimizer


def _model() -> keras.Model:
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="hidden"), keras.layers.Dense(2, name="out")])


def _trained(optimizer, model: keras.Model, steps: int = 3):
    """`optimizer` after `steps` updates of `model`, in a replica context as the train step's."""
    optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(0)

    def step(images):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(model(images) ** 2)
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))

    for _ in range(steps):
        tf.distribute.get_strategy().run(step, args=(rng.normal(size=(8, 3)).astype("float32"),))
    return optimizer


def test_saved_state_comes_back_exactly_and_the_learning_rate_stays(tmp_path):
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")  # as a one-worker stage
    with strategy.scope():
        model = _model()
        saved = _trained(keras.optimizers.Adam(1e-2), model)
    save_optimizer(saved, tmp_path / "optimizer")  # no suffix: written where asked, no ".npz" added
    with strategy.scope():
        fresh = keras.optimizers.Adam(3e-4)
        fresh.build(model.trainable_variables)
    assert int(fresh.iterations.numpy()) == 0
    assert restore_optimizer(fresh, read_optimizer_file(tmp_path / "optimizer")) is None
    before, after = optimizer_state(saved), optimizer_state(fresh)
    assert list(after) == list(before) and int(after[ITERATION_KEY]) == 3
    assert all(np.array_equal(after[name], before[name]) for name in before)
    assert any(np.any(value) for name, value in after.items() if name != ITERATION_KEY)  # moments, not zeros
    assert float(fresh.learning_rate.numpy()) == np.float32(3e-4)  # the loop's schedule owns it


def test_state_of_another_optimizer_or_other_variables_is_refused_whole(tmp_path):
    model = _model()
    save_optimizer(_trained(keras.optimizers.Adam(1e-2), model), tmp_path / "optimizer.npz")
    saved = read_optimizer_file(tmp_path / "optimizer.npz")
    sgd = keras.optimizers.SGD(1e-2, momentum=0.9)
    sgd.build(model.trainable_variables)
    assert restore_optimizer(sgd, saved) == "is Adam's, not SGD's"
    model.get_layer("hidden").trainable = False  # another frozen share: fewer slots
    adam = keras.optimizers.Adam(1e-2)
    adam.build(model.trainable_variables)
    assert "follows other trainable variables (8 slots saved, 4 now" in restore_optimizer(adam, saved)
    assert int(adam.iterations.numpy()) == 0 and not any(np.any(v) for v in optimizer_state(adam).values())
    assert read_optimizer_file(tmp_path / "absent.npz") is None
