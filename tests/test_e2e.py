"""End to end, as a user works: a Ray head started with `ray start --head` on 127.0.0.1, the
pipeline submitted with `ray job submit`, the store on the real S3 server, then the artifacts
fetched with `mdfer artifacts fetch` and a fetched model run with `mdfer predict`.

The job is stopped once its stage is finished, while it evaluates and exports, and submitted
again: the second job trains nothing and finishes the evaluation and the export. (One stage: a
stage starting from the previous one's weights on s3:// is tests/test_model.py's.)
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import BIN, RayNode, generated_demo_config, run_mdfer
from mdfer.stages import LOCAL_RAY_SYSTEM_CONFIG
from mdfer.storage import Store

REPO = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory, s3_server):
    """A head node of our own: its own ports and temp dir, token authentication on (a random
    token in the environment, nothing written to ~/.ray), the S3 credentials in the node's
    environment as an instance role would give them. Stopped by its process id."""
    if not s3_server.running:
        s3_server.start()
    env = {**os.environ, **s3_server.env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_ADDRESS": ""}
    env.pop("RAY_API_SERVER_ADDRESS", None)
    head = RayNode(tmp_path_factory.mktemp("rayhead") / "ray_start.log", env, system_config=LOCAL_RAY_SYSTEM_CONFIG)
    try:
        head.wait_for_jobs()
        yield {"address": head.address, "env": head.env}
    finally:
        head.stop()


def _ray_job(head: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    command, *rest = args  # --address before the entrypoint's `--`
    return subprocess.run([str(BIN / "ray"), "job", command, "--address", head["address"], *rest],
                          env=head["env"], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _job_state(head: dict, job: str) -> str:
    """SUCCEEDED, STOPPED, FAILED, or what `ray job status` says while it runs."""
    done = _ray_job(head, "status", job)
    text = done.stdout + done.stderr
    for state, words in (("SUCCEEDED", "succeeded"), ("STOPPED", "was stopped"), ("FAILED", "failed")):
        if f"Job '{job}' {words}" in text:
            return state
    found = re.search(r"Status for job '[^']+': (\w+)", text)
    return found.group(1) if found else "UNKNOWN"


def _wait_status(head: dict, job: str, wanted: set[str], timeout: float = 900) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = _job_state(head, job)
        if state in wanted:
            return state
        if state in ("SUCCEEDED", "FAILED", "STOPPED"):
            raise AssertionError(f"job {job} ended {state}:\n{_ray_job(head, 'logs', job).stdout[-4000:]}")
        time.sleep(3)
    raise AssertionError(f"job {job} did not reach {wanted} in {timeout} s (last: {state})")


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    """Generated data and a config small enough for a job that finishes in a few minutes."""
    def shrink(raw: dict) -> None:
        raw["model"]["image_size"] = 32
        raw["stream"]["batch_size"] = 16
        raw["train"].update(workers=1, cpus_per_worker=1)
        raw["train"]["stages"] = [dict(raw["train"]["stages"][0], epochs=1, patience=1)]
        raw["export"] = {"calib_images": 16, "representative_images": 16, "parity_images": 0}

    path, _ = generated_demo_config(tmp_path_factory.mktemp("e2e-data"), fer_train=20, fer_test=4, fane=16,
                                    seed=31, edit=shrink)
    return path


def test_pipeline_job_stopped_resubmitted_fetched_and_predicted(ray_head, tiny_config, s3_env, tmp_path):
    s3_server = s3_env
    store_uri = f"s3://{s3_server.bucket}/e2e-{secrets.token_hex(4)}"
    store = Store(store_uri)
    entry = ["--", "python", "jobs/pipeline.py", "--config", str(tiny_config), "--store", store_uri, "--run-id", "e2e"]

    first = _ray_job(ray_head, "submit", "--working-dir", ".", "--no-wait", "--submission-id", "e2e-first", *entry)
    assert first.returncode == 0, first.stderr[-3000:]
    deadline = time.time() + 900
    while not store.exists("runs/e2e/stage1/done.json"):
        assert time.time() < deadline, _ray_job(ray_head, "logs", "e2e-first").stdout[-4000:]
        time.sleep(2)
    stopped = _ray_job(ray_head, "stop", "e2e-first")
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    _wait_status(ray_head, "e2e-first", {"STOPPED", "SUCCEEDED"}, timeout=120)
    first_logs = _ray_job(ray_head, "logs", "e2e-first").stdout
    assert "stage1 epoch 1/1: loss" in first_logs  # a line per epoch with the metrics

    second = _ray_job(ray_head, "submit", "--working-dir", ".", "--submission-id", "e2e-second", *entry, timeout=1200)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-2000:]
    _wait_status(ray_head, "e2e-second", {"SUCCEEDED"}, timeout=60)
    logs = _ray_job(ray_head, "logs", "e2e-second").stdout
    assert "stage1: already complete" in logs and "epoch 1/1" not in logs  # resumed, not redone
    assert "export: s3://" in logs and "hef: not compiled" in logs and "pipeline finished in" in logs
    assert s3_server.env()["AWS_SECRET_ACCESS_KEY"] not in first_logs + logs

    fetched = tmp_path / "fetched"
    done = run_mdfer("artifacts", "fetch", "--store", store_uri, "--run-id", "e2e", "--dest", str(fetched),
                     env=s3_server.env())
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((fetched / "manifest.json").read_text())
    assert {p.relative_to(fetched).as_posix() for p in fetched.rglob("*") if p.is_file()} == {*manifest["files"], "manifest.json"}

    face = tmp_path / "face.png"
    Image.fromarray(np.full((48, 48), 128, np.uint8), "L").save(face)
    predicted = run_mdfer("predict", str(face), "--model", str(fetched / "hailo_model_int8.tflite"), "--json")
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    heads = json.loads(predicted.stdout)[0]["heads"]
    assert set(heads) == {"fer2013", "fane", "domain"} and heads["domain"]["top"] in ("fer2013", "fane")
