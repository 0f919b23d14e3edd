"""A stage whose one worker is killed mid-way resumes from its last registered checkpoint
(two workers losing a whole node: tests/test_nodes.py), printing only lines for people,
opening no listener of its own and loading no TensorFlow in Ray Train's controller; `kill` to
the driver stops a run as Ctrl-C does; a resumed stage goes on with the optimizer state it stopped
with.

`mdfer train` runs in a subprocess, which starts (and stops) its own local Ray; the resume of
the optimizer runs the stage in this process, on the module's own local Ray (`ray_session`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import (MDFER, check_train_console, generated_demo_config, listening_sockets, registered_checkpoints,
                     train_args)
from mdfer.config import load_config
from mdfer.train_loop import WORKER_TMP_PREFIX, epoch_lr, remove_dead_workers_folders


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict:
    """A prepared dataset for runs that test what Ray Train does, not what the model learns:
    550 generated faces at 32 px, a few seconds per epoch."""
    from mdfer.ingest import prepare
    from mdfer.storage import Store

    root = tmp_path_factory.mktemp("small")

    def shrink(raw: dict) -> None:
        raw["model"]["image_size"] = 32
        raw["stream"]["batch_size"] = 16

    config, raw = generated_demo_config(root, fer_train=40, fer_test=2, fane=30, seed=41, edit=shrink)
    store = Store(str(root / "store"))
    return {"config": config, "raw": raw, "store": store,
            "dataset_id": prepare(load_config(config), store).dataset_id}


def _train_in_background(data: dict, tmp_path: Path, run_id: str, raw: dict,
                         *options: str) -> tuple[subprocess.Popen, Path, Path]:
    """`mdfer train` of config `raw` as a subprocess; returns it, the config and the file its
    output goes to (a file, not a pipe: --verbose output fills a pipe nobody reads yet, and Ray's
    shutdown then blocks in its log-printing thread)."""
    config = tmp_path / f"{run_id}.yaml"
    config.write_text(yaml.safe_dump(raw))
    console = tmp_path / f"{run_id}-console.txt"
    with console.open("w") as out:
        process = subprocess.Popen([*MDFER, *train_args(data, run_id, config), *options], stdout=out,
                                   stderr=subprocess.STDOUT, text=True, env={**os.environ, "RAY_ADDRESS": ""})
    return process, config, console


def _stop(process: subprocess.Popen) -> None:
    """Ctrl-C to a run a test left running (a failed assertion), and wait for it."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        process.wait(60)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (the local Ray that `mdfer` started lives under it)."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:  # the thread or the process ended
                continue
            found += map(int, children)
            queue += map(int, children)
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.slow  # trains with Ray in a subprocess
def test_one_worker_killed_mid_stage_resumes_prints_for_people_and_opens_no_listener(small, tmp_path):
    """A one-worker run: its worker is killed once Ray has registered a checkpoint, and the stage
    resumes from it (two workers losing one: tests/test_nodes.py). Its console holds only lines
    for people. It needs no TensorFlow gRPC server (which binds every interface): the Train
    worker, the first and its replacement, listens only on its Ray port, like every other Ray
    worker. Ray's own servers bind every interface in Ray 2.60 (token-authenticated; see
    cluster/README.md)."""
    raw = json.loads(json.dumps(small["raw"]))
    raw["train"].update(workers=1, cpus_per_worker=1)
    raw["train"]["stages"] = [dict(raw["train"]["stages"][0], epochs=3, patience=3, lr_schedule="cosine")]
    store = small["store"]
    process, config, console = _train_in_background(small, tmp_path, "fault", raw)
    sampled: dict[int, set] = {}
    controllers: dict[int, bool] = {}  # pid -> TensorFlow seen loaded in it
    killed = None
    killed_folders: list[Path] = []
    killed_autograph: list[str] = []
    try:
        deadline = time.time() + 900
        while process.poll() is None:
            assert time.time() < deadline, "the run did not finish\n" + console.read_text()[-4000:]
            workers = [p for p in _descendants(process.pid) if "ray::RayTrainWorker" in _cmdline(p)]
            if "stage1: lr " in console.read_text():  # the first worker has built its strategy
                for pid in workers:
                    sampled.setdefault(pid, set()).update(listening_sockets(pid))
                for pid in _descendants(process.pid):
                    if "ray::TrainController" in _cmdline(pid):
                        controllers[pid] = controllers.get(pid, False) or _loads_tensorflow(pid)
            # kill once Ray has registered a checkpoint (its snapshot lists one), not merely once a
            # checkpoint folder exists: a kill between the two restarts the stage from scratch
            if killed is None and workers and registered_checkpoints(store, "runs/fault/stage1/ray"):
                killed = workers[0]
                killed_folders = _worker_folders(killed)
                killed_autograph = [f.name for folder in killed_folders for f in folder.glob(AUTOGRAPH_FILES)]
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.5)
    finally:
        _stop(process)
    output = console.read_text()
    assert process.returncode == 0, output[-4000:]
    assert killed, "the run finished before a checkpoint was registered\n" + output[-4000:]
    history = store.read_json("runs/fault/metrics.json")["stages"]["stage1"]["history"]
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert "stage1: resuming after epoch" in output
    # the resumed epochs continue the cosine schedule rather than restart it
    stage = load_config(config).train.stages[0]
    assert [row["lr"] for row in history] == pytest.approx([epoch_lr(stage, e) for e in (1, 2, 3)], rel=1e-5)
    assert killed in sampled and len(sampled) >= 2, f"sampled {sorted(sampled)}: not the worker and its replacement"
    # Ray Train's controller never computes: it runs without TensorFlow (mdfer.multiworker)
    assert controllers and not any(controllers.values()), controllers
    for pid, sockets in sampled.items():
        assert len(sockets) == 1, f"worker {pid} listens on {sockets}: more than its Ray port"
    # lines for people only: an epoch line and up to 3 progress lines per epoch; the epoch the
    # kill interrupted (the one after the epoch resumed from) may show its lines twice
    per_epoch = check_train_console(output)
    assert set(per_epoch) == {"stage1 epoch 1/3", "stage1 epoch 2/3", "stage1 epoch 3/3"}
    resumed_after = int(re.search(r"stage1: resuming after epoch (\d+)", output).group(1))
    interrupted = f"stage1 epoch {resumed_after + 1}/3"
    assert all(count <= (8 if epoch == interrupted else 4) for epoch, count in per_epoch.items()), per_epoch
    assert "stage1 epoch 3/3: loss" in output
    assert re.search(r"log: \S+\.log; Ray workers' logs: ", output)
    # the killed worker's temporary files (TensorFlow's autograph sources among them) were in
    # its own folder, which its replacement removed; the finished worker removed its own
    assert killed_folders, "the killed worker had no temporary folder of its own"
    assert killed_autograph, "the killed worker's autograph sources were not in its folder"
    assert not any(folder.exists() for folder in killed_folders)
    assert not _worker_folders(*sampled), "a worker left its temporary folder"


