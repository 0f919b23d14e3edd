"""The install people know: `pip install mdfer` (numpy, Pillow, PyYAML, LiteRT) predicts on a
.tflite, and a command of the training stack says in one line which extra to install."""

from __future__ import annotations

import json
import shutil
import subprocess
import venv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import run_mdfer

REPO = Path(__file__).parents[1]
HEAVY = ("ray", "tensorflow", "keras", "pyarrow", "boto3", "onnxruntime", "cv2")


def plain_install(folder: Path) -> Path:
    """A fresh venv with `pip install <this checkout>`, no extras; its bin folder. Built from a
    copy of the sources: pip builds in the source tree, which other work may be changing."""
    source = folder / "source"
    for name in ("mdfer", "requirements"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "MANIFEST.in"):
        shutil.copy(REPO / name, source / name)
    venv.create(folder / "venv", with_pip=True)
    bin_dir = folder / "venv" / "bin"
    done = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", str(source)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return bin_dir


@pytest.mark.slow
def test_the_plain_install_predicts_and_names_the_extra_for_the_rest(tiny_tflite, tmp_path):
    bin_dir = plain_install(tmp_path / "light")
    present = subprocess.run([str(bin_dir / "python"), "-c", "import importlib.util as u; "
                              f"print([m for m in {HEAVY!r} if u.find_spec(m)])"], capture_output=True, text=True)
    assert present.stdout.strip() == "[]", present.stdout + present.stderr  # none of them is there

    def light(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(bin_dir / "mdfer"), *args], capture_output=True, text=True, timeout=300,
                              cwd=tmp_path)

    # predict on a .tflite: the same probabilities as the full install
    image = tmp_path / "face.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (57, 61), dtype=np.uint8), "L").save(image)
    ours = light("predict", str(image), "--model", str(tiny_tflite), "--json")
    assert ours.returncode == 0, ours.stderr[-3000:]
    full = run_mdfer("predict", str(image), "--model", str(tiny_tflite), "--json")
    (row,), (reference,) = json.loads(ours.stdout), json.loads(full.stdout)
    assert list(row["heads"]) == list(reference["heads"]) == ["fer2013", "fane", "domain"]
    for head, entry in reference["heads"].items():  # pip may resolve other numpy/Pillow/LiteRT versions
        assert row["heads"][head]["top"] == entry["top"]
        np.testing.assert_allclose(list(row["heads"][head]["probabilities"].values()),
                                   list(entry["probabilities"].values()), atol=1e-4)
    assert light("synth", "--out", str(tmp_path / "data"), "--per-class", "1").returncode == 0

    # everything else: one line naming the extra, exit 2, no traceback
    (tmp_path / "m.onnx").write_bytes(b"not needed: the runtime is missing first")
    for args, expected in (
            (["train", "--dataset-id", "ds", "--run-id", "r"],
             'mdfer train: error: needs the training stack (ray, tensorflow, pyarrow, boto3 not installed): '
             'pip install "mdfer[train]"'),
            (["artifacts", "list", "--run-id", "r"],
             'mdfer artifacts: error: needs the training stack (ray, tensorflow, pyarrow, boto3 not installed): '
             'pip install "mdfer[train]"'),
            (["predict", str(image), "--model", str(tiny_tflite), "--detect-faces"],
             'mdfer predict: error: --detect-faces needs OpenCV: pip install "mdfer[faces]"'),
            (["predict", str(image), "--model", str(tmp_path / "m.onnx")],
             f'mdfer predict: error: {tmp_path / "m.onnx"}: a .onnx model needs onnxruntime, not installed here: '
             f'pip install "mdfer[train]" (or use the .tflite)')):
        done = light(*args)
        assert (done.returncode, done.stderr.strip()) == (2, expected), done.stderr[-3000:]
