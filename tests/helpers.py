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
