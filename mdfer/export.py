"""`mdfer export`: a finished run's (or sweep's) final weights -> every deployable format.

Everything is built in a local temp folder, checked against the Keras model on test images,
then copied to `<run>/export/` with `manifest.json` (sizes, sha256, parity) written last: an
export without a manifest is unfinished, and a finished one is never rewritten. The files and
what each holds: mdfer.layout; which formats, each one's converter, runner and tolerance:
mdfer.formats.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mdfer import hailo
from mdfer.artifacts import MANIFEST_FORMAT, sha256_file
from mdfer.config import Config
from mdfer.dataset import DatasetManifest, read_manifest, split_images
from mdfer.errors import MdferError
from mdfer.formats import FLOAT_TOLERANCE, FORMATS  # noqa: F401 - FLOAT_TOLERANCE also read from here
from mdfer.layout import (FINAL_WEIGHTS_FILE, HAILO_CALIB_FILE, HAILO_DIR, HAILO_SCRIPT_FILE, HAILO_TFLITE,
                          HEADS_FILE, MANIFEST_FILE, METRICS_FILE, MODEL_CARD_FILE, RUN_FILE, TFLITE_FLOAT32,
                          TFLITE_INT8, export_key)
from mdfer.predict import TFLITE_SIGNATURE
from mdfer.runs import check_dataset_matches, read_run_config
from mdfer.storage import Store

log = logging.getLogger(__name__)

ONNX_OPSET = 17


# ---------------------------------------------------------------- conversions


def _saved_model(model, image_size: int, folder: Path) -> str:
    """A SavedModel with one static-batch-1 endpoint; the TFLite converter reads it (Keras 3's
    own route). A dynamic batch would add shape ops inside every squeeze-excite block."""
    import keras
    import tensorflow as tf
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(TFLITE_SIGNATURE, functools.partial(model.__call__, training=False),
                         input_signature=[tf.TensorSpec([1, image_size, image_size, 3], tf.float32, name="image")])
    archive.write_out(str(folder), verbose=False)
    return str(folder)


def tflite_bytes(saved_model: str, kind: str = "float32",
                 representative: np.ndarray | None = None) -> bytes:
    """float32 | optimized (dynamic-range) | int8 (full integer, uint8 input)."""
    import tensorflow as tf
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model, signature_keys=[TFLITE_SIGNATURE])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if kind in ("optimized", "int8"):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if kind == "int8":
        def samples() -> Iterator[dict[str, np.ndarray]]:
            for image in representative:
                yield {"image": image[None].astype(np.float32)}
        converter.representative_dataset = samples
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8  # pixels 0..255 go in as they are (scale 1)
    return converter.convert()


def onnx_from_tflite(tflite_path: str, onnx_path: str) -> None:
    """Via tf2onnx's TFLite front end (the Keras-graph route turns the preprocess layer's
    constants into extra inputs); inputs and outputs renamed to the signature's names."""
    import onnx
    from keras.src.export.tf2onnx_lib import patch_tf2onnx
    patch_tf2onnx()  # numpy 2 compatibility, as Keras's own ONNX export does
    import tf2onnx
    from ai_edge_litert.interpreter import Interpreter

    proto, _ = tf2onnx.convert.from_tflite(tflite_path, opset=ONNX_OPSET)
    interpreter = Interpreter(model_path=tflite_path)
    tensors = {t["index"]: t["name"] for t in interpreter.get_tensor_details()}
    signature = interpreter._get_full_signature_list()[TFLITE_SIGNATURE]
    present = {v.name for v in (*proto.graph.input, *proto.graph.output)}
    for group in ("inputs", "outputs"):
        for name, index in signature[group].items():
            old = next(n for n in (tensors[index], f"{tensors[index]}:0") if n in present)
            _rename(proto.graph, old, name)
    onnx.checker.check_model(proto)
    onnx.save(proto, onnx_path)


def _rename(graph, old: str, new: str) -> None:
    for value in (*graph.input, *graph.output):
        if value.name == old:
            value.name = new
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]


@dataclass(frozen=True)
class Conversion:
    """What the converters of the formats table (mdfer.formats) start from; each takes what it needs."""

    model: Any  # the Keras model
    saved_model: str  # the model as a SavedModel with a static batch of 1: what the TFLite converter reads
    hailo_saved_model: str  # the same without its preprocessing (for the Hailo TFLite)
    representative: np.ndarray  # train images that calibrate the int8 model
    out: Path  # the export folder: a converter may read what an earlier entry wrote there


