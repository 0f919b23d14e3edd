"""The store layout: the keys users and scripts know stay byte for byte, and mdfer.layout stays a leaf."""

import ast
from pathlib import Path

import mdfer
from mdfer.layout import (BEST_TRIAL_FILE, BEST_WEIGHTS_FILE, CHECKPOINT_OPTIMIZER_FILE, CHECKPOINT_STATE_FILE,
                          CHECKPOINT_WEIGHTS_FILE, CONFIG_FILE, FINAL_WEIGHTS_FILE, FLIP_SUFFIX,
                          MANIFEST_FILE, METRICS_FILE, RUN_FILE, STAGE_DONE_FILE, confusion_file, data_report_name,
                          dataset_key, export_key, model_report_key, report_key, run_key, shard_file, source_prefix,
                          split_report_name, stage_key, sweep_key, trial_key)

PACKAGE = Path(mdfer.__file__).parent


def _mdfer_imports(module: str) -> set[str]:
    """Every mdfer module `module` imports, at the top or inside a function."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mdfer"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("mdfer"))
    return found


def test_keys_are_the_ones_users_know():
    assert dataset_key("d", MANIFEST_FILE) == "datasets/d/manifest.json"
    assert dataset_key("d", shard_file("train", "fer2013", 3)) == "datasets/d/shards/train/part-fer2013-00003.parquet"
    assert [run_key("r", name) for name in (CONFIG_FILE, RUN_FILE, FINAL_WEIGHTS_FILE, METRICS_FILE)] == [
        "runs/r/config.yaml", "runs/r/run.json", "runs/r/best_model_hailo.weights.h5", "runs/r/metrics.json"]
    assert stage_key(run_key("r"), "stage1", BEST_WEIGHTS_FILE) == "runs/r/stage1/best.weights.h5"
    assert stage_key(run_key("r"), "stage1", STAGE_DONE_FILE) == "runs/r/stage1/done.json"
    assert stage_key(sweep_key("s"), "stage2", BEST_TRIAL_FILE) == "sweeps/s/stage2/best.yaml"
    assert trial_key(stage_key(sweep_key("s"), "stage2"), "t1") == "sweeps/s/stage2/trials/t1"
    assert (report_key("r", split_report_name("test")) + "/" + confusion_file("fane")
            == "runs/r/report/test/confusion_fane.png")
    assert report_key("r", split_report_name("val", 3)) + FLIP_SUFFIX == "runs/r/report/val-lowpass3-flip"
    assert report_key("r", data_report_name("d")) == "runs/r/report/data-d"
    assert model_report_key("m", "0123456789ab", "d") == "evaluations/m-0123456789ab/d"
    assert export_key(source_prefix(run_id="r"), MANIFEST_FILE) == "runs/r/export/manifest.json"
    assert export_key(source_prefix(sweep_id="s")) == "sweeps/s/export"
    # inside each Ray checkpoint: what older runs' checkpoints hold, plus the optimizer's state
    assert (CHECKPOINT_WEIGHTS_FILE, CHECKPOINT_STATE_FILE, CHECKPOINT_OPTIMIZER_FILE) == (
        "model.weights.h5", "state.json", "optimizer.npz")


def test_layout_is_a_leaf_and_artifacts_does_not_import_export():
    assert _mdfer_imports("layout") == set()
    assert "mdfer.export" not in _mdfer_imports("artifacts")
    # a sweep's results find a checkpoint's files without loading the training loop (and Ray Data)
    assert "mdfer.train_loop" not in _mdfer_imports("sweep_results")
