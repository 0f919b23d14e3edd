"""The network's contract: head names, the preprocess layer, freezing, weight files."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest

from mdfer.errors import ConfigError
from mdfer.model import (
    BACKBONE,
    LOWPASS,
    PREPROCESS,
    backbone_layers,
    build_model,
    lowpass,
    lowpass_sigma,
    preprocess_constants,
    set_trainable_fraction,
    without_preprocess,
)

DOMAINS = [("fer2013", 7), ("fane", 9)]
SIZE = 32

# Keras's own saving code calls np.array(variable) on numpy 2; harmless, but noisy.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    return build_model(DOMAINS, image_size=SIZE)


def _images(n, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, SIZE, SIZE, 3)).astype("float32")


def _predict(model, images):
    return {k: np.asarray(v) for k, v in model(images, training=False).items()}


def test_outputs_two_domains(model):
    out = model(_images(2), training=False)
    assert set(out) == {"fer2013", "fane", "domain"}
    assert out["fer2013"].shape == (2, 7)
    assert out["fane"].shape == (2, 9)
    assert out["domain"].shape == (2, 2)
    np.testing.assert_allclose(np.sum(out["fane"], axis=-1), 1.0, rtol=1e-5)


def test_outputs_three_domains():
    m = build_model([*DOMAINS, ("sfew", 7)], image_size=SIZE, weights="none")
    out = m(_images(3), training=False)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "fer2013": (3, 7),
        "fane": (3, 9),
        "sfew": (3, 7),
        "domain": (3, 3),
    }


def test_bad_domains_are_config_errors():
    with pytest.raises(ConfigError, match="unique"):
        build_model([("a", 3), ("a", 4)], image_size=SIZE)
    with pytest.raises(ConfigError, match="reserved"):
        build_model([("domain", 3)], image_size=SIZE)


def test_preprocess_layer_matches_constants_and_keras(model):
    assert model.layers[1].name == PREPROCESS  # right after the input
    mean, std = preprocess_constants()
    image = np.zeros((1, 4, 4, 3), "float32") + np.array([0.0, 128.0, 255.0], "float32")

    ours = np.asarray(model.get_layer(PREPROCESS)(image))
    np.testing.assert_allclose(ours, (image - np.array(mean)) / np.array(std), rtol=1e-5)

    # The same as what EfficientNetV2's own include_preprocessing=True does.
    reference = keras.applications.EfficientNetV2B0(
        include_top=False, include_preprocessing=True, weights=None, input_shape=(SIZE, SIZE, 3)
    )
    theirs = reference.get_layer("normalization")(reference.get_layer("rescaling")(image))
    np.testing.assert_allclose(ours, np.asarray(theirs), rtol=1e-5, atol=1e-6)


def test_without_preprocess_shares_weights(model):
    images = _images(2)
    mean, std = preprocess_constants()
    stripped = without_preprocess(model)
    assert PREPROCESS not in [layer.name for layer in stripped.layers]
    normalized = (images - np.array(mean, "float32")) / np.array(std, "float32")
    for name, value in _predict(stripped, normalized).items():
        np.testing.assert_allclose(value, _predict(model, images)[name], rtol=1e-4, atol=1e-6)


def test_lowpass_is_the_gaussian_it_claims_and_keeps_flat_images_flat():
    blur = lowpass(5)
    impulse = np.zeros((1, 41, 41, 1), "float32")
    impulse[0, 20, 20, 0] = 1.0
    response = np.asarray(blur(impulse))[0, :, :, 0]
    offsets = np.arange(41) - 20
    assert response.sum() == pytest.approx(1.0, rel=1e-5)
    # the spread of the impulse response along one axis is the claimed sigma squared
    assert (response.sum(axis=0) * offsets**2).sum() == pytest.approx(lowpass_sigma(5) ** 2, rel=1e-4)
    assert lowpass_sigma(5) == pytest.approx(6**0.5) and lowpass_sigma(0) == 0
    # padding is not averaged in: a flat image stays flat up to its borders
    flat = np.full((1, 12, 12, 3), -1.7, "float32")
    np.testing.assert_allclose(np.asarray(blur(flat)), flat, rtol=1e-6)


def test_lowpass_model_loads_plain_weights_and_strips_preprocess(model, tmp_path):
    path = str(tmp_path / "plain.weights.h5")
    model.save_weights(path)
    blurred = build_model(DOMAINS, image_size=SIZE, weights=path, input_lowpass=3)
    assert [layer.name for layer in blurred.layers][1:3] == [PREPROCESS, LOWPASS]
    assert not blurred.get_layer(LOWPASS).weights
    flat = np.full((1, SIZE, SIZE, 3), 90.0, "float32")  # the blur leaves it as it is
    for name, value in _predict(blurred, flat).items():
        np.testing.assert_allclose(value, _predict(model, flat)[name], rtol=1e-4, atol=1e-6)
    images = _images(2)
    assert not np.allclose(_predict(blurred, images)["fer2013"], _predict(model, images)["fer2013"], atol=1e-4)
    # the Hailo form keeps the blur: only the normalization moves out
    stripped = without_preprocess(blurred)
    assert LOWPASS in [layer.name for layer in stripped.layers]
    mean, std = preprocess_constants()
    normalized = (images - np.array(mean, "float32")) / np.array(std, "float32")
    for name, value in _predict(stripped, normalized).items():
        np.testing.assert_allclose(value, _predict(blurred, images)[name], rtol=1e-4, atol=1e-6)


def test_inference_lowpass_is_left_out_of_training():
    from mdfer.config import load_config
    from mdfer.model import model_from_config

    config = load_config(None, {"fer2013": "/a", "fane": "/b"})
    config.model.image_size, config.model.inference_lowpass = SIZE, 3
    assert LOWPASS in [layer.name for layer in model_from_config(config).layers]
    assert LOWPASS not in [layer.name for layer in model_from_config(config, training=True).layers]


def _frozen_names(model):
    return [layer.name for layer in backbone_layers(model) if not layer.trainable]


def test_set_trainable_fraction_half(model):
    counted = [layer.name for layer in backbone_layers(model)]
    summary = set_trainable_fraction(model, 0.5)

    half = len(counted) // 2
    assert summary["n_backbone_layers"] == len(counted) == 150
    assert summary["n_frozen"] == half
    assert _frozen_names(model) == counted[:half]
    assert summary["first_trainable"] == counted[half]
    for name in ("fer2013", "fane", "domain"):
        assert model.get_layer(name).trainable
    assert summary["n_trainable_weights"] == len(model.trainable_weights)


def test_set_trainable_fraction_edges_and_unfreezing(model):
    counted = [layer.name for layer in backbone_layers(model)]
    summary = set_trainable_fraction(model, 1.0)
    assert _frozen_names(model) == counted
    assert summary["first_trainable"] is None
    assert summary["n_trainable_weights"] == 6  # kernel + bias of the three heads

    # Back to 0 after 1: nothing may stay frozen (Keras skips `trainable = True` when
    # the parent already reads True; the function must still unfreeze the sublayers).
    summary = set_trainable_fraction(model, 0.0)
    assert _frozen_names(model) == []
    assert summary["first_trainable"] == counted[0]
    assert summary["n_trainable_weights"] > 6

    with pytest.raises(ConfigError):
        set_trainable_fraction(model, 1.5)


def test_frozen_batchnorm_keeps_moving_stats(model):
    set_trainable_fraction(model, 0.5)
    backbone = model.get_layer(BACKBONE)
    frozen_bn, live_bn = backbone.get_layer("stem_bn"), backbone.get_layer("top_bn")
    assert isinstance(frozen_bn, keras.layers.BatchNormalization) and not frozen_bn.trainable
    assert live_bn.trainable

    before = {bn.name: [w.numpy() for w in bn.non_trainable_weights] for bn in (frozen_bn, live_bn)}
    model(_images(4, seed=3), training=True)

    for old, new in zip(before["stem_bn"], frozen_bn.non_trainable_weights):
        np.testing.assert_array_equal(old, new.numpy())
    assert any(
        not np.array_equal(old, new.numpy())
        for old, new in zip(before["top_bn"], live_bn.non_trainable_weights)
    )
    set_trainable_fraction(model, 0.0)


def test_weights_h5_round_trip(model, tmp_path):
    path = str(tmp_path / "model.weights.h5")
    model.save_weights(path)
    fresh = build_model(DOMAINS, image_size=SIZE, weights=path)
    images = _images(2, seed=5)
    expected = _predict(model, images)
    for name, value in _predict(fresh, images).items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-7)


def test_backbone_only_h5_seeds_any_heads(model, tmp_path):
    path = str(tmp_path / "backbone.weights.h5")
    model.get_layer(BACKBONE).save_weights(path)
    fresh = build_model([*DOMAINS, ("sfew", 7)], image_size=SIZE, weights=path)
    for ours, theirs in zip(fresh.get_layer(BACKBONE).weights, model.get_layer(BACKBONE).weights):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())


def test_keras_file_seeds_backbone_and_matching_heads(model, tmp_path):
    path = str(tmp_path / "model.keras")
    model.save(path)
    fresh = build_model([*DOMAINS, ("sfew", 7)], image_size=SIZE, weights=path)
    for name in (BACKBONE, "fer2013", "fane"):
        for ours, theirs in zip(fresh.get_layer(name).weights, model.get_layer(name).weights):
            np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
    # The domain head has 3 classes now, so it cannot come from the 2-domain file.
    assert fresh.get_layer("domain").kernel.shape[-1] == 3


def test_missing_weights_file_names_the_path(tmp_path):
    missing = str(tmp_path / "nowhere" / "best.weights.h5")
    with pytest.raises(FileNotFoundError, match="nowhere/best.weights.h5"):
        build_model(DOMAINS, image_size=SIZE, weights=missing)


def test_stride1_blocks_enlarge_the_maps_and_take_the_same_weights(model, tmp_path):
    """Block group 4 at stride 1: the backbone's maps double from there on; the weights of the
    plain model load into it unchanged, and the per-stage setting picks the model a stage trains."""
    from mdfer.config import load_config
    from mdfer.model import model_from_config

    wide = build_model(DOMAINS, image_size=SIZE, stride1_blocks=[4])
    assert model.get_layer(BACKBONE).output_shape[1:3] == (1, 1)  # 32 px / 32
    assert wide.get_layer(BACKBONE).output_shape[1:3] == (2, 2)
    assert [w.shape for w in wide.weights] == [w.shape for w in model.weights]
    path = str(tmp_path / "plain.weights.h5")
    model.save_weights(path)
    loaded = build_model(DOMAINS, image_size=SIZE, weights=path, stride1_blocks=[4])
    for ours, theirs in zip(loaded.weights, model.weights):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))

    config = load_config(None, {"fer2013": "/a", "fane": "/b"})
    config.model.image_size = SIZE
    config.train.stages[-1].stride1_blocks = [4, 6]
    shapes = [model_from_config(config, training=True, stage_index=i).get_layer(BACKBONE).output_shape[1:3]
              for i in range(len(config.train.stages))]
    assert shapes == [(1, 1)] * (len(shapes) - 1) + [(4, 4)]
    assert model_from_config(config).get_layer(BACKBONE).output_shape[1:3] == (4, 4)  # evaluation: the last stage's


def test_stochastic_depth_is_a_config_value_and_owns_no_weights(model, tmp_path):
    """model.drop_connect_rate 0 takes every stochastic-depth Dropout out of the backbone (Keras's
    default puts one in each residual block); weights move between the two unchanged, and
    model_from_config builds what the config says."""
    from mdfer.config import load_config
    from mdfer.model import model_from_config

    def drops(m):
        return [layer.name for layer in m.get_layer(BACKBONE).layers if layer.name.endswith("_drop")]

    assert len(drops(model)) == 15  # Keras's default: every residual block but the first (rate 0)
    path = str(tmp_path / "with_drop.weights.h5")
    model.save_weights(path)
    plain = build_model(DOMAINS, image_size=SIZE, weights=path, drop_connect_rate=0.0)
    assert drops(plain) == []
    for ours, theirs in zip(plain.weights, model.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    x = _images(2)
    for name, out in model(x, training=False).items():
        np.testing.assert_allclose(plain(x, training=False)[name], out, atol=1e-6)

    config = load_config(None, {"fer2013": "/a", "fane": "/b"})
    config.model.image_size = SIZE
    config.model.drop_connect_rate = 0.0
    assert drops(model_from_config(config, training=True)) == []


def test_a_stage_starts_from_the_previous_stages_weights_on_s3(s3_env, s3_prefix, tmp_path):
    """What a stage on a cluster does with the previous stage's best (`stages.train_run` hands it
    the store's s3:// key): fetch it, load every layer, say so on the console."""
    from mdfer.config import load_config
    from mdfer.storage import Store
    from mdfer.stream import EpochPlan
    from mdfer.train_loop import build_stage

    config = load_config(None, embedded="demo.yaml")
    config.model.image_size = SIZE
    keras.utils.set_random_seed(1)
    previous = build_model(DOMAINS, image_size=SIZE)
    previous.save_weights(str(tmp_path / "best.weights.h5"))
    store = Store(s3_prefix)
    store.write_bytes("runs/r/stage1/best.weights.h5", (tmp_path / "best.weights.h5").read_bytes())
    uri = store.key_uri("runs/r/stage1/best.weights.h5")
    said = []
    parts = build_stage(config, 1, EpochPlan(("fer2013", "fane"), {"fer2013": 8, "fane": 8}, 1, 1), 1, uri,
                        None, {}, said.append)
    assert said[0] == f"stage2: starting from {uri} (all)", said
    for ours, theirs in zip(parts.model.weights, previous.weights, strict=True):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
