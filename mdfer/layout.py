"""Where everything lives in the store: every key prefix and file name, in one place.

Users fetch and script against these names, so they never change silently; every module
builds its keys here. Stdlib only (no other mdfer module), so any module can import it.

    <store>/
      datasets/<dataset-id>/manifest.json                     written last: the dataset is complete
      datasets/<dataset-id>/shards/<split>/part-<dataset>-NNNNN.parquet
      runs/<run-id>/config.yaml, run.json                     what was asked for
      runs/<run-id>/<stage>/ray/...                           Ray Train's checkpoints (the resume point)
      runs/<run-id>/<stage>/ray/checkpoint_*/model.weights.h5, optimizer.npz, state.json   one epoch's checkpoint
      runs/<run-id>/<stage>/tensorboard/...                   TensorBoard event files
      runs/<run-id>/<stage>/best.weights.h5, done.json        the stage's result; done.json last
      runs/<run-id>/best_model_hailo.weights.h5, metrics.json the last stage's best; metrics.json last
      runs/<run-id>/report/<split>[-lowpass<W>][-flip]/metrics.json, confusion_<head>.png, training_curves.png
      runs/<run-id>/report/data-<dataset-id>[-flip]/...       the run on class folders (evaluate --data)
      evaluations/<model>-<sha256[:12]>/<dataset-id>[-flip]/...  an exported model on class folders
      sweeps/<sweep-id>/sweep.json                            what was asked for (base config, dataset)
      sweeps/<sweep-id>/<stage>/tune/...                      Ray Tune's experiment (the resume point)
      sweeps/<sweep-id>/<stage>/trials/<trial-id>/ray/...     each trial's Ray Train checkpoints
      sweeps/<sweep-id>/<stage>/trials.csv, trials.parquet, metric_vs_hparams.png, best.weights.h5
      sweeps/<sweep-id>/<stage>/best.yaml                     the winner; written last: the stage is done
      sweeps/<sweep-id>/config.yaml, run.json, best_model_hailo.weights.h5, metrics.json (last; like a run)
      <run or sweep>/export/                                  every format, manifest.json written last:
        hailo_model.keras                       the model, preprocessing inside (0..255 RGB in)
        hailo_model_float32.tflite              static batch 1, builtin ops, signature "serve"
        hailo_model_float32_optimized.tflite    dynamic-range weights (int8 weights, float math)
        hailo_model_int8.tflite                 full integer, uint8 pixels in, float probabilities out
        model.onnx                              from the float32 TFLite, outputs named by head
        heads.json                              input size, heads and their classes
        hailo/  hailo_model.tflite (no preprocessing), model.alls (the normalization), calib.npy,
                heads.json, hailo_compile.py, hailo_model.hef when the DFC is installed
        manifest.json                           sizes, sha256, parity; its presence means finished

mdfer/hailo_compile.py repeats the hailo/ names: it runs in the Hailo DFC's own Python, without mdfer.
"""

from __future__ import annotations

# ---------------------------------------------------------------- top-level prefixes

DATASETS_DIR = "datasets"
RUNS_DIR = "runs"
SWEEPS_DIR = "sweeps"
EVALUATIONS_DIR = "evaluations"  # exported models' reports on class folders

# ---------------------------------------------------------------- file names shared by several folders

MANIFEST_FILE = "manifest.json"  # a dataset's or an export's contents; written last, it seals the folder
CONFIG_FILE = "config.yaml"  # the config a run (or a finished sweep's winner) was trained with
RUN_FILE = "run.json"  # run id, dataset id, config source
METRICS_FILE = "metrics.json"  # a run's/sweep's summary (written last) or a report's scores
FINAL_WEIGHTS_FILE = "best_model_hailo.weights.h5"  # a run's model: its last stage's best weights
BEST_WEIGHTS_FILE = "best.weights.h5"  # a stage's best weights

# ---------------------------------------------------------------- datasets

SHARDS_DIR = "shards"

# ---------------------------------------------------------------- stages (of a run, or of a sweep's trial)

STAGE_CHECKPOINTS_DIR = "ray"  # Ray Train's run name: its checkpoints go under <stage>/ray/
TENSORBOARD_DIR = "tensorboard"
STAGE_DONE_FILE = "done.json"  # the stage's best and history; written last: the stage is finished

# ---------------------------------------------------------------- inside one epoch's Ray checkpoint (rank 0 writes it)

CHECKPOINT_WEIGHTS_FILE = "model.weights.h5"  # the model's weights
CHECKPOINT_OPTIMIZER_FILE = "optimizer.npz"  # its iteration and slots (mdfer.optimizer_state); older ones lack it
CHECKPOINT_STATE_FILE = "state.json"  # the loop's state (new_stage_state's keys) and the epoch's "evaluation"