def convert_keras(job: Conversion, path: Path) -> None:
    job.model.save(path)


def convert_tflite_float32(job: Conversion, path: Path) -> None:
    path.write_bytes(tflite_bytes(job.saved_model))


def convert_tflite_optimized(job: Conversion, path: Path) -> None:
    path.write_bytes(tflite_bytes(job.saved_model, "optimized"))


def convert_tflite_int8(job: Conversion, path: Path) -> None:
    path.write_bytes(tflite_bytes(job.saved_model, "int8", job.representative))


def convert_onnx(job: Conversion, path: Path) -> None:
    onnx_from_tflite(str(job.out / TFLITE_FLOAT32), str(path))


def convert_hailo_tflite(job: Conversion, path: Path) -> None:
    """The TFLite the Hailo DFC parses; an op its parser lacks stops the export here, before the
    slow conversions."""
    path.write_bytes(tflite_bytes(job.hailo_saved_model))
    hailo.preflight(str(path))


def convert_formats(job: Conversion) -> None:
    """Every format of the table into `job.out`, in the table's order, each by its converter."""
    for fmt in FORMATS:
        log.info("export: %s", fmt.file)
        globals()[fmt.converter](job, job.out / fmt.file)


# ---------------------------------------------------------------- parity


def _max_diff(ours: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, float]:
    return {name: float(np.abs(np.asarray(ours[name], np.float32) - reference[name]).max()) for name in reference}


def head_scores(probs: dict[str, np.ndarray], domain: np.ndarray, label: np.ndarray,
            classes: dict[str, list[str]]) -> dict:
    from mdfer.metrics import batch_confusions, summarize
    result = summarize(batch_confusions(probs, domain, label, classes), classes)
    return {"macro_f1": result["macro_f1"], "domain_accuracy": result["domain_accuracy"],
            **{f"{name}_accuracy": result["heads"][name]["accuracy"] for name in classes},
            **{f"{name}_macro_f1": result["heads"][name]["macro_f1"] for name in classes}}


def parity(model, folder: Path, images: np.ndarray, domain: np.ndarray, label: np.ndarray,
           classes: dict[str, list[str]], backbone: str) -> dict:
    """Every exported format of the table (mdfer.formats) against the Keras model on the same
    test images, each through its own runner; a format with a tolerance gets "ok" (`backbone`:
    whose normalization a format with normalized input expects done before it)."""
    from mdfer.model import preprocess_constants
    reference = {k: np.asarray(v) for k, v in model(images, training=False).items()}
    mean, std = preprocess_constants(backbone)
    normalized = (images - np.array(mean, np.float32)) / np.array(std, np.float32)
    formats = {}
    for fmt in FORMATS:
        out = fmt.open(folder)(normalized if fmt.normalized_input else images)
        diff = _max_diff(out, reference)
        entry = {"max_abs_diff": diff, **head_scores(out, domain, label, classes)}
        if fmt.tolerance is not None:
            entry["tolerance"] = fmt.tolerance
            entry["ok"] = max(diff.values()) <= fmt.tolerance
        formats[fmt.file] = entry
    float32, int8 = formats[TFLITE_FLOAT32], formats[TFLITE_INT8]
    return {"images": int(len(images)), "split": "test", "reference": "Keras model from the run's weights",
            "keras": head_scores(reference, domain, label, classes), "formats": formats,
            "int8_vs_float32": {"macro_f1_drop": float32["macro_f1"] - int8["macro_f1"],
                                "accuracy_drop": {n: float32[f"{n}_accuracy"] - int8[f"{n}_accuracy"] for n in classes}}}


# ---------------------------------------------------------------- the export


def heads_json(config: Config, preprocessing: str) -> dict:
    size = config.model.image_size
    heads = {d.name: {"classes": d.classes} for d in config.data.domains}
    heads["domain"] = {"classes": config.domain_names()}
    return {"input": {"name": "image", "shape": [1, size, size, 3], "layout": "NHWC", "channels": "RGB",
                      "range": "0..255", "preprocessing": preprocessing},
            "heads": heads, "tflite_signature": TFLITE_SIGNATURE}


