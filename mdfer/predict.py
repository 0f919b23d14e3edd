"""`mdfer predict` and the runners behind it: one way to run every exported format.

Export's parity checks and the latency benchmark run the models through the same runners,
so what is measured is what a user runs. Every runner takes RGB images as float32 0..255,
[N, size, size, 3], and returns {head: probabilities [N, classes]}.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mdfer.errors import MdferError
from mdfer.layout import HEADS_FILE

TFLITE_SIGNATURE = "serve"
MODEL_SUFFIXES = (".keras", ".tflite", ".onnx")

Runner = Callable[[np.ndarray], dict[str, np.ndarray]]


def _image_size(path: str, shape) -> int:
    """The square size of an NHWC RGB image input [1|?, size, size, 3]; a clear error otherwise
    (a foreign model with an NCHW or flat input would fail later with a shape error)."""
    dims = list(shape)
    if len(dims) != 4 or dims[3] != 3 or dims[1] != dims[2] or not isinstance(dims[1], (int, np.integer)):
        raise MdferError(f"{path}: its input has shape {dims}, not [1, size, size, 3] (NHWC RGB): "
                         f"not an mdfer export")
    return int(dims[1])


class KerasRunner:
    def __init__(self, path: str):
        import zipfile
        if not zipfile.is_zipfile(path):  # before TensorFlow starts (seconds, and its start-up lines)
            raise MdferError(f"{path}: not a .keras file (a .keras model is a zip archive)")
        import keras
        self.model = keras.saving.load_model(path, compile=False, safe_mode=True)
        self.image_size = _image_size(path, self.model.input_shape)
        self.heads = list(self.model.output_names)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        out = self.model(np.asarray(images, np.float32), training=False)
        return {name: np.asarray(value) for name, value in out.items()}


class TFLiteRunner:
    """Batch 1 at a time (the exports have a static batch of 1); outputs read by signature name.
    A uint8 input (the int8 model) takes the pixels as they are: its input scale is 1, zero 0."""

    def __init__(self, path: str, num_threads: int | None = None):
        from ai_edge_litert.interpreter import Interpreter
        self.interpreter = Interpreter(model_path=path, num_threads=num_threads)
        signatures = self.interpreter.get_signature_list()
        if TFLITE_SIGNATURE not in signatures:
            raise MdferError(f"{path}: no {TFLITE_SIGNATURE!r} signature (has {', '.join(signatures)}); "
                             f"not an mdfer export")
        self.runner = self.interpreter.get_signature_runner(TFLITE_SIGNATURE)
        (name, detail), = self.runner.get_input_details().items()
        self.input_name, self.input_dtype = name, detail["dtype"]
        self.image_size = _image_size(path, detail["shape"])
        self.heads = list(signatures[TFLITE_SIGNATURE]["outputs"])

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        outputs: dict[str, list[np.ndarray]] = {name: [] for name in self.heads}
        for image in np.asarray(images, np.float32):
            if self.input_dtype == np.uint8:
                image = np.clip(np.round(image), 0, 255)
            result = self.runner(**{self.input_name: image[None].astype(self.input_dtype)})
            for name in self.heads:
                outputs[name].append(result[name][0])
        return {name: np.stack(values) for name, values in outputs.items()}


class OnnxRunner:
    def __init__(self, path: str):
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise MdferError(f"{path}: {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); an mdfer "
                             f"export has one image input")
        (self.input,) = inputs
        self.image_size = _image_size(path, self.input.shape)
        self.heads = [output.name for output in self.session.get_outputs()]

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        rows = [self.session.run(self.heads, {self.input.name: image[None]})
                for image in np.asarray(images, np.float32)]
        return {name: np.concatenate([row[i] for row in rows]) for i, name in enumerate(self.heads)}


def open_model(path: str, num_threads: int | None = None) -> KerasRunner | TFLiteRunner | OnnxRunner:
    """A runner for a .keras, .tflite or .onnx file; a clear error for anything else."""
    file = Path(path)
    if not file.is_file():
        raise MdferError(f"{path}: model file not found")
    if file.suffix not in MODEL_SUFFIXES:
        raise MdferError(f"{path}: unknown model format {file.suffix or '(no suffix)'!r}; "
                         f"use one of {', '.join(MODEL_SUFFIXES)}")
    try:
        if file.suffix == ".keras":
            return KerasRunner(path)
        if file.suffix == ".tflite":
            return TFLiteRunner(path, num_threads)
        return OnnxRunner(path)
    except MdferError:
        raise
    except Exception as exc:  # a damaged or foreign file: each library words it differently
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MdferError(f"{path}: cannot load as {file.suffix[1:]} model: {first}") from exc


def load_image(path: str, size: int) -> np.ndarray:
    """One image file (grayscale or colour, any size) as the models take it: the same decode and
    resize as training (`images.decode_image`)."""
    from mdfer.images import decode_image
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise MdferError(f"{path}: cannot read image: {exc.strerror or exc}") from exc
    try:
        return np.asarray(decode_image(data, size), np.float32)
    except Exception as exc:
        raise MdferError(f"{path}: not a readable image ({type(exc).__name__})") from exc


def expand_inputs(paths: list[str]) -> list[str]:
    """Files as given; a folder stands for every file under it (sorted, hidden ones left out)."""
    files = []
    for path in paths:
        folder = Path(path)
        if folder.is_dir():
            files += sorted(str(p) for p in folder.rglob("*")
                            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
        else:
            files.append(path)
    return files


def head_classes(model_path: str) -> dict[str, list[str]]:
    """Class names per head from the heads.json beside the model (empty when there is none)."""
    sidecar = Path(model_path).with_name(HEADS_FILE)
    if not sidecar.is_file():
        return {}
    try:
        return {name: list(head["classes"]) for name, head in json.loads(sidecar.read_text())["heads"].items()}
    except json.JSONDecodeError as exc:
        raise MdferError(f"{sidecar}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except (KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise MdferError(f"{sidecar}: not an mdfer heads file (expected {{\"heads\": {{name: {{\"classes\": [...]}}}}}})") from None


def predict_files(model_path: str, image_paths: list[str]) -> list[dict]:
    """Per image, per head (in heads.json's order; a runtime may list them otherwise): the
    probabilities by class name and the top class. An image that cannot be read gets
    {"image", "error"} instead, and the others are still predicted."""
    runner = open_model(model_path)
    classes = head_classes(model_path)
    results = []
    for path in expand_inputs(image_paths):
        try:
            image = load_image(path, runner.image_size)
        except MdferError as exc:
            results.append({"image": path, "error": str(exc)})
            continue
        probs = runner(image[None])
        heads = {}
        for name in [h for h in classes if h in runner.heads] + [h for h in runner.heads if h not in classes]:
            row = [float(p) for p in probs[name][0]]
            labels = classes.get(name) or [str(i) for i in range(len(row))]
            heads[name] = {"top": labels[int(np.argmax(row))],
                           "probabilities": dict(zip(labels, (round(p, 6) for p in row)))}
        results.append({"image": path, "heads": heads})
    return results
