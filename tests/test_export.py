"""`mdfer export` and `mdfer predict` on the run trained on generated data (conftest.trained_run)."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import path_without_hailo, run_mdfer
from mdfer import hailo
from mdfer.errors import MdferError
from mdfer.dataset import read_manifest
from mdfer.export import FLOAT_TOLERANCE, _saved_model, tflite_bytes
from mdfer.formats import FORMATS
from mdfer.layout import KERAS_FILE, ONNX_FILE, TFLITE_FLOAT32, TFLITE_INT8, TFLITE_OPTIMIZED
from mdfer.predict import open_model

EXPECTED = {*(f.file for f in FORMATS), "heads.json", "MODEL_CARD.md",
            "hailo/model.alls", "hailo/calib.npy", "hailo/heads.json", "hailo/hailo_compile.py"}


def test_every_format_is_written_with_checksums_and_parity(exported):
    folder, manifest = exported["folder"], exported["manifest"]
    assert set(manifest["files"]) == EXPECTED
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert len(data) == entry["size"] and hashlib.sha256(data).hexdigest() == entry["sha256"], name
    assert manifest["run_id"] == "learn" and manifest["dataset_id"] == exported["dataset_id"]

    parity = manifest["parity"]
    sizes = read_manifest(exported["store"], exported["dataset_id"]).split_sizes("test")
    # the whole test split: parity_images is 0 in the fixture's config
    assert parity["images"] == sum(sizes.values())
    assert set(parity["formats"]) == {f.file for f in FORMATS}  # every format of the table, each checked
    for fmt in FORMATS:  # the float ones (test_formats: Keras, float32 TFLite, ONNX, Hailo TFLite) within bounds
        entry = parity["formats"][fmt.file]
        if fmt.tolerance is not None:
            assert entry["ok"] and max(entry["max_abs_diff"].values()) <= FLOAT_TOLERANCE, (fmt.file, entry["max_abs_diff"])
    # the int8 model's cost in macro-F1 is computed from its own and the float32 model's scores
    float32, int8 = parity["formats"][TFLITE_FLOAT32], parity["formats"][TFLITE_INT8]
    assert parity["int8_vs_float32"]["macro_f1_drop"] == pytest.approx(float32["macro_f1"] - int8["macro_f1"])
    assert float32["macro_f1"] == pytest.approx(parity["keras"]["macro_f1"])  # same predictions
    # quantization keeps the trained model: above chance (~0.13 for a uniform guess) and within
    # 0.1 of the float32 model (how well this short run learns at all is test_train's bar)
    assert int8["macro_f1"] > 0.15 and float32["macro_f1"] - int8["macro_f1"] < 0.1, (int8, float32)
    # smaller variants are smaller
    sizes = {name: entry["size"] for name, entry in manifest["files"].items()}
    assert sizes[TFLITE_INT8] < 0.35 * sizes[TFLITE_FLOAT32] and sizes[TFLITE_OPTIMIZED] < 0.35 * sizes[TFLITE_FLOAT32]

    # the HEF step is skipped and says how to do it later
    assert manifest["hef"].startswith(hailo.NOT_FOUND)
    assert "hailo_compile.py" in manifest["compile_hef"]
    assert "hef: not compiled (Hailo Dataflow Compiler not found)" in exported["done"].stdout
    # the normalization the HEF needs is in the model script, with the model's own constants
    alls = (folder / "hailo/model.alls").read_text()
    assert alls.startswith("normalization1 = normalization([123.675, 116.28, 103.53], [58.395, 57.12, 57.375])")
    calib = np.load(folder / "hailo/calib.npy")
    assert calib.shape == (64, 48, 48, 3) and calib.dtype == np.float32 and calib.max() > 1  # 0..255 pixels


def test_exported_models_load_and_agree(exported):
    folder = exported["folder"]
    import keras
    keras.saving.load_model(folder / KERAS_FILE, safe_mode=True)
    calib = np.load(folder / "hailo/calib.npy")[:4]
    runners = {name: open_model(str(folder / name)) for name in (KERAS_FILE, TFLITE_FLOAT32, ONNX_FILE, TFLITE_INT8)}
    outputs = {name: runner(calib) for name, runner in runners.items()}
    for name in (TFLITE_FLOAT32, ONNX_FILE):
        assert set(outputs[name]) == {"fer2013", "fane", "domain"}, name  # outputs named by head
        for head, probs in outputs[KERAS_FILE].items():
            np.testing.assert_allclose(outputs[name][head], probs, atol=FLOAT_TOLERANCE)
    assert runners[TFLITE_INT8].input_dtype == np.uint8
    assert np.allclose(outputs[TFLITE_INT8]["fer2013"].sum(-1), 1, atol=0.02)


def test_rerun_leaves_a_finished_export_alone(exported):
    folder = exported["folder"]
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    again = run_mdfer("export", "--store", exported["store"].uri, "--run-id", "learn")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already complete, nothing written" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} == before


def test_require_hef_fails_before_writing_anything(exported):
    store = exported["store"]
    for name in ("config.yaml", "run.json", "metrics.json", "best_model_hailo.weights.h5"):
        store.write_bytes(f"runs/unexported/{name}", store.read_bytes(f"runs/learn/{name}"))
    # a Python without hailo_sdk_client, named explicitly: found wanting, not silently skipped
    done = run_mdfer("export", "--store", store.uri, "--run-id", "unexported", "--require-hef",
                     "--hailo-python", sys.executable, env={"PATH": path_without_hailo()})
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert "--require-hef: not compiled (Hailo Dataflow Compiler not found)" in done.stderr
    assert "cannot import hailo_sdk_client" in done.stderr
    assert not store.list_files("runs/unexported/export")
    # a finished export without a HEF does not pass for one either
    finished = run_mdfer("export", "--store", store.uri, "--run-id", "learn", "--require-hef")
    assert finished.returncode == 2 and "finished export without a HEF" in finished.stderr
    missing = run_mdfer("export", "--store", store.uri, "--run-id", "nope")
    assert missing.returncode == 2 and "no finished run or sweep there" in missing.stderr


def test_preflight_names_an_op_the_hailo_parser_lacks(tmp_path):
    import keras

    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.Lambda(keras.ops.sin, name="sine")(x)  # SIN: not in the Hailo-8 list
    outputs = {"fer2013": keras.layers.Dense(3, activation="softmax", name="fer2013")(
        keras.layers.GlobalAveragePooling2D()(x))}
    model = keras.Model(inputs, outputs)
    path = tmp_path / "tiny.tflite"
    path.write_bytes(tflite_bytes(_saved_model(model, 8, tmp_path / "saved")))
    with pytest.raises(MdferError, match=r"tiny.tflite: ops the Hailo-8 parser does not support: SIN \("):
        hailo.preflight(str(path))
    assert "CONV_2D" in hailo.tflite_ops(str(path))


def test_lowpass_converts_to_builtin_ops_the_hailo_parser_takes(tmp_path):
    """The inference lowpass stays in the Hailo graph (tests/test_model.py: without_preprocess
    keeps it); here: it converts to TFLite builtins Hailo-8 takes, with the same numbers."""
    import keras

    from mdfer.model import lowpass
    from mdfer.predict import TFLiteRunner

    inputs = keras.Input((12, 12, 3), name="image")
    x = keras.layers.Conv2D(4, 3, name="conv")(lowpass(3)(inputs))
    outputs = {"fer2013": keras.layers.Dense(3, activation="softmax", name="fer2013")(
        keras.layers.GlobalAveragePooling2D()(x))}
    model = keras.Model(inputs, outputs)
    path = tmp_path / "blurred.tflite"
    path.write_bytes(tflite_bytes(_saved_model(model, 12, tmp_path / "saved")))
    assert "AVERAGE_POOL_2D" in hailo.preflight(str(path))
    images = np.random.default_rng(0).normal(size=(2, 12, 12, 3)).astype(np.float32)
    np.testing.assert_allclose(TFLiteRunner(str(path))(images)["fer2013"],
                               np.asarray(model(images, training=False)["fer2013"]), atol=FLOAT_TOLERANCE)


def test_predict_runs_every_format_on_image_files(exported, tmp_path):
    folder = exported["folder"]
    gray = tmp_path / "gray.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (61, 53), dtype=np.uint8), "L").save(gray)
    color = tmp_path / "color.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (120, 90, 3), dtype=np.uint8)).save(color)
    results = {}
    for name in (KERAS_FILE, TFLITE_FLOAT32, TFLITE_INT8, ONNX_FILE):
        done = run_mdfer("predict", str(gray), str(color), "--model", str(folder / name), "--json")
        assert done.returncode == 0, done.stderr[-2000:]
        results[name] = json.loads(done.stdout)
    for name, rows in results.items():
        assert [row["image"] for row in rows] == [str(gray), str(color)]
        fer = rows[0]["heads"]["fer2013"]
        assert list(fer["probabilities"]) == ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
        assert sum(fer["probabilities"].values()) == pytest.approx(1, abs=0.02)
        assert fer["top"] == max(fer["probabilities"], key=fer["probabilities"].get)
    for name in (TFLITE_FLOAT32, ONNX_FILE):
        for ours, reference in zip(results[name], results[KERAS_FILE]):
            for head, entry in reference["heads"].items():
                np.testing.assert_allclose(list(ours["heads"][head]["probabilities"].values()),
                                           list(entry["probabilities"].values()), atol=FLOAT_TOLERANCE)


@pytest.mark.parametrize("case", ["missing image", "not an image", "missing model", "unknown format"])
def test_predict_bad_input_is_one_clear_line(exported, tmp_path, case):
    text = tmp_path / "notes.txt"
    text.write_text("not a picture")
    good_model, good_image = str(exported["folder"] / TFLITE_FLOAT32), str(tmp_path / "x.png")
    Image.new("RGB", (10, 10)).save(good_image)
    args, expected = {
        "missing image": ([str(tmp_path / "nope.png"), "--model", good_model], "nope.png: cannot read image"),
        "not an image": ([str(text), "--model", good_model], "notes.txt: not a readable image"),
        "missing model": ([good_image, "--model", str(tmp_path / "m.tflite")], "m.tflite: model file not found"),
        "unknown format": ([good_image, "--model", str(text)], "unknown model format '.txt'"),
    }[case]
    done = run_mdfer("predict", *args)
    assert done.returncode == 2, done.stderr
    assert expected in done.stderr and done.stderr.strip().count("\n") == 0, done.stderr


def test_predict_goes_on_past_a_bad_image_and_takes_folders(exported, tmp_path):
    """A folder stands for the images in it; one unreadable file is reported (its entry and one
    stderr line) and the others are still predicted; the exit code says something failed."""
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (40, 40), dtype=np.uint8), "L").save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (64, 50), (120, 80, 60)).save(tmp_path / "sub" / "c.jpg")
    (tmp_path / "b.jpg").write_bytes(b"\xff\xd8 not really")
    Image.new("L", (20, 20)).save(tmp_path / ".hidden.png")
    done = run_mdfer("predict", str(tmp_path), "--model", str(exported["folder"] / TFLITE_FLOAT32), "--json")
    assert done.returncode == 2, done.stderr[-2000:]
    rows = json.loads(done.stdout)
    table = run_mdfer("predict", str(tmp_path / "a.png"), "--model", str(exported["folder"] / TFLITE_FLOAT32))
    top = rows[0]["heads"]["fer2013"]["top"]
    assert table.returncode == 0 and table.stdout.startswith(f"{tmp_path / 'a.png'}: fer2013 {top} ")
    assert [Path(row["image"]).relative_to(tmp_path).as_posix() for row in rows] == ["a.png", "b.jpg", "sub/c.jpg"]
    assert "b.jpg: not a readable image" in rows[1]["error"] and "heads" not in rows[1]
    assert all(set(row["heads"]) == {"fer2013", "fane", "domain"} for row in (rows[0], rows[2]))
    errors = [line for line in done.stderr.splitlines() if line.startswith("mdfer predict: error: ")]
    assert len(errors) == 1 and "b.jpg: not a readable image" in errors[0], done.stderr  # one line per bad image


def test_predict_damaged_sidecar_or_junk_model_is_one_line(exported, tmp_path):
    image = tmp_path / "x.png"
    Image.new("RGB", (10, 10)).save(image)
    shutil.copy(exported["folder"] / TFLITE_FLOAT32, tmp_path / "m.tflite")
    (tmp_path / "heads.json").write_text('{"heads": {"fer2013": ')
    (tmp_path / "junk.keras").write_bytes(b"PK\x03\x04 not a zip")
    for model, expected in (("m.tflite", "heads.json: not valid JSON"), ("junk.keras", "junk.keras: not a .keras file (a .keras model is a zip archive)")):
        done = run_mdfer("predict", str(image), "--model", str(tmp_path / model))
        assert done.returncode == 2, (model, done.stderr[-2000:])
        assert done.stderr.strip().count("\n") == 0 and expected in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def test_a_foreign_onnx_model_is_named_as_not_ours(tmp_path):
    """An ONNX model with an NCHW input (what most vision exports have) is named as not ours
    before any image is run through it."""
    import onnx
    from onnx import TensorProto, helper

    from mdfer.predict import open_model

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "foreign",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 48, 48])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 48, 48])])
    path = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    with pytest.raises(MdferError, match=r"foreign\.onnx: its input has shape \[1, 3, 48, 48\], not \[1, size, size, 3\]"):
        open_model(str(path))

