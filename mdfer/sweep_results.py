"""A finished stage sweep's results: one row per trial from Tune's saved experiment, the winner
(best reported val_macro_f1; the earlier trial wins a tie), the trials table (CSV, Parquet and the
console's aligned text), the metric-vs-hyperparameter picture, and best.yaml, written last."""

from __future__ import annotations

import io
import json
import logging
import math

import yaml
from ray import tune

from mdfer.config import Config
from mdfer.errors import MdferError, root_cause
from mdfer.layout import (BEST_TRIAL_FILE, BEST_WEIGHTS_FILE, CHECKPOINT_STATE_FILE, CHECKPOINT_WEIGHTS_FILE,
                          METRIC_PLOT_FILE, TRIALS_CSV, TRIALS_PARQUET, TUNE_DIR, stage_key, sweep_key)
from mdfer.logs import redact
from mdfer.storage import Store
from mdfer.sweep_spaces import INIT_KEY, METRIC, StageSweep, with_hparams

log = logging.getLogger("mdfer.tune")


def _store_key(store: Store, fs_path: str) -> str:
    """The store key of a path Ray reports (a file-system path, no s3:// scheme)."""
    return fs_path[len(store.root):].lstrip("/")


def _experiment(store: Store, sweep_id: str, stage: str) -> tune.ExperimentAnalysis:
    """The stage's Tune experiment as saved in the store: what `Tuner.restore` would continue."""
    return tune.ExperimentAnalysis(store.path(stage_key(sweep_key(sweep_id), stage, TUNE_DIR)),
                                   storage_filesystem=store.fs)


def _check_finished(analysis: tune.ExperimentAnalysis, sweep: StageSweep, stage: str) -> None:
    """Tune returns normally after Ctrl-C (its trials in memory then all look stopped); the state
    it saved tells: a trial not TERMINATED or ERROR, or trials not yet created, is unfinished."""
    done = sum(trial.status in ("TERMINATED", "ERROR") for trial in analysis.trials)
    if done < max(sweep.num_samples, len(analysis.trials)):
        log.warning("%s: sweep interrupted with %d of %d trial(s) unfinished; run the same command "
                    "again to continue it", stage, sweep.num_samples - done, sweep.num_samples)
        raise KeyboardInterrupt


def _trial_rows(analysis: tune.ExperimentAnalysis, store: Store,
                names: list[str]) -> tuple[list[dict], list[list[dict]], list[str | None]]:
    """(one row per trial, each trial's reported epochs, the store key of its best checkpoint)."""
    frames = analysis.trial_dataframes
    rows, histories, checkpoints = [], [], []
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):  # creation order, also after a restore
        frame = frames.get(trial.trial_id)
        reported = []
        if frame is not None and not frame.empty and METRIC in frame:
            frame = frame[frame[METRIC].notna()].drop_duplicates("epoch", keep="last").sort_values("epoch")
            reported = [{k: _plain(v) for k, v in row.items()} for row in frame.to_dict("records")]
        scored = [r for r in reported if r.get("checkpoint_path")]
        best = max(scored, key=lambda r: (r[METRIC], -r["epoch"])) if scored else None
        error = trial.get_error() if trial.status == "ERROR" else None
        checkpoints.append(_store_key(store, best["checkpoint_path"]) if best else None)
        rows.append({
            "trial_id": trial.trial_id, "status": trial.status,
            **{name: trial.config.get(name) for name in names},
            METRIC: best[METRIC] if best else None, "best_epoch": best["epoch"] if best else None,
            "epochs_run": len(reported),
            "checkpoint_path": store.key_uri(checkpoints[-1]) if best else None,
            INIT_KEY: trial.config.get(INIT_KEY),
            "seconds_to_first_report": reported[0]["time_total_s"] if reported else None,
            "first_epoch_train_seconds": reported[0]["train_seconds"] if reported else None,
            "error": redact(root_cause(Exception(error))) if error else None,
        })
        histories.append(reported)
    return rows, histories, checkpoints


def _plain(value):
    """A pandas cell as a plain Python value (exact floats; NaN as None) for YAML and JSON."""
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and math.isnan(value) else value


def _winner(rows: list[dict], stage: str) -> int:
    """Index of the trial with the best reported metric; the earlier trial wins a tie."""
    scored = [i for i, row in enumerate(rows) if row[METRIC] is not None]
    if not scored:
        errors = [row["error"] for row in rows if row["error"]]
        raise MdferError(f"{stage}: no trial reported a checkpoint ({len(rows)} trial(s))"
                         + (f"; first error: {errors[0]}" if errors else ""))
    return max(scored, key=lambda i: (rows[i][METRIC], -i))


def _table_bytes(rows: list[dict]) -> tuple[bytes, bytes]:
    """The trials table as CSV and Parquet."""
    import pandas as pd
    frame = pd.DataFrame(rows)
    parquet = io.BytesIO()
    frame.to_parquet(parquet, index=False)
    return frame.to_csv(index=False).encode(), parquet.getvalue()