@pytest.mark.slow  # starts Ray in a subprocess
def test_sigterm_stops_a_run_as_ctrl_c_does(small, tmp_path):
    """`kill` (SIGTERM, as Kubernetes or a scheduler sends it) to `mdfer train` while its worker
    trains: the run stops as after Ctrl-C -- "interrupted", exit 130, every process it started
    gone -- rather than Ray's abort of the driver (`*** SIGTERM received`, exit 134)."""
    raw = json.loads(json.dumps(small["raw"]))
    raw["train"].update(workers=1, cpus_per_worker=1)
    raw["train"]["stages"] = [dict(raw["train"]["stages"][0], epochs=2, patience=2)]
    process, _, console = _train_in_background(small, tmp_path, "term", raw)
    try:
        deadline = time.time() + 600
        while "stage1: lr " not in console.read_text():  # the worker has built its model
            assert process.poll() is None, console.read_text()[-4000:]
            assert time.time() < deadline, "the worker did not start\n" + console.read_text()[-4000:]
            time.sleep(0.5)
        started = _descendants(process.pid)
        process.send_signal(signal.SIGTERM)
        process.wait(120)
    finally:
        _stop(process)
    output = console.read_text()
    assert process.returncode == 130, output[-4000:]
    assert "mdfer train: interrupted" in output and "SIGTERM received" not in output
    assert "stage1 epoch 2/2: loss" not in output  # stopped, not finished
    deadline = time.time() + 60
    while left := [pid for pid in started if _running(pid)]:
        assert time.time() < deadline, f"left running: {[_cmdline(pid)[:80] for pid in left]}"
        time.sleep(0.5)


