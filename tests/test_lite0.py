"""EfficientNet-Lite0 from its packaged ImageNet weights through the real pipeline: prepare, one
training stage on Ray Train, evaluate, export in every format with parity, the Hailo bundle with
Lite0's normalization, and the model card."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers import generated_demo_config, path_without_hailo, run_mdfer
from mdfer import hailo
from mdfer.export import FLOAT_TOLERANCE
from mdfer.layout import HAILO_TFLITE, KERAS_FILE, MODEL_CARD_FILE, ONNX_FILE, TFLITE_FLOAT32
from mdfer.storage import Store


def _lite0_one_stage(raw: dict) -> None:
    raw["model"] = {"backbone": "efficientnet_lite0", "weights": "imagenet", "image_size": 48, "dropout": 0.2}
    raw["train"].update(workers=1, cpus_per_worker=1)
    raw["train"]["stages"] = [{"name": "stage1", "lr": 1.0e-3, "frozen_fraction": 0.5, "epochs": 1, "patience": 1,
                               "loss_weights": {"fer2013": 1.0, "fane": 1.0, "domain": 0.1}}]
    raw["export"] = {"calib_images": 32, "representative_images": 16, "parity_images": 0}


@pytest.mark.slow
def test_lite0_trains_exports_and_describes_itself(tmp_path: Path):
    config, _ = generated_demo_config(tmp_path, fer_train=20, fer_test=6, fane=16, seed=5, edit=_lite0_one_stage)
    store = Store(str(tmp_path / "store"))
    done = run_mdfer("pipeline", "--config", str(config), "--store", store.uri, "--run-id", "lite0",
                     env={hailo.HAILO_PYTHON_ENV: "", "PATH": path_without_hailo()})
    assert done.returncode == 0, done.stderr[-4000:]
    # half of Lite0's 98 weighted layers frozen (the seed's stage 1), on ImageNet weights
    assert "stage1: lr 0.001, frozen 49/98 backbone layers" in done.stderr, done.stderr[-3000:]

    import json
    folder = Path(store.path("runs/lite0/export"))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert MODEL_CARD_FILE in manifest["files"]
    parity = manifest["parity"]
    for name in (KERAS_FILE, TFLITE_FLOAT32, ONNX_FILE, HAILO_TFLITE):
        entry = parity["formats"][name]
        assert entry["ok"] and max(entry["max_abs_diff"].values()) <= FLOAT_TOLERANCE, (name, entry)
    # the Hailo bundle normalizes as Lite0's ImageNet weights expect, and its ops pass the pre-flight
    alls = (folder / "hailo/model.alls").read_text()
    assert alls.startswith("normalization1 = normalization([127, 127, 127], [128, 128, 128])"), alls
    # ReLU6 fused into the convolutions; no squeeze-excite (LOGISTIC, MUL), unlike EfficientNetV2B0
    assert manifest["hailo"]["ops"] == ["ADD", "CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "MEAN", "SOFTMAX"]

    card = (folder / MODEL_CARD_FILE).read_text()
    assert card.startswith("# Model card: mdfer run `lite0`")
    assert "Backbone: `efficientnet_lite0`; initial weights: ImageNet: the official TensorFlow EfficientNet-Lite0" in card
    # the card's test figures are the export's own (parity scored the whole test split too)
    results = card[card.index("## Results on the test split"):]
    row = re.search(r"^\| fer2013 \| ([0-9,]+) \| ([0-9.]+) \| ([0-9.]+) \|", results, re.M)
    assert row, card
    fane_images = re.search(r"^\| fane \| ([0-9,]+) \|", results, re.M)[1]
    assert int(row[1].replace(",", "")) + int(fane_images.replace(",", "")) == parity["images"]
    assert float(row[2]) == pytest.approx(parity["keras"]["fer2013_accuracy"], abs=5e-5)
    assert float(row[3]) == pytest.approx(parity["keras"]["fer2013_macro_f1"], abs=5e-5)
    for heading in ("## Data", "## Recipe", "### F1 per class (test, no TTA)", "## Intended use", "## Known limits"):
        assert heading in card

