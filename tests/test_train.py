"""Three-stage training on Ray Train, run as a user would (`mdfer train`): one training shared by
the session (`conftest.trained_run`), read here and by test_export and test_evaluate. A worker
killed mid-stage: tests/test_worker_loss.py; two workers of one stage, one of them lost:
tests/test_nodes.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers import PNG_MAGIC, check_train_console, run_mdfer, train_args
from mdfer.config import load_config
from mdfer.errors import ConfigError
from mdfer.evaluate import evaluate_run
from mdfer.train_loop import epoch_lr


def test_three_stages_learn_and_rerun_skips(trained_run, capsys):
    learnable, store, done = trained_run, trained_run["store"], trained_run["train"]
    metrics = store.read_json("runs/learn/metrics.json")
    assert list(metrics["stages"]) == ["stage1", "stage2", "stage3"]
    # chance macro-F1: ~0.03 for a constant guess, ~0.13 for a uniform random one. Measured on
    # this run (2+2+4 epochs): 0.34 on one worker (the seeded stream repeats it); 0.23-0.46 on two
    # workers -- from-scratch runs this short vary, so the bar is "clearly off chance", not a
    # figure one lucky run reached
    assert metrics["val_macro_f1"] > 0.2, metrics["val_macro_f1"]
    for stage, epochs in zip(metrics["stages"].values(), (2, 2, 4)):
        assert [row["epoch"] for row in stage["history"]] == list(range(1, epochs + 1))
    # the LR each epoch ran at: constant in stage 1, cosine in stage 3 (the config's edit)
    stages = load_config(learnable["config"]).train.stages
    for stage, config in zip(metrics["stages"].values(), stages):
        ran = [row["lr"] for row in stage["history"]]
        assert ran == pytest.approx([epoch_lr(config, row["epoch"]) for row in stage["history"]], rel=1e-5)
    assert len(set(metrics["stages"]["stage1"]["history"][i]["lr"] for i in (0, 1))) == 1
    assert metrics["stages"]["stage3"]["history"][-1]["lr"] < 0.2 * stages[2].lr
    # per-epoch lines with the metrics, from the rank-0 worker, shown once by the driver; the
    # console holds only lines a person reads (no TensorFlow start-up, Ray or Ray Data lines)
    assert (done.stdout + done.stderr).count("stage3 epoch 4/4: loss") == 1  # once, not once per log path
    per_epoch = check_train_console(done.stdout + done.stderr)
    assert len(per_epoch) == 2 + 2 + 4 and max(per_epoch.values()) <= 4  # the epoch line and 3 progress lines
    # each later stage says what it starts from: the previous stage's best, whole
    assert re.search(r"stage2: starting from \S*runs/learn/stage1/\S+ \(all\)", done.stdout + done.stderr)
    # TensorBoard event files per stage
    assert any("events.out.tfevents" in k for k in store.list_files("runs/learn/stage1/tensorboard"))
    sealed = {key: Path(store.path(key)).stat().st_mtime_ns for key in store.list_files("runs/learn")
              if key.split("/")[2:3] and key.split("/")[2].startswith("stage")}

    # evaluate writes metrics and pictures for every head (in-process: the command's own
    # start-up is covered by the e2e job and test_evaluate)
    from mdfer.cli import main
    assert main(["evaluate", "--store", store.uri, "--run-id", "learn", "--split", "test"]) == 0, \
        capsys.readouterr().err[-3000:]
    report = store.read_json("runs/learn/report/test/metrics.json")
    assert set(report["heads"]) == {"fer2013", "fane", "domain"}
    assert report["heads"]["fer2013"]["n"] == 70
    assert report["macro_f1"] > 0.2, report["macro_f1"]  # chance as above
    for name in ("confusion_fer2013.png", "confusion_fane.png", "confusion_domain.png", "training_curves.png"):
        assert store.read_bytes(f"runs/learn/report/test/{name}")[:8] == PNG_MAGIC

    # an input blur tried after training: scored apart, the run's own report left as it was
    capsys.readouterr()
    assert main(["evaluate", "--store", store.uri, "--run-id", "learn", "--inference-lowpass", "3"]) == 0
    assert "runs/learn/report/test-lowpass3/" in capsys.readouterr().out
    tried = store.read_json("runs/learn/report/test-lowpass3/metrics.json")
    assert tried["inference_lowpass"] == 3 and report["inference_lowpass"] == 0
    assert tried["heads"]["fer2013"]["n"] == 70 and tried["macro_f1"] != report["macro_f1"]
    assert store.read_json("runs/learn/report/test/metrics.json") == report
    with pytest.raises(ConfigError, match="--inference-lowpass: model.inference_lowpass: 4 is neither 0"):
        evaluate_run(store, "learn", inference_lowpass=4)
    assert not store.exists("runs/learn/report/test-lowpass4/metrics.json")

    # the same run id again: every stage is skipped and nothing a stage wrote changes
    again = run_mdfer(*train_args(learnable, "learn"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("already complete") == 3
    assert "epoch 1/" not in again.stdout + again.stderr
    assert {key: Path(store.path(key)).stat().st_mtime_ns for key in sealed} == sealed