def export_run(store: Store, prefix: str, require_hef: bool = False, hailo_python: str | None = None) -> dict:
    """Export the model of a finished run or sweep at `prefix`; returns the manifest.
    An existing manifest means a finished export: it is returned, nothing is rewritten. Every
    file is made and checked in a temp folder first; the store gets them only when all passed,
    and the manifest last."""
    manifest_key = export_key(prefix, MANIFEST_FILE)
    if store.exists(manifest_key):
        return _already_exported(store, prefix, require_hef)
    compiler = _check_exportable(store, prefix, require_hef, hailo_python)
    started = time.perf_counter()
    config, dataset, model = _load_source(store, prefix)
    with tempfile.TemporaryDirectory(prefix="mdfer-export-") as tmp:
        out = Path(tmp) / "export"
        ops = write_formats(model, config, store, dataset, out, Path(tmp) / "work")
        checks = _checked_parity(model, out, store, dataset, config)
        run = store.read_json(f"{prefix}/{METRICS_FILE}")
        (out / MODEL_CARD_FILE).write_text(_model_card(model, store, dataset, config, run, checks))
        hef_status = _compiled_hef(compiler, out, require_hef)
        files = _upload(store, prefix, out)
    manifest = {
        "format": MANIFEST_FORMAT, "run_id": run["run_id"], "dataset_id": dataset.dataset_id,
        "source": store.key_uri(prefix), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "image_size": config.model.image_size, "files": files, "parity": checks,
        "hailo": {"hw_arch": hailo.HW_ARCH, "ops": ops}, "hef": hef_status,
        "compile_hef": None if hef_status == "compiled" else
        f"in the Hailo DFC environment, in the fetched export folder: {hailo.compile_command()}",
        "seconds": round(time.perf_counter() - started, 1),
    }
    store.write_json(manifest_key, manifest)  # last: the export is whole
    return manifest


def _model_card(model, store: Store, dataset: DatasetManifest, config: Config, run: dict, checks: dict) -> str:
    """MODEL_CARD.md: the test split scored by this model, without and with flip TTA."""
    from mdfer import model_card
    from mdfer.evaluate import evaluate_model, keras_predict
    log.info("export: model card (the test split, without and with flip TTA)")
    scores = [evaluate_model(keras_predict(model), store, dataset, "test", config.classes(), config.model.image_size, flip)
              for flip in (False, True)]
    return model_card.render(config, dataset, run, *scores, checks)


def _already_exported(store: Store, prefix: str, require_hef: bool) -> dict:
    existing = store.read_json(export_key(prefix, MANIFEST_FILE))
    if require_hef and existing["hef"] != "compiled":
        raise MdferError(f"--require-hef: {store.key_uri(export_key(prefix, MANIFEST_FILE))} is a finished "
                         f"export without a HEF ({existing['hef']}); compile its hailo/ bundle: "
                         f"{hailo.compile_command()}")
    log.info("%s: already exported, nothing written", store.key_uri(export_key(prefix)))
    return {**existing, "skipped": True}


def _check_exportable(store: Store, prefix: str, require_hef: bool, hailo_python: str | None) -> hailo.Compiler:
    """A finished run there, and a compiler when a HEF is required: before TensorFlow starts."""
    if not store.exists(f"{prefix}/{METRICS_FILE}"):
        raise MdferError(f"{store.key_uri(prefix)}: no finished run or sweep there (train it first)")
    compiler = hailo.find_compiler(hailo_python)
    if require_hef and not compiler.python:
        raise MdferError(f"--require-hef: {compiler.reason}; install the Hailo Dataflow Compiler "
                         f"and pass --hailo-python or set {hailo.HAILO_PYTHON_ENV}")
    return compiler


def _load_source(store: Store, prefix: str) -> tuple[Config, DatasetManifest, Any]:
    """The run's config, its dataset's manifest and its model (TensorFlow and Ray come in here)."""
    from mdfer.model import model_with_weights

    config = read_run_config(store, prefix)
    dataset = read_manifest(store, store.read_json(f"{prefix}/{RUN_FILE}")["dataset_id"])
    check_dataset_matches(config, dataset)
    return config, dataset, model_with_weights(config, store.key_uri(f"{prefix}/{FINAL_WEIGHTS_FILE}"))