def new_stage_state() -> dict:
    """The training loop's state before a stage's first epoch, as state.json holds it after
    each one (with that epoch's "evaluation" added): `history` is every epoch's metrics row,
    which a stage's done.json and a sweep's results read back."""
    return {"epoch": 0, "best_macro_f1": -1.0, "best_epoch": 0, "since_best": 0, "history": []}


# ---------------------------------------------------------------- reports

REPORT_DIR = "report"
CURVES_FILE = "training_curves.png"
FLIP_SUFFIX = "-flip"  # report folders scored with flip test-time augmentation

# ---------------------------------------------------------------- sweeps

SWEEP_FILE = "sweep.json"  # what a sweep was asked for: base config, dataset
TUNE_DIR = "tune"  # Ray Tune's experiment name: <stage>/tune/
TRIALS_DIR = "trials"
TRIALS_CSV = "trials.csv"
TRIALS_PARQUET = "trials.parquet"
METRIC_PLOT_FILE = "metric_vs_hparams.png"
BEST_TRIAL_FILE = "best.yaml"  # the stage's winning trial; written last: the stage's sweep is done

# ---------------------------------------------------------------- exports (relative to <run or sweep>/export/)

EXPORT_DIR = "export"
KERAS_FILE = "hailo_model.keras"
TFLITE_FLOAT32 = "hailo_model_float32.tflite"
TFLITE_OPTIMIZED = "hailo_model_float32_optimized.tflite"
TFLITE_INT8 = "hailo_model_int8.tflite"
ONNX_FILE = "model.onnx"
HEADS_FILE = "heads.json"  # beside every exported model: input size, heads and their classes
MODEL_CARD_FILE = "MODEL_CARD.md"  # beside every export: data, recipe, test figures, intended use, limits
HAILO_DIR = "hailo"
HAILO_TFLITE = f"{HAILO_DIR}/hailo_model.tflite"
HAILO_SCRIPT_FILE = "model.alls"  # in hailo/: the model script carrying the normalization
HAILO_CALIB_FILE = "calib.npy"  # in hailo/: calibration images for the DFC
HEF_FILE = "hailo_model.hef"  # in hailo/: the compiled model, when the DFC ran


def _join(*parts: str) -> str:
    return "/".join(parts)


def dataset_key(dataset_id: str, *parts: str) -> str:
    """A prepared dataset's folder (manifest and shards), or a file in it."""
    return _join(DATASETS_DIR, dataset_id, *parts)


def shard_file(split: str, dataset: str, number: int) -> str:
    """One Parquet shard, relative to its dataset's folder (as the manifest lists it)."""
    return _join(SHARDS_DIR, split, f"part-{dataset}-{number:05d}.parquet")


def run_key(run_id: str, *parts: str) -> str:
    """A training run's folder (config, stages, model, reports, export), or a key in it."""
    return _join(RUNS_DIR, run_id, *parts)


def sweep_key(sweep_id: str, *parts: str) -> str:
    """A Tune sweep's folder (like a run's once finished, plus each stage's trials), or a key in it."""
    return _join(SWEEPS_DIR, sweep_id, *parts)


def stage_key(prefix: str, stage: str, *parts: str) -> str:
    """A stage's folder under a run or sweep `prefix` (checkpoints, best weights), or a key in it."""
    return _join(prefix, stage, *parts)


def trial_key(stage_prefix: str, trial_id: str) -> str:
    """One sweep trial's folder under its stage: that trial's Ray Train checkpoints."""
    return _join(stage_prefix, TRIALS_DIR, trial_id)


def report_key(run_id: str, name: str) -> str:
    """A run's report folder: metrics.json, confusion PNGs and (on its own split) the curves."""
    return run_key(run_id, REPORT_DIR, name)


def split_report_name(split: str, lowpass: int | None = None) -> str:
    """The report folder name of a run's split; `lowpass`: scored with a blur other than the run's."""
    return split if lowpass is None else f"{split}-lowpass{lowpass}"


def data_report_name(dataset_id: str) -> str:
    """The report folder name of a run scored on class folders (stored as `dataset_id`)."""
    return f"data-{dataset_id}"


def model_report_key(model_stem: str, model_sha256_12: str, dataset_id: str) -> str:
    """An exported model's report on class folders; the sha keeps same-named models apart."""
    return _join(EVALUATIONS_DIR, f"{model_stem}-{model_sha256_12}", dataset_id)


def confusion_file(head: str) -> str:
    """A report's confusion-matrix picture of one head."""
    return f"confusion_{head}.png"


def source_prefix(run_id: str | None = None, sweep_id: str | None = None) -> str:
    """Where a trained model lives: a run, or a finished sweep (which looks like a run)."""
    if bool(run_id) == bool(sweep_id):
        raise ValueError("give exactly one of run_id or sweep_id")
    return run_key(run_id) if run_id else sweep_key(sweep_id)


def export_key(prefix: str, *parts: str) -> str:
    """The export folder of the run or sweep at `prefix`, or a file in it."""
    return _join(prefix, EXPORT_DIR, *parts)