@pytest.mark.slow  # trains with Ray
def test_a_resumed_stage_goes_on_with_the_optimizer_it_stopped_with(small, ray_session, tmp_path, caplog):
    """A one-worker stage run for one epoch, then for two in the same folder (as a resubmitted job:
    Ray Train resumes from the folder's latest checkpoint). The resumed worker restores the
    optimizer's iteration saved with epoch 1 and carries on from it; built from that checkpoint,
    the stage starts epoch 2 with epoch 1's iteration and moments, equal to the bit. A checkpoint
    written before optimizer state was saved still resumes: weights only, in one line."""
    from ray.train import Checkpoint

    from mdfer.dataset import read_manifest
    from mdfer.layout import CHECKPOINT_OPTIMIZER_FILE, CHECKPOINT_STATE_FILE
    from mdfer.optimizer_state import CLASS_KEY, ITERATION_KEY, optimizer_state, read_optimizer_file
    from mdfer.stages import fit_stage
    from mdfer.stream import plan_epoch
    from mdfer.train_loop import build_stage

    store, manifest = small["store"], read_manifest(small["store"], small["dataset_id"])

    def stage_config(epochs: int):
        raw = json.loads(json.dumps(small["raw"]))
        raw["train"].update(workers=1, cpus_per_worker=1)
        raw["train"]["stages"] = [dict(raw["train"]["stages"][0], epochs=epochs, patience=epochs)]
        (tmp_path / f"{epochs}.yaml").write_text(yaml.safe_dump(raw))
        return load_config(tmp_path / f"{epochs}.yaml")

    first = fit_stage(stage_config(1), store, "exact", 0, manifest, None)
    with first.checkpoint.as_directory() as folder:  # epoch 1's, kept whole and as an older one would be
        shutil.copytree(folder, tmp_path / "epoch1")
        shutil.copytree(folder, tmp_path / "before", ignore=shutil.ignore_patterns(CHECKPOINT_OPTIMIZER_FILE))
    saved = read_optimizer_file(tmp_path / "epoch1" / CHECKPOINT_OPTIMIZER_FILE)
    config = stage_config(2)
    steps = plan_epoch(manifest, config, 1).steps_per_epoch
    assert saved.pop(CLASS_KEY) == "Adam" and int(saved[ITERATION_KEY]) == steps

    caplog.set_level(logging.INFO, logger="mdfer.train")
    resumed = fit_stage(config, store, "exact", 0, manifest, None, console=True)
    assert f"stage1: resuming after epoch 1, optimizer at step {steps}\n" in caplog.text
    with resumed.checkpoint.as_directory() as folder:
        assert json.loads(Path(folder, CHECKPOINT_STATE_FILE).read_text())["epoch"] == 2
        assert int(read_optimizer_file(Path(folder) / CHECKPOINT_OPTIMIZER_FILE)[ITERATION_KEY]) == 2 * steps

    said: list[str] = []
    parts = build_stage(config, 0, plan_epoch(manifest, config, 1), 1, None,
                        Checkpoint.from_directory(str(tmp_path / "epoch1")), {}, said.append)
    restored = optimizer_state(parts.optimizer)
    assert said == [f"stage1: resuming after epoch 1, optimizer at step {steps}"]
    assert list(restored) == list(saved) and all(np.array_equal(restored[k], saved[k]) for k in saved)
    assert sum(np.count_nonzero(value) for value in saved.values()) > len(saved)  # real moments, not zeros

    said.clear()
    older = build_stage(config, 0, plan_epoch(manifest, config, 1), 1, None,
                        Checkpoint.from_directory(str(tmp_path / "before")), {}, said.append)
    assert said == ["stage1: resuming after epoch 1; weights only: the checkpoint predates saved optimizer "
                    "state, the optimizer starts over"]
    assert int(older.optimizer.iterations.numpy()) == 0 and older.state["epoch"] == 1
    assert all(np.array_equal(ours.numpy(), theirs.numpy())
               for ours, theirs in zip(older.model.weights, parts.model.weights, strict=True))