def write_formats(model, config: Config, store: Store, dataset: DatasetManifest, out: Path, work: Path) -> dict:
    """Every format of the table (mdfer.formats) into `out`, each by its converter, then
    heads.json and the rest of the Hailo bundle (the normalization script, calib.npy, the compile
    script). Returns the Hailo op pre-flight."""
    from mdfer.model import preprocess_constants, without_preprocess

    size = config.model.image_size
    (out / HAILO_DIR).mkdir(parents=True)
    work.mkdir()
    calib = split_images(store, dataset, "train", size, config.export.calib_images)[0].astype(np.float32)
    job = Conversion(model, _saved_model(model, size, work / "saved_model"),
                     _saved_model(without_preprocess(model), size, work / "saved_model_hailo"),
                     calib[:config.export.representative_images], out)
    log.info("export: %d px, batch 1; %d train images calibrate the int8 model", size, len(job.representative))
    convert_formats(job)
    ops = hailo.tflite_ops(str(out / HAILO_TFLITE))  # for the manifest; convert_hailo_tflite ran the pre-flight

    mean, std = preprocess_constants(config.model.backbone)
    np.save(out / HAILO_DIR / HAILO_CALIB_FILE, calib)
    (out / HAILO_DIR / HAILO_SCRIPT_FILE).write_text(hailo.model_script(mean, std))
    shutil.copy(hailo.COMPILE_SCRIPT, out / HAILO_DIR / hailo.COMPILE_SCRIPT.name)
    (out / HEADS_FILE).write_text(json.dumps(heads_json(config, "inside the model"), indent=2))
    (out / HAILO_DIR / HEADS_FILE).write_text(json.dumps(heads_json(
        config, f"normalization in {HAILO_SCRIPT_FILE}: "
                f"(x - {[round(m, 3) for m in mean]}) / {[round(s, 3) for s in std]}"),
        indent=2))
    return ops


def _checked_parity(model, out: Path, store: Store, dataset: DatasetManifest, config: Config) -> dict:
    """Every format against Keras on test images; a format off by more than its tolerance
    stops the export before anything reaches the store."""
    log.info("export: parity on up to %s test images", config.export.parity_images or "all")
    checks = parity(model, out, *split_images(store, dataset, "test", config.model.image_size,
                                              config.export.parity_images), config.classes(),
                    config.model.backbone)
    broken = [name for name, entry in checks["formats"].items() if entry.get("ok") is False]
    if broken:
        raise MdferError("export parity failed: " + ", ".join(
            f"{name} max |diff| {max(checks['formats'][name]['max_abs_diff'].values()):.2e} > "
            f"{checks['formats'][name]['tolerance']}" for name in broken) + "; nothing was written to the store")
    return checks


def _compiled_hef(compiler: hailo.Compiler, out: Path, require_hef: bool) -> str:
    """"compiled", or why not (no compiler; the compiler's failure, fatal with --require-hef)."""
    if not compiler.python:
        log.info("export: hef %s", compiler.reason)
        return compiler.reason
    log.info("export: compiling the HEF with %s", compiler.python)
    try:
        hailo.compile_hef(compiler, out / HAILO_DIR)
        status = "compiled"
    except MdferError as exc:
        if require_hef:
            raise
        status = f"not compiled (compiler failed: {exc})"
    log.info("export: hef %s", status)
    return status


def _upload(store: Store, prefix: str, out: Path) -> dict[str, dict]:
    """Every file of `out` to `<prefix>/export/`; returns name -> size and sha256."""
    files = {str(path.relative_to(out)): {"size": path.stat().st_size, "sha256": sha256_file(path)}
             for path in sorted(out.rglob("*")) if path.is_file()}
    for name in files:
        store.write_bytes(export_key(prefix, name), (out / name).read_bytes())
    return files


def export_summary_lines(manifest: dict) -> list[str]:
    """What a user reads after an export: files, parity, int8 cost, HEF status."""
    lines = [f"{'file':<42} {'bytes':>11}  sha256"]
    lines += [f"{name:<42} {entry['size']:>11}  {entry['sha256'][:12]}" for name, entry in manifest["files"].items()]
    checks = manifest["parity"]
    lines.append(f"parity on {checks['images']} test images (max |diff| vs Keras; macro-F1):")
    for name, entry in checks["formats"].items():
        lines.append(f"  {name:<40} {max(entry['max_abs_diff'].values()):.2e}  macro-F1 {entry['macro_f1']:.4f}"
                     + ("" if "ok" not in entry else "  ok" if entry["ok"] else "  FAILED"))
    lines.append(f"int8 macro-F1 drop vs float32: {checks['int8_vs_float32']['macro_f1_drop']:+.4f}")
    lines.append(f"hef: {manifest['hef']}")
    if manifest.get("compile_hef"):
        lines.append(f"  to compile later: {manifest['compile_hef']}")
    return lines
