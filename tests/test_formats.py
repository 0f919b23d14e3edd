"""The table of exported formats (mdfer.formats): every entry resolves to a converter and a
runner, `predict` opens files by it, and export's parity goes over every entry of it."""

from __future__ import annotations

import numpy as np
import pytest

from mdfer import export, layout, predict
from mdfer.formats import FLOAT_TOLERANCE, FORMATS, RUNNERS_BY_SUFFIX, Format
from mdfer.layout import HAILO_TFLITE, KERAS_FILE, ONNX_FILE, TFLITE_FLOAT32, TFLITE_INT8, TFLITE_OPTIMIZED


def test_every_entry_names_a_layout_file_a_converter_and_a_runner():
    files = [f.file for f in FORMATS]
    assert len(set(files)) == len(files)
    assert set(files) <= {value for value in vars(layout).values() if isinstance(value, str)}  # one definition
    for fmt in FORMATS:
        assert callable(getattr(export, fmt.converter)), fmt
        assert isinstance(getattr(predict, fmt.runner), type), fmt
    # the float formats are bound to Keras's outputs; only the quantized ones are scored unbound
    assert {f.file for f in FORMATS if f.tolerance is not None} == {KERAS_FILE, TFLITE_FLOAT32, ONNX_FILE, HAILO_TFLITE}
    assert {f.tolerance for f in FORMATS} == {FLOAT_TOLERANCE, None} and export.FLOAT_TOLERANCE == FLOAT_TOLERANCE
    assert [f.file for f in FORMATS if f.normalized_input] == [HAILO_TFLITE]
    # ONNX is converted from the float32 TFLite, so it comes after it
    assert files.index(ONNX_FILE) > files.index(TFLITE_FLOAT32)


def test_predict_opens_a_file_by_its_suffix_with_the_table_s_runner(tiny_tflite):
    for fmt in FORMATS:  # one runner per suffix, whichever entry has it
        assert RUNNERS_BY_SUFFIX[fmt.suffix] == fmt.runner, fmt
    assert predict.MODEL_SUFFIXES == (".keras", ".tflite", ".onnx")
    assert type(predict.open_model(str(tiny_tflite))).__name__ == RUNNERS_BY_SUFFIX[".tflite"]
    opened = Format(tiny_tflite.name, "convert_tflite_float32", "TFLiteRunner", FLOAT_TOLERANCE).open(tiny_tflite.parent)
    assert isinstance(opened, predict.TFLiteRunner) and opened.image_size == 16


def test_parity_checks_every_entry_with_its_own_input_and_tolerance(monkeypatch, tmp_path):
    """Runners stand in for the files: each returns Keras's probabilities shifted by its own
    amount, and records what it was given."""
    from mdfer.model import preprocess_constants

    classes = {"fer2013": ["a", "b"], "fane": ["c", "d", "e"]}
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (6, 8, 8, 3)).astype(np.float32)
    domain, label = np.array([0, 0, 0, 1, 1, 1]), np.array([0, 1, 0, 2, 1, 0])
    reference = {name: rng.dirichlet(np.ones(n), len(images)).astype(np.float32)
                 for name, n in (("fer2013", 2), ("fane", 3), ("domain", 2))}
    shift = {fmt.file: FLOAT_TOLERANCE / 2 for fmt in FORMATS}
    shift.update({ONNX_FILE: 3 * FLOAT_TOLERANCE, TFLITE_INT8: 0.05, TFLITE_OPTIMIZED: 0.01})
    given = {}

    class Shifted:
        def __init__(self, fmt: Format):
            self.fmt = fmt

        def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
            given[self.fmt.file] = batch
            return {name: probs + shift[self.fmt.file] for name, probs in reference.items()}

    monkeypatch.setattr(Format, "open", lambda self, folder, num_threads=None: Shifted(self))
    checks = export.parity(lambda batch, training: reference, tmp_path, images, domain, label, classes, "efficientnetv2b0")

    assert list(checks["formats"]) == [f.file for f in FORMATS]
    for fmt in FORMATS:
        entry = checks["formats"][fmt.file]
        assert entry["max_abs_diff"] == pytest.approx({name: shift[fmt.file] for name in reference}, abs=1e-6)
        if fmt.tolerance is None:
            assert "ok" not in entry and "tolerance" not in entry, fmt
        else:
            assert entry["tolerance"] == fmt.tolerance and entry["ok"] == (fmt.file != ONNX_FILE), fmt
    mean, std = preprocess_constants("efficientnetv2b0")
    for fmt in FORMATS:  # the Hailo TFLite gets the normalization its .alls does on the chip
        expected = (images - np.float32(mean)) / np.float32(std) if fmt.normalized_input else images
        np.testing.assert_allclose(given[fmt.file], expected, rtol=1e-6)
    assert checks["int8_vs_float32"]["macro_f1_drop"] == pytest.approx(
        checks["formats"][TFLITE_FLOAT32]["macro_f1"] - checks["formats"][TFLITE_INT8]["macro_f1"])


def test_every_converter_writes_a_file_its_runner_opens_within_its_tolerance(tmp_path):
    """The real conversion loop and parity on a tiny model shaped like mdfer's (preprocess,
    backbone, pool, heads), so the Hailo TFLite is made without its preprocessing too."""
    import keras

    from mdfer.model import BACKBONE, HEAD_DROPOUT, INPUT, POOL, PREPROCESS, preprocess_constants, without_preprocess

    size, classes = 12, {"fer2013": ["a", "b"], "fane": ["c", "d", "e"]}
    mean, std = preprocess_constants("efficientnetv2b0")
    inputs = keras.Input((size, size, 3), name=INPUT)
    x = keras.layers.Normalization(mean=mean, variance=[s * s for s in std], name=PREPROCESS)(inputs)
    backbone = keras.Sequential([keras.Input((size, size, 3)), keras.layers.Conv2D(4, 3, activation="relu")], name=BACKBONE)
    x = keras.layers.Dropout(0.0, name=HEAD_DROPOUT)(keras.layers.GlobalAveragePooling2D(name=POOL)(backbone(x)))
    heads = {**{name: len(c) for name, c in classes.items()}, "domain": 2}
    model = keras.Model(inputs, {name: keras.layers.Dense(n, activation="softmax", name=name)(x) for name, n in heads.items()})

    rng = np.random.default_rng(1)
    images = rng.uniform(0, 255, (8, size, size, 3)).astype(np.float32)
    out = tmp_path / "export"
    (out / layout.HAILO_DIR).mkdir(parents=True)
    job = export.Conversion(model, export._saved_model(model, size, tmp_path / "saved"),
                            export._saved_model(without_preprocess(model), size, tmp_path / "saved_hailo"), images, out)
    export.convert_formats(job)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted(f.file for f in FORMATS)
    domain, label = np.array([0, 1] * 4), np.array([0, 1, 1, 2, 0, 0, 1, 1])
    checks = export.parity(model, out, images, domain, label, classes, "efficientnetv2b0")
    assert list(checks["formats"]) == [f.file for f in FORMATS]
    for fmt in FORMATS:
        if fmt.tolerance is not None:
            assert checks["formats"][fmt.file]["ok"], (fmt.file, checks["formats"][fmt.file]["max_abs_diff"])
