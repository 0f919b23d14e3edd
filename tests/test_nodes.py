"""A Ray cluster of two nodes on this machine: a head on 127.0.0.1 and a second `ray start
--address` on 127.0.0.2, each with its own ports and temp dir, token authentication on.

Workers of a multi-node cluster write checkpoints from whichever node they run on: a
local-folder store (seen by one node) is refused before any work; with the store on S3, a stage
that loses a whole node mid-way resumes from its last registered checkpoint.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import threading
import time

import pytest

from helpers import BIN, MDFER, RayNode, generated_demo_config, registered_checkpoints, run_mdfer
from mdfer.storage import Store
from mdfer.stages import LOCAL_RAY_SYSTEM_CONFIG


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, s3_server):
    """Head: 2 CPUs; second node: 1 CPU. The S3 credentials are in both nodes' environment, as
    an instance role would give them."""
    if not s3_server.running:
        s3_server.start()
    env = {**os.environ, **s3_server.env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_ADDRESS": ""}
    env.pop("RAY_API_SERVER_ADDRESS", None)
    logs = tmp_path_factory.mktemp("raynodes")
    # health checks every second (Ray's default: 3 s), 5 missed to declare a node dead: the loss
    # is seen in ~5 s instead of ~15
    head = RayNode(logs / "head.log", env, num_cpus=2, system_config={
        **LOCAL_RAY_SYSTEM_CONFIG, "health_check_period_ms": 1000, "health_check_failure_threshold": 5})
    nodes = [head]
    try:
        head.wait_for_jobs()
        nodes.append(RayNode(logs / "node.log", head.env, head_gcs_port=head.gcs_port, num_cpus=1, ip="127.0.0.2"))
        _wait_for_nodes(head.env, head.gcs_port, 2)
        yield {"gcs": f"127.0.0.1:{head.gcs_port}", "env": head.env, "head": head, "node": nodes[1]}
    finally:
        for node in reversed(nodes):
            node.stop()


def _wait_for_nodes(env: dict, gcs_port: int, count: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while True:
        status = subprocess.run([str(BIN / "ray"), "status", f"--address=127.0.0.1:{gcs_port}"], env=env,
                                capture_output=True, text=True)
        if status.stdout.count(" node_") >= count:
            return
        assert time.time() < deadline, f"{count} nodes did not come up:\n{status.stdout}{status.stderr}"
        time.sleep(2)


def _config(tmp_path, edit=None):
    def shrink(raw: dict) -> None:
        raw["model"]["image_size"] = 32
        raw["stream"]["batch_size"] = 16
        raw["train"].update(workers=2, cpus_per_worker=0.5, placement_strategy="SPREAD", max_failures=2)
        raw["train"]["stages"] = raw["train"]["stages"][:1]
        raw["train"]["stages"][0].update(epochs=4, patience=4)
        if edit:
            edit(raw)

    return generated_demo_config(tmp_path / "data", fer_train=16, fer_test=2, fane=16, seed=3, edit=shrink)[0]


def test_a_local_store_on_two_nodes_is_refused_before_any_work(two_nodes, tmp_path):
    store = tmp_path / "store"
    done = run_mdfer("pipeline", "--config", str(_config(tmp_path)), "--store", str(store),
                     "--address", two_nodes["gcs"], timeout=300, env=two_nodes["env"])
    assert done.returncode == 2, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "a local folder" in errors[0] and "2 nodes" in errors[0] \
        and "s3://" in errors[0], done.stderr
    assert not (store / "datasets").exists()  # refused before prepare read a file


def _train_worker_nodes(cluster: dict) -> set[str]:
    """The node ids of the Ray Train workers alive now (Ray's State API, through the CLI)."""
    listed = subprocess.run([str(BIN / "ray"), "list", "actors", "--address", cluster["head"].address,
                             "--filter", "class_name=RayTrainWorker", "--filter", "state=ALIVE",
                             "--format", "json"], env=cluster["env"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    return {actor["node_id"] for actor in json.loads(listed.stdout)}


def test_a_stage_survives_losing_a_node(two_nodes, tmp_path, s3_env, s3_prefix):
    """Two workers SPREAD over the nodes; once epoch 1's checkpoint is registered, the second
    node goes whole (SIGKILL to its raylet and every process of it, by pid). Ray Train restarts
    the group on what is left, from that checkpoint; the stage ends with all four epochs."""
    config = _config(tmp_path)
    prepared = run_mdfer("prepare", "--config", str(config), "--store", s3_prefix, env=two_nodes["env"])
    assert prepared.returncode == 0, prepared.stderr
    dataset_id = next(key.split("/")[1] for key in Store(s3_prefix).list_files("datasets")
                      if key.endswith("manifest.json"))
    train = subprocess.Popen([*MDFER, "train", "--config", str(config), "--store", s3_prefix, "--dataset-id",
                              dataset_id, "--run-id", "lost", "--address", two_nodes["gcs"]],
                             env=two_nodes["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    epoch_one = threading.Event()

    def read() -> None:
        for line in train.stdout:
            lines.append(line)
            if "stage1 epoch 1/4: loss" in line:
                epoch_one.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert epoch_one.wait(300), "".join(lines[-40:])
        deadline = time.time() + 120  # epoch 1's checkpoint registered: what the stage resumes from
        while not registered_checkpoints(Store(s3_prefix), "runs/lost/stage1/ray"):
            assert train.poll() is None and time.time() < deadline, "".join(lines[-40:])
            time.sleep(0.5)
        assert len(_train_worker_nodes(two_nodes)) == 2, "SPREAD left a node without a worker"
        assert two_nodes["node"].lose()  # the whole second node goes: its raylet and workers
        assert train.wait(600) == 0, "".join(lines[-60:])
    finally:
        if train.poll() is None:
            train.kill()
            train.wait()
    reader.join(10)
    output = "".join(lines)
    assert "stage1: resuming after epoch" in output, output[-4000:]
    # two workers, one console: rank 0's epoch line only (the last epoch ran once, after the restart)
    assert output.count("stage1 epoch 4/4: loss") == 1, output[-4000:]
    done = Store(s3_prefix).read_json("runs/lost/stage1/done.json")
    assert [h["epoch"] for h in done["history"]] == [1, 2, 3, 4], done["history"]
