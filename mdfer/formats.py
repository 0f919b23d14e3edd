"""The exported model formats, in one table: each file, how export makes it, which runner runs
it, how close to the Keras model it must stay, and what input it takes.

Export (its conversion loop and parity), `predict` (which runner opens a file) and the latency
benchmark all read this table, so adding a format is one entry here (and its converter). Standard
library only: `predict` runs without TensorFlow, so converters and runners are named here and
resolved where they live. The file names themselves are mdfer.layout's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from mdfer.layout import HAILO_TFLITE, KERAS_FILE, ONNX_FILE, TFLITE_FLOAT32, TFLITE_INT8, TFLITE_OPTIMIZED

FLOAT_TOLERANCE = 1e-3  # max |probability difference| a float32 format may show against Keras


@dataclass(frozen=True)
class Format:
    file: str  # relative to the export folder
    converter: str  # the function in mdfer.export that writes it: (export.Conversion, Path) -> None
    runner: str  # the class in mdfer.predict that runs it: (path, num_threads) -> {head: probabilities}
    tolerance: float | None  # parity's bound on |probability - Keras's|; None: quantized, scored but not bound
    normalized_input: bool = False  # takes images already normalized (the Hailo TFLite: the .alls does it on the chip)

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.file).suffix

    def open(self, folder: str | Path, num_threads: int | None = None) -> Any:
        """This format's runner on its file in the export `folder`."""
        from mdfer import predict
        return getattr(predict, self.runner)(str(Path(folder) / self.file), num_threads)


# In conversion order (a converter may read what an earlier one wrote); parity and its report
# follow the same order.
FORMATS = (
    Format(KERAS_FILE, "convert_keras", "KerasRunner", FLOAT_TOLERANCE),
    Format(TFLITE_FLOAT32, "convert_tflite_float32", "TFLiteRunner", FLOAT_TOLERANCE),
    # before the slow conversions: its converter runs the Hailo op pre-flight
    Format(HAILO_TFLITE, "convert_hailo_tflite", "TFLiteRunner", FLOAT_TOLERANCE, normalized_input=True),
    Format(TFLITE_OPTIMIZED, "convert_tflite_optimized", "TFLiteRunner", None),
    Format(TFLITE_INT8, "convert_tflite_int8", "TFLiteRunner", None),
    Format(ONNX_FILE, "convert_onnx", "OnnxRunner", FLOAT_TOLERANCE),  # from the float32 TFLite
)

# `predict` opens a model file by its suffix (every format with one suffix has one runner)
RUNNERS_BY_SUFFIX = {f.suffix: f.runner for f in FORMATS}