def _loads_tensorflow(pid: int) -> bool:
    try:
        return "libtensorflow" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:  # it ended
        return False


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


AUTOGRAPH_FILES = "__autograph_generated_file*.py"


def _worker_folders(*pids: int) -> list[Path]:
    return [folder for pid in pids
            for folder in Path(tempfile.gettempdir()).glob(f"{WORKER_TMP_PREFIX}{pid}-*")]


TRACE_IN_WORKER_FOLDER = '''
import os, signal, sys, tempfile
import tensorflow as tf
from mdfer.train_loop import worker_temp_folder

@tf.function
def clipped(x):
    if tf.reduce_sum(x) > 0:  # a tensor condition: autograph converts the function
        return x
    return -x

with worker_temp_folder() as folder:
    clipped(tf.constant([1.0]))
    print(folder, flush=True)
    print(len([f for f in os.listdir(folder) if f.startswith("__autograph_generated_file")]), flush=True)
    if sys.argv[1] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
print(tempfile.gettempdir(), flush=True)
'''


@pytest.mark.parametrize("ending", ["return", "kill"])
def test_a_workers_temporary_files_go_with_its_folder(tmp_path, ending):
    """TensorFlow's autograph sources (kept until an exit a Ray actor never makes) land in the
    worker's own folder; the folder goes when the stage returns, or, after a SIGKILL, when the
    next worker starts; nothing is left in the temp dir either way."""
    script = tmp_path / "trace.py"  # a file: autograph converts only functions whose source it can read
    script.write_text(TRACE_IN_WORKER_FOLDER)
    temp = tmp_path / "tmp"
    temp.mkdir()
    done = subprocess.run([sys.executable, str(script), ending], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TMPDIR": str(temp), "TF_CPP_MIN_LOG_LEVEL": "3"})
    lines = done.stdout.split()
    folder, traced = Path(lines[0]), int(lines[1])
    assert folder.parent == temp and folder.name.startswith(WORKER_TMP_PREFIX), lines
    assert traced >= 1, "autograph wrote no source into the worker's folder"
    if ending == "kill":
        assert done.returncode == -signal.SIGKILL
        assert folder.is_dir() and list(folder.glob(AUTOGRAPH_FILES)), "the killed worker's folder is gone already"
        assert remove_dead_workers_folders(str(temp)) == [folder.name]
    else:
        assert done.returncode == 0, done.stderr[-3000:]
        assert lines[2] == str(temp), "the temp dir was not given back"
    assert not folder.exists()
    assert not list(temp.rglob(AUTOGRAPH_FILES)) and not list(temp.iterdir()), list(temp.rglob("*"))


def test_a_dead_workers_folder_is_removed_and_nothing_else(tmp_path):
    """Only folders named for a pid that no longer runs go; a live pid's, a name that is not
    ours and a link (even one named like a dead worker's) stay, and so does what it points to."""
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead = int(finished.stdout)
    names = {"dead": f"{WORKER_TMP_PREFIX}{dead}-a1b2", "alive": f"{WORKER_TMP_PREFIX}{os.getpid()}-c3d4",
             "no pid": f"{WORKER_TMP_PREFIX}x7y8z9", "other": "mdfer-workerx-1-ab"}
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "events.out").write_text("scalars")
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / f"{WORKER_TMP_PREFIX}{dead}-link").symlink_to(target)

    assert remove_dead_workers_folders(str(tmp_path)) == [names["dead"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [names["alive"], names["no pid"], names["other"], "elsewhere", f"{WORKER_TMP_PREFIX}{dead}-link"])
    assert target.is_dir()
