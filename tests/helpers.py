"""Helpers the test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

MDFER = [sys.executable, "-m", "mdfer.cli"]
DEMO = Path(__file__).parents[1] / "mdfer" / "configs" / "demo.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_mdfer(*args: str, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """`mdfer ...` as a user runs it; RAY_ADDRESS="" so it starts (and stops) a private local Ray."""
    return subprocess.run([*MDFER, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "RAY_ADDRESS": "", **(env or {})})


def train_args(data: dict, run_id: str, config: Path | None = None) -> list[str]:
    return ["train", "--config", str(config or data["config"]), "--store", data["store"].uri,
            "--dataset-id", data["dataset_id"], "--run-id", run_id]


def generated_demo_config(root: Path, fer_train: int, fer_test: int, fane: int, seed: int,
                          edit=None) -> tuple[Path, dict]:
    """Generated FER-like and FANE-like folders under `root` and demo.yaml pointing at them,
    changed by `edit(raw)`; returns the config's path and its dict."""
    import yaml

    from mdfer import synth
    synth.write_fer_like(root / "fer2013", train_per_class=fer_train, test_per_class=fer_test, seed=seed)
    synth.write_fane_like(root / "fane", per_class=fane, seed=seed + 1)
    raw = yaml.safe_load(DEMO.read_text())
    raw["data"]["domains"][0]["root"] = str(root / "fer2013")
    raw["data"]["domains"][1]["root"] = str(root / "fane")
    if edit:
        edit(raw)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, raw


def path_without_hailo() -> str:
    """PATH without any folder holding a `hailo` command: the test machine has no Hailo compiler,
    and a stray one must not change that."""
    return os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "hailo").exists())