def trial_table(csv: bytes, names: list[str]) -> list[str]:
    """The stage's trials as an aligned table for the console: id, status, hyperparameters, the
    best val_macro_f1 and its epoch (the winner starred)."""
    import pandas as pd
    frame = pd.read_csv(io.BytesIO(csv))
    best = frame[METRIC].idxmax() if frame[METRIC].notna().any() else None
    header = ["trial", "status", *names, METRIC, "epoch"]
    cells = [[str(row["trial_id"]) + (" *" if i == best else ""), str(row["status"]),
              *(f"{row[n]:.3g}" if isinstance(row[n], float) else str(row[n]) for n in names),
              "-" if pd.isna(row[METRIC]) else f"{row[METRIC]:.4f}",
              "-" if pd.isna(row["best_epoch"]) else str(int(row["best_epoch"]))]
             for i, row in frame.iterrows()]
    widths = [max(len(r[c]) for r in [header, *cells]) for c in range(len(header))]
    return ["  ".join(text.ljust(width) for text, width in zip(r, widths)).rstrip() for r in [header, *cells]]


def metric_png(rows: list[dict], sweep: StageSweep, stage: str, winner: int) -> bytes:
    """val_macro_f1 against each hyperparameter, one panel each; the winner is the red star."""
    from matplotlib.ticker import NullFormatter

    from mdfer.report import figure_png, plt
    parameters = sweep.parameters()
    figure, axes = plt.subplots(1, len(parameters), figsize=(3.6 * len(parameters), 3.4), squeeze=False,
                                sharey=True)
    for axis, (name, dist) in zip(axes[0], parameters.items()):
        for i, row in enumerate(rows):
            if row[METRIC] is not None:
                axis.scatter(row[name], row[METRIC], marker="*" if i == winner else "o",
                             s=160 if i == winner else 40, color="tab:red" if i == winner else "tab:blue")
        if dist.loguniform:  # the whole searched range, ticks at its ends and middle
            low, high = dist.loguniform
            axis.set_xscale("log")
            axis.set_xlim(low / 1.2, high * 1.2)
            ticks = [low, math.sqrt(low * high), high]
            axis.set_xticks(ticks, [f"{t:.2g}" for t in ticks])
            axis.xaxis.set_minor_formatter(NullFormatter())
        elif dist.uniform:
            low, high = dist.uniform
            axis.set_xlim(low - 0.05 * (high - low), high + 0.05 * (high - low))
        else:
            axis.set_xticks(dist.choice)
        axis.set_xlabel(name)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel(METRIC)
    figure.suptitle(f"{stage}: {METRIC} of each trial vs its hyperparameters ({len(rows)} trials)")
    figure.tight_layout()
    return figure_png(figure)


def seal_stage_sweep(store: Store, sweep_id: str, stage_index: int, base: Config, sweep: StageSweep) -> dict:
    """Table, picture and the winner's weights next to the stage's sweep; best.yaml last."""
    stage = base.train.stages[stage_index].name
    folder = stage_key(sweep_key(sweep_id), stage)
    names = list(sweep.parameters())
    analysis = _experiment(store, sweep_id, stage)
    _check_finished(analysis, sweep, stage)
    rows, histories, checkpoints = _trial_rows(analysis, store, names)
    winner = _winner(rows, stage)
    best_row, checkpoint = rows[winner], checkpoints[winner]
    store.write_bytes(f"{folder}/{BEST_WEIGHTS_FILE}", store.read_bytes(f"{checkpoint}/{CHECKPOINT_WEIGHTS_FILE}"))
    best_metrics = json.loads(store.read_bytes(f"{checkpoint}/{CHECKPOINT_STATE_FILE}"))["history"][-1]
    csv, parquet = _table_bytes(rows)
    store.write_bytes(f"{folder}/{TRIALS_CSV}", csv)
    store.write_bytes(f"{folder}/{TRIALS_PARQUET}", parquet)
    store.write_bytes(f"{folder}/{METRIC_PLOT_FILE}", metric_png(rows, sweep, stage, winner))
    hparams = {name: best_row[name] for name in names}
    record = {
        "stage": stage, "trial_id": best_row["trial_id"], METRIC: best_row[METRIC], "epoch": best_row["best_epoch"],
        "hyperparameters": hparams, "checkpoint_path": best_row["checkpoint_path"], INIT_KEY: best_row[INIT_KEY],
        "best": best_metrics, "history": [{k: r.get(k) for k in best_metrics} for r in histories[winner]],
        "config": with_hparams(base, stage_index, hparams).to_dict(),
    }
    store.write_bytes(f"{folder}/{BEST_TRIAL_FILE}", yaml.safe_dump(record, sort_keys=False).encode())  # last
    return record
