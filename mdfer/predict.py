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
from PIL import Image

from mdfer.config import DOMAIN_HEAD
from mdfer.errors import TRAIN_EXTRA, MdferError
from mdfer.faces import FACE_MARGIN, FaceDetector, annotate, annotated_path, face_crop
from mdfer.formats import RUNNERS_BY_SUFFIX
from mdfer.images import model_input
from mdfer.layout import HEADS_FILE

TFLITE_SIGNATURE = "serve"
MODEL_SUFFIXES = tuple(RUNNERS_BY_SUFFIX)  # mdfer.formats: which runner class below opens which file

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
    """`num_threads` is not the runner's to set: TensorFlow's threads are per process."""

    def __init__(self, path: str, num_threads: int | None = None):
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
    def __init__(self, path: str, num_threads: int | None = None):
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if num_threads:
            options.intra_op_num_threads = num_threads
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
        return globals()[RUNNERS_BY_SUFFIX[file.suffix]](path, num_threads)
    except MdferError:
        raise
    except ModuleNotFoundError as exc:  # the light install runs .tflite only
        raise MdferError(f"{path}: a {file.suffix} model needs {exc.name}, not installed here: "
                         f"{TRAIN_EXTRA} (or use the .tflite)") from None
    except Exception as exc:  # a damaged or foreign file: each library words it differently
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MdferError(f"{path}: cannot load as {file.suffix[1:]} model: {first}") from exc


def read_photo(path: str, upright: bool = False) -> Image.Image:
    """One image file (grayscale or colour, any size) as 8-bit RGB at its own size, decoded as
    training decodes (`images.decode_photo`); `upright`: turned by its EXIF orientation."""
    from mdfer.images import decode_photo
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise MdferError(f"{path}: cannot read image: {exc.strerror or exc}") from exc
    try:
        return decode_photo(data, upright)
    except Exception as exc:
        raise MdferError(f"{path}: not a readable image ({type(exc).__name__})") from exc


def expand_inputs(paths: list[str]) -> list[tuple[str, str]]:
    """(path, problem) per input, problem "" for a file to read: files as given; a folder stands
    for every entry under it, listed as `prepare` lists (`listing.list_local`: a broken link, a
    link loop, a link to a folder, which is not followed, each with its problem), sorted,
    hidden ones left out."""
    from mdfer.listing import list_local
    found = []
    for path in paths:
        if not Path(path).is_dir():
            found.append((path, ""))
            continue
        try:
            entries = sorted(list_local(path), key=lambda entry: entry.path)
        except OSError as exc:
            found.append((path, f"cannot read folder: {exc.strerror or exc}"))
            continue
        found += [(str(Path(path) / entry.path), entry.problem) for entry in entries
                  if not any(part.startswith(".") for part in entry.path.split("/"))]
    return found


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


def label_head(heads: list[str], wanted: str | None, model_path: str) -> str:
    """The head whose top class labels an annotated face: `wanted`, else the first dataset head."""
    if wanted is None:
        return next((head for head in heads if head != DOMAIN_HEAD), heads[0])
    if wanted not in heads:
        raise MdferError(f"--annotate-head {wanted!r}: {model_path} has the heads {', '.join(heads)}")
    return wanted


def _heads(probs: dict[str, np.ndarray], order: list[str], classes: dict[str, list[str]]) -> dict:
    heads = {}
    for name in order:
        row = [float(p) for p in probs[name][0]]
        labels = classes.get(name) or [str(i) for i in range(len(row))]
        heads[name] = {"top": labels[int(np.argmax(row))],
                       "probabilities": dict(zip(labels, (round(p, 6) for p in row)))}
    return heads


def predict_files(model_path: str, image_paths: list[str], detector: FaceDetector | None = None,
                  margin: float = FACE_MARGIN, annotate_dir: str | None = None,
                  annotate_head: str | None = None) -> list[dict]:
    """Per image, or with a face `detector` per face found in it (its "face" number and "box"
    [x, y, width, height]), per head (in heads.json's order; a runtime may list them otherwise):
    the probabilities by class name and the top class. Every input has an entry: one with no
    prediction (unreadable, a link not followed, no face found) gets {"image", "error"}, and the
    others are still predicted. `annotate_dir`: a PNG per predicted image, its faces boxed and
    labelled with the top class of `annotate_head` (`label_head`); its rows name it."""
    runner = open_model(model_path)
    classes = head_classes(model_path)
    order = [h for h in classes if h in runner.heads] + [h for h in runner.heads if h not in classes]
    if annotate_dir:
        labelled_by = label_head(order, annotate_head, model_path)
        try:
            Path(annotate_dir).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MdferError(f"{annotate_dir}: cannot make the --annotate folder: {exc.strerror or exc}") from None
    written: set[Path] = set()
    results = []
    for path, problem in expand_inputs(image_paths):
        try:
            if problem:
                raise MdferError(f"{path}: {problem}")
            photo = read_photo(path, upright=detector is not None)
            boxes = detector(photo) if detector else [(0, 0, *photo.size)]
            if not boxes:
                raise MdferError(f"{path}: no face found (none of {detector.min_face} px or more)")
        except MdferError as exc:
            results.append({"image": path, "error": str(exc)})
            continue
        rows = []
        for number, box in enumerate(boxes, 1):
            face = face_crop(photo, box, margin) if detector else photo
            pixels = np.asarray(model_input(face, runner.image_size), np.float32)
            rows.append({"image": path, **({"face": number, "box": list(box)} if detector else {}),
                         "heads": _heads(runner(pixels[None]), order, classes)})
        if annotate_dir:
            out = annotated_path(Path(annotate_dir), path, written)
            tops = [row["heads"][labelled_by] for row in rows]
            annotate(photo, [(box, f"{top['top']} {top['probabilities'][top['top']]:.2f}")
                             for box, top in zip(boxes, tops)]).save(out)
            for row in rows:
                row["annotated"] = str(out)
        results += rows
    return results
