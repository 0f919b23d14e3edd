"""Ray Tune sweeps per stage (`mdfer tune`), run as a user would, on generated data.

The sweep test starts `mdfer tune` in a subprocess (which starts and stops its own local Ray),
interrupts it mid-way, runs it again to the end, and checks every stage's results against the
trials table. It also measures the Ray overhead of a trial: from Tune starting the trial to the
Train worker's line printed just before the first training step.
"""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mdfer.config import config_from_dict, load_config
from mdfer.errors import ConfigError
from mdfer.sweep_spaces import load_sweep, load_sweeps

MDFER = [sys.executable, "-m", "mdfer.cli"]
REPO = Path(__file__).parents[1]
STAGES = ("stage1", "stage2", "stage3")
SWEPT = STAGES[:2]  # the sweep test's stages
PNG = b"\x89PNG\r\n\x1a\n"
FIRST_STEP = r"RayTrainWorker[^)]*\)\S*\s+(stage\d): lr (\S+?), frozen"  # a worker's line before its first step


class Mdfer:
    """`mdfer` in a subprocess; every output line (stdout and stderr) with when it arrived.

    On a busy 2-core machine Ray's own start can fail (its raylet gives the dashboard agent a
    fixed 15 s, ray-project/ray#65983); the command is then started again, as a user would:
    a sweep continues where it stopped."""

    RAY_START_FAILED = "The current node timed out during startup"

    def __init__(self, *args: str, ray_start_attempts: int = 3):
        self.args, self.attempts = args, ray_start_attempts
        self.lines: list[tuple[float, str]] = []
        self._start()

    def _start(self) -> None:
        self.attempts -= 1
        self.process = subprocess.Popen(
            [*MDFER, *self.args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"})
        self.reader = threading.Thread(target=self._read, args=(self.process,), daemon=True)
        self.reader.start()

    def _read(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            self.lines.append((time.time(), line.rstrip("\n")))

    def _restarted(self) -> bool:
        """Start again if the command ended because Ray itself did not start."""
        if self.process.poll() is None or self.attempts <= 0:
            return False
        self.reader.join(10)
        if self.process.returncode != 1 or self.RAY_START_FAILED not in self.text[-3000:]:
            return False
        self.lines.append((time.time(), "(test) Ray did not start; starting the command again"))
        self._start()
        return True

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def wait_until(self, done, timeout: float) -> None:
        deadline = time.time() + timeout
        while not done(self.text):
            assert self.process.poll() is None or self._restarted(), f"mdfer exited early:\n{self.text[-4000:]}"
            assert time.time() < deadline, f"timed out:\n{self.text[-4000:]}"
            time.sleep(0.5)

    def finish(self, timeout: float) -> int:
        deadline = time.time() + timeout
        try:
            while True:
                self.process.wait(max(1.0, deadline - time.time()))
                if not self._restarted():
                    break
        finally:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGINT)
                self.process.wait(60)
            self.reader.join(10)
        return self.process.returncode


def started_trials(output: str, stage: str) -> list[str]:
    return re.findall(rf"{stage} trial (\S+) started:", output)


def trial_overheads(run: Mdfer) -> list[float]:
    """Seconds from Tune starting each trial to its Train worker's line before the first step,
    matched by the trial's learning rate (both print it with :g)."""
    started, first_step = {}, {}
    for at, line in run.lines:
        if match := re.search(r"(stage\d) trial \S+ started: lr (\S+?),", line):
            started.setdefault(match.groups(), at)
        elif match := re.search(FIRST_STEP, line):
            first_step.setdefault(match.groups(), at)
    return [first_step[key] - at for key, at in started.items() if key in first_step]


@pytest.fixture(scope="module")
def sweep_setup(synth_dataset, tmp_path_factory) -> dict:
    """A one-worker, one-epoch-per-stage config at 32 px on the session's generated dataset, two
    stages (skip, resume and chaining need no third; test_train runs all three), and tiny search
    spaces: 2 trials per stage; stage 2 runs them one at a time (it gets interrupted)."""
    root = tmp_path_factory.mktemp("sweep")
    raw = synth_dataset["config"].to_dict()
    raw["model"]["image_size"] = 32
    raw["stream"]["augment"] = {"flip": True, "max_shift": 0.0, "max_rotation_deg": 0,
                                "brightness": 0.0, "contrast": 0.0}
    raw["train"].update(workers=1, cpus_per_worker=0.5, max_failures=0)
    raw["train"]["stages"] = raw["train"]["stages"][:len(SWEPT)]
    for stage in raw["train"]["stages"]:  # most of the backbone frozen: short steps on 2 cores
        stage.update(epochs=1, frozen_fraction=0.9)
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    spaces = root / "spaces"
    spaces.mkdir()
    extra = {"stage1": {}, "stage2": {"label_smoothing": {"uniform": [0.0, 0.1]},
                                      "batch_size": {"choice": [32, 48]}}}
    for index, name in enumerate(SWEPT):
        space = {"lr": {"loguniform": [1e-4, 3e-3]}, "loss_weights": {"domain": {"uniform": [0.05, 0.3]}},
                 **extra[name]}
        (spaces / f"{name}.yaml").write_text(yaml.safe_dump({
            "space": space, "search": {"algorithm": "random", "seed": index},
            "scheduler": {"name": "asha", "grace_period": 1}, "num_samples": 2,
            "max_concurrent_trials": 1 if name == "stage2" else 2}))
    return {"config": config, "spaces": spaces, "store": synth_dataset["store"],
            "dataset_id": synth_dataset["manifest"].dataset_id}


# ---------------------------------------------------------------- search-space files


@pytest.mark.parametrize("space, key, message", [
    ({"space": {"lr": {"loguniform": [1e-4, 1e-3]}, "learning_rate": {"uniform": [0, 1]}}},
     "space.learning_rate", "unknown key"),
    ({"space": {"lr": {"loguniform": [1e-2, 1e-3]}}}, "space.lr.loguniform", "low 0.01 must be < high 0.001"),
    ({"space": {"lr": {"loguniform": [1e-4, 1e-3]}}, "scheduler": {"name": "pbt"}},
     "scheduler.name", "unknown scheduler 'pbt'"),
    ({"space": {"loss_weights": {"sfew": {"uniform": [0.5, 2]}}}},
     "space.loss_weights.sfew", "no dataset or head 'sfew'"),
    ({"space": {"batch_size": {"choice": [32, 33]}}}, "space.batch_size.choice",
     "33 is not valid for <embedded default.yaml>: stream.batch_size: 33 does not divide evenly over 2 workers"),
])
def test_bad_space_is_an_error_naming_file_and_key(tmp_path, space, key, message):
    path = tmp_path / "stage1.yaml"
    path.write_text(yaml.safe_dump(space))
    with pytest.raises(ConfigError) as error:
        load_sweep(path, load_config(None), 0)
    assert str(error.value).startswith(f"{path}: {key}: "), error.value
    assert message in str(error.value)


def test_bad_space_stops_mdfer_tune_before_any_work(tmp_path):
    (tmp_path / "stage1.yaml").write_text(yaml.safe_dump({"space": {"lr": {"uniform": [1e-3, 1e-4]}}}))
    result = subprocess.run([*MDFER, "tune", "--store", str(tmp_path / "store"), "--sweep-id", "x",
                             "--spaces", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (f"mdfer tune: error: {tmp_path}/stage1.yaml: space.lr.uniform: "
                                     f"low 0.001 must be < high 0.0001")
    assert not (tmp_path / "store").exists()


def test_shipped_spaces_fit_the_shipped_configs():
    for embedded in ("default.yaml", "demo.yaml"):
        sweeps = load_sweeps(load_config(None, embedded=embedded), REPO / "tune_spaces")
        assert [Path(s.source).name for s in sweeps] == [f"{s}.yaml" for s in STAGES]


# ---------------------------------------------------------------- a whole sweep


def test_sweep_interrupted_resumes_and_chains_best_checkpoints(sweep_setup):
    store = sweep_setup["store"]
    # --verbose: the Train workers' own lines (forwarded by Ray) tell when a trial is training
    args = ["--verbose", "tune", "--config", str(sweep_setup["config"]), "--store", store.uri, "--sweep-id", "sw",
            "--dataset-id", sweep_setup["dataset_id"], "--spaces", str(sweep_setup["spaces"])]
    started = time.time()

    # 1. interrupt in stage 2, once its first trial has finished and the second one is training
    first = Mdfer(*args)
    first.wait_until(lambda out: re.search(r"stage2 trial \S+ finished", out)
                     and len({m for m in re.findall(FIRST_STEP, out) if m[0] == "stage2"}) == 2, timeout=900)
    first.process.send_signal(signal.SIGINT)
    assert first.finish(300) == 130, first.text[-4000:]
    assert "sweep interrupted with 1 of 2 trial(s) unfinished" in first.text
    # --verbose gives back what the console leaves out by default: every worker's own output
    assert "(RayTrainWorker pid=" in first.text and "Execution plan of Dataset" in first.text
    done_trial = re.search(r"stage2 trial (\S+) finished", first.text).group(1)
    done_files = store.list_files(f"sweeps/sw/stage2/trials/{done_trial}")
    assert not store.exists("sweeps/sw/stage2/best.yaml")

    # 2. the same command again: stage 1 is skipped, stage 2 continues without redoing its
    #    finished trial
    second = Mdfer(*args)
    assert second.finish(900) == 0, second.text[-4000:]
    assert "stage1: sweep already complete" in second.text
    assert started_trials(second.text, "stage1") == []
    assert "stage2: continuing the interrupted sweep" in second.text
    assert done_trial not in started_trials(second.text, "stage2")
    assert len(started_trials(second.text, "stage2")) == 1
    assert store.list_files(f"sweeps/sw/stage2/trials/{done_trial}") == done_files
    seconds = time.time() - started

    # 3. every stage: the table (CSV = Parquet), the winner is the best reported metric, the
    #    picture, and the winner's checkpoint weights as the stage's best weights
    best = {}
    for index, stage in enumerate(SWEPT):
        prefix = f"sweeps/sw/{stage}"
        table = pd.read_parquet(store.path(f"{prefix}/trials.parquet"))
        csv = pd.read_csv(store.path(f"{prefix}/trials.csv"))
        assert list(csv.columns) == list(table.columns)
        assert csv["trial_id"].tolist() == table["trial_id"].tolist()
        assert csv["val_macro_f1"].tolist() == pytest.approx(table["val_macro_f1"].tolist())
        assert len(table) == 2 and set(table["status"]) == {"TERMINATED"}, table
        best[stage] = yaml.safe_load(store.read_bytes(f"{prefix}/best.yaml"))
        top = table.loc[table["val_macro_f1"].idxmax()]  # the first of equals, like the sweep
        assert best[stage]["trial_id"] == top["trial_id"]
        assert best[stage]["val_macro_f1"] == top["val_macro_f1"] == table["val_macro_f1"].max()
        assert best[stage]["checkpoint_path"] == top["checkpoint_path"]
        checkpoint = top["checkpoint_path"].removeprefix(store.uri + "/")
        assert store.read_bytes(f"{prefix}/best.weights.h5") == store.read_bytes(f"{checkpoint}/model.weights.h5")
        assert store.read_bytes(f"{prefix}/metric_vs_hparams.png")[:8] == PNG
        # stage N+1's trials start from stage N's winning checkpoint (each trial's own config)
        expected = store.key_uri(f"sweeps/sw/{SWEPT[index - 1]}/best.weights.h5") if index else None
        assert [None if pd.isna(v) else v for v in table["init_weights"]] == [expected, expected]
        assert best[stage]["init_weights"] == expected
    assert set(pd.read_parquet(store.path("sweeps/sw/stage2/trials.parquet"))["batch_size"]) <= {32, 48}

    # 4. what `mdfer export --sweep-id` reads: a finished run's files, with the winners' settings
    config = config_from_dict(yaml.safe_load(store.read_bytes("sweeps/sw/config.yaml")), "config.yaml")
    for index, stage in enumerate(SWEPT):
        assert config.train.stages[index].lr == best[stage]["hyperparameters"]["lr"]
        assert config.train.stages[index].loss_weights["domain"] == \
            best[stage]["hyperparameters"]["loss_weights.domain"]
    assert config.stream.batch_size == best["stage2"]["hyperparameters"]["batch_size"]
    assert config.train.label_smoothing == best["stage2"]["hyperparameters"]["label_smoothing"]
    run = store.read_json("sweeps/sw/run.json")
    assert run["run_id"] == "sw" and run["dataset_id"] == sweep_setup["dataset_id"]
    assert store.read_bytes("sweeps/sw/best_model_hailo.weights.h5") == \
        store.read_bytes("sweeps/sw/stage2/best.weights.h5")
    metrics = store.read_json("sweeps/sw/metrics.json")
    assert metrics["run_id"] == "sw" and metrics["final_stage"] == "stage2"
    assert metrics["val_macro_f1"] == best["stage2"]["val_macro_f1"]
    assert list(metrics["stages"]) == list(SWEPT)
    assert [row["epoch"] for row in metrics["stages"]["stage2"]["history"]] == [1]
    # the console's table of each stage's trials, the winner starred
    for stage in SWEPT[1:]:
        winner = best[stage]["trial_id"]
        assert re.search(rf"^\S+ +trial +status +lr .*val_macro_f1 +epoch$", second.text, re.M)
        assert re.search(rf"{winner} \* +TERMINATED ", second.text), second.text[-3000:]

    # 5. once finished, the sweep is left as it is
    sealed = {key: Path(store.path(key)).stat().st_mtime_ns for key in store.list_files("sweeps/sw")}
    third = Mdfer(*args)
    assert third.finish(120) == 0, third.text[-3000:]
    assert "sweep sw: already complete" in third.text and "started:" not in third.text
    assert {key: Path(store.path(key)).stat().st_mtime_ns for key in store.list_files("sweeps/sw")} == sealed

    overheads = trial_overheads(first) + trial_overheads(second)
    assert len(overheads) >= 4
    print(f"\nsweep (interrupted + resumed): {seconds:.0f} s; Ray overhead per trial, Tune start to "
          f"first training step: median {statistics.median(overheads):.1f} s, min {min(overheads):.1f} s, "
          f"max {max(overheads):.1f} s over {len(overheads)} trials")
