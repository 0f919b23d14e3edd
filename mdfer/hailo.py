"""The Hailo-8 side of export: the ops the Dataflow Compiler's parser takes, the model script
(.alls) that carries the input normalization, and compiling the bundle to a HEF.

The Dataflow Compiler (DFC, `hailo_sdk_client`) is not on PyPI and pins its own numpy and
TensorFlow, so it is never imported here: it runs as a separate Python interpreter on
`hailo_compile.py`, which is also copied into the bundle so the HEF can be built later,
elsewhere, with one command.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from mdfer.errors import MdferError
from mdfer.layout import HEF_FILE

HW_ARCH = "hailo8"
COMPILE_SCRIPT = Path(__file__).with_name("hailo_compile.py")
HAILO_PYTHON_ENV = "MDFER_HAILO_PYTHON"
NOT_FOUND = "not compiled (Hailo Dataflow Compiler not found)"

# TFLite builtin ops the DFC 3.x parser translates for Hailo-8. Source: Hailo Dataflow Compiler
# User Guide, release 3.30.0 (January 2025), section 5.5 "Supported Layers", TFLite column,
# transcribed by hand and kept conservative: an op missing here fails the export early rather
# than the compiler late. QUANTIZE/DEQUANTIZE are absent on purpose: the HEF input is the
# float32 model; the DFC quantizes it itself.
HAILO8_TFLITE_OPS = frozenset({
    "ABS", "ADD", "AVERAGE_POOL_2D", "BATCH_MATMUL", "CONCATENATION", "CONV_2D",
    "DEPTH_TO_SPACE", "DEPTHWISE_CONV_2D", "DIV", "ELU", "EXP", "FULLY_CONNECTED", "GELU",
    "HARD_SWISH", "LEAKY_RELU", "LOG", "LOGISTIC", "MAX_POOL_2D", "MAXIMUM", "MEAN", "MINIMUM",
    "MUL", "PAD", "PRELU", "REDUCE_MAX", "RELU", "RELU6", "RELU_N1_TO_1", "RESHAPE",
    "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR", "RSQRT", "SOFTMAX", "SPACE_TO_DEPTH", "SPLIT",
    "SQRT", "SQUARE", "SQUEEZE", "STRIDED_SLICE", "SUB", "SUM", "TANH", "TRANSPOSE",
    "TRANSPOSE_CONV",
})


def tflite_ops(path: str) -> list[str]:
    """The builtin op names a .tflite file uses, sorted."""
    from ai_edge_litert.interpreter import Interpreter
    interpreter = Interpreter(model_path=path)
    return sorted({op["op_name"] for op in interpreter._get_ops_details()})


def preflight(path: str) -> list[str]:
    """Fail before any compile time is spent if the model holds an op the Hailo-8 parser lacks."""
    ops = tflite_ops(path)
    unsupported = [op for op in ops if op not in HAILO8_TFLITE_OPS]
    if unsupported:
        raise MdferError(f"{path}: ops the Hailo-8 parser does not support: {', '.join(unsupported)} "
                         f"(list: mdfer/hailo.py, from the Hailo DFC 3.30 user guide)")
    return ops


def model_script(mean: list[float], std: list[float]) -> str:
    """The .alls: normalization runs on the chip, so the HEF takes raw 0..255 RGB pixels."""
    def floats(values: list[float]) -> str:
        return ", ".join(f"{v:.6g}" for v in values)
    return (f"normalization1 = normalization([{floats(mean)}], [{floats(std)}])\n"
            "model_optimization_flavor(optimization_level=2, compression_level=0)\n")


def compile_command(bundle: str = "hailo") -> str:
    return f"python {bundle}/{COMPILE_SCRIPT.name} {bundle} --hw-arch {HW_ARCH}"


@dataclass
class Compiler:
    python: str | None  # an interpreter that imports hailo_sdk_client
    reason: str  # why none was found, for the manifest and the log


def find_compiler(configured: str | None = None) -> Compiler:
    """The DFC's Python: --hailo-python, else $MDFER_HAILO_PYTHON, else the interpreter behind a
    `hailo` command on PATH (its shebang)."""
    candidates = [c for c in (configured, os.environ.get(HAILO_PYTHON_ENV)) if c]
    hailo_cli = shutil.which("hailo")
    if hailo_cli:
        first_line = Path(hailo_cli).read_bytes()[:512].split(b"\n")[0].decode(errors="replace")
        if first_line.startswith("#!"):
            candidates.append(first_line[2:].strip().split()[0])
    tried = []
    for python in candidates:
        try:
            probe = subprocess.run([python, "-c", "import hailo_sdk_client"], capture_output=True,
                                   text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            tried.append(f"{python}: {type(exc).__name__}")
            continue
        if probe.returncode == 0:
            return Compiler(python, "")
        tried.append(f"{python}: cannot import hailo_sdk_client")
    return Compiler(None, NOT_FOUND + (f": tried {'; '.join(tried)}" if tried else ""))


def compile_hef(compiler: Compiler, bundle: Path, timeout_s: int = 4 * 3600) -> Path:
    """Run the DFC on the bundle; the HEF lands in the bundle."""
    result = subprocess.run([compiler.python, str(bundle / COMPILE_SCRIPT.name), str(bundle),
                             "--hw-arch", HW_ARCH], capture_output=True, text=True, timeout=timeout_s)
    hef = bundle / HEF_FILE
    if result.returncode != 0 or not hef.is_file():
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise MdferError(f"Hailo Dataflow Compiler failed on {bundle}: {last[0]}")
    return hef
