"""What every benchmark here shares: its common options, data, config, the plain training step it
compares against, a phase timer, the wait for a quiet machine, tables and the JSON report.

Benchmarks import it first (`import harness` from benchmarks/, the script's own folder): it
quiets TensorFlow and tqdm before anything imports them. A benchmark prints its variants side by
side with the ratios against the plain alternative measured in the same run, never against a
number from another run or machine.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported anywhere
os.environ.setdefault("TQDM_DISABLE", "1")  # prepare's progress bars would bury the table

import argparse
import json
import shutil
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

if TYPE_CHECKING:
    from mdfer.config import Config
    from mdfer.dataset import DatasetManifest

DEFAULT_YAML = Path(__file__).resolve().parents[1] / "mdfer" / "configs" / "default.yaml"
FER = "fer2013"


# ---------------------------------------------------------------- options and machine


def parser(doc: str, work: bool = True) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark takes; `work`: it prepares data
    (--work, --cores)."""
    out = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    out.add_argument("--out", type=Path, help="also write the results as JSON here")
    out.add_argument("--max-load", type=float, default=1.5, help="wait for a lower 1-min load average first")
    out.add_argument("--max-wait", type=float, default=600, help="seconds to wait for --max-load at most")
    if work:
        out.add_argument("--work", type=Path, help="keep data and shards here and reuse them "
                                                    "(default: a temp dir, removed at the end)")
        out.add_argument("--cores", type=int, default=2, help="Ray num_cpus (and TensorFlow threads where "
                                                                "the benchmark says)")
    return out


def wait_for_quiet(max_load: float, max_wait_s: float, poll_s: float = 30.0) -> float:
    """Wall-clock rates are only comparable on an otherwise idle machine: wait for the 1-minute
    load average to drop below `max_load`; returns the load the measurement starts under."""
    print("checking the machine is quiet ...", flush=True)
    waited = 0.0
    load = os.getloadavg()[0]
    while load >= max_load and waited < max_wait_s:
        print(f"  1-min load average {load:.2f} >= {max_load}: waiting ({waited:.0f} of {max_wait_s:.0f} s)",
              flush=True)
        time.sleep(poll_s)
        waited += poll_s
        load = os.getloadavg()[0]
    if load >= max_load:
        print(f"  load still {load:.2f} after {waited:.0f} s: measuring anyway, expect noise", flush=True)
    return load


def load_line(load: float, cores: int | None = None) -> str:
    """The table's line on the load the run started under: every wall-clock number depends on it."""
    busy = cores is not None and load > 0.5 * cores
    return (f"1-min load average when measuring started: {load:.2f}"
            + ("  (other processes were using the cores: expect noise)" if busy else ""))


class Phases:
    """Wall time of each phase of a run, lap by lap: where the run's minutes went."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._started = time.perf_counter()

    def lap(self, name: str) -> None:
        """Ends the phase `name`, which started at the previous lap (or at construction)."""
        now = time.perf_counter()
        self.seconds[name] = now - self._started
        self._started = now


@contextmanager
def work_folder(given: Path | None, prefix: str) -> Iterator[Path]:
    """--work, kept for the next run, or a temp dir removed at the end."""
    folder = (given or Path(tempfile.mkdtemp(prefix=prefix))).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    finally:
        if given is None:
            shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------- data and config


def dataset_roots(data: Path | None, folder: Path, per_class: int | None, fane: bool = True) -> dict[str, str]:
    """The benchmark's datasets by name: FER2013 from `data` (a tarball or folder, `per_class`
    train images per class, None: all), or without it generated faces (mdfer.synth: FER-like,
    and FANE-like with `fane`) as `mdfer pipeline` generates them. Made once per `folder`."""
    if data is not None:
        return {FER: str(fer2013_root(data, folder, per_class))}
    if per_class is None:
        raise ValueError("generated data needs a per-class count")
    from mdfer import synth

    target = folder / f"generated-{per_class}{'' if fane else '-fer'}"
    if fane:
        made_once(target, lambda: synth.write_demo(target, per_class))
        return {FER: str(target / FER), "fane": str(target / "fane")}
    made_once(target, lambda: synth.write_fer_like(target / FER, per_class, max(2, per_class // 4)))
    return {FER: str(target / FER)}


def made_once(target: Path, make: Callable[[], object]) -> None:
    """Runs `make` (which fills `target`) unless an earlier run completed it: a reused --work
    keeps its data, an interrupted one is made again."""
    done = target / ".complete"
    if not done.exists():
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        make()
        done.touch()


def fer2013_root(source: Path, folder: Path, per_class: int | None = None) -> Path:
    """FER2013 in the Kaggle layout (root/{train,test}/<class>/*.jpg) from its tarball (fer2013/
    inside) or folder. With `per_class`, only the first `per_class` train images of each class
    and a quarter as many test images: the whole 28k-image train split can take far longer than a
    benchmark's budget."""
    if source.is_dir():
        given = source / FER if (source / FER / "train").is_dir() else source
        if not (given / "train").is_dir():
            raise SystemExit(f"{source}: expected train/<class>/*.jpg (or {FER}/train/<class>/*.jpg) inside")
        if per_class is None:
            return given
        target = folder / f"{FER}-{per_class}"
        made_once(target, lambda: _link_subset(given, target / FER, per_class))
    else:
        target = folder / f"{FER}-{per_class or 'all'}"
        made_once(target, lambda: _extract(source, target, per_class))
    root = target / FER
    if not (root / "train").is_dir():
        raise SystemExit(f"{source}: expected {FER}/train/<class>/*.jpg inside")
    return root


def _first_per_class(per_class: int | None) -> Callable[[str, str], bool]:
    """Says yes to a file of (split, class) while that class of that split is below its count."""
    taken: Counter[tuple[str, str]] = Counter()

    def wanted(split: str, cls: str) -> bool:
        taken[split, cls] += 1
        return per_class is None or taken[split, cls] <= (per_class if split == "train" else max(2, per_class // 4))

    return wanted


def _extract(tarball: Path, target: Path, per_class: int | None) -> None:
    wanted = _first_per_class(per_class)
    with tarfile.open(tarball) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) == 4 and parts[0] == FER and wanted(parts[1], parts[2]):
                tar.extract(member, target, filter="data")


def _link_subset(given: Path, root: Path, per_class: int) -> None:
    wanted = _first_per_class(per_class)
    for path in sorted(given.glob("*/*/*")):
        split, cls = path.parts[-3:-1]
        if path.is_file() and wanted(split, cls):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            (root / split / cls / path.name).symlink_to(path.resolve())


def reduced_config(config_path: Path, roots: dict[str, str]) -> dict[str, Any]:
    """The raw config at `config_path` reduced to the datasets in `roots` (their roots set, loss
    weights of the others dropped), so a benchmark trains and streams what a run of mdfer on
    those datasets would. The caller adjusts it and writes it with `write_config`."""
    raw = yaml.safe_load(config_path.read_text())
    every = raw["data"]["domains"]
    raw["data"]["domains"] = [{**d, "root": roots[d["name"]]} for d in every if d["name"] in roots]
    if not raw["data"]["domains"]:
        raise SystemExit(f"{config_path}: none of its datasets is {', '.join(roots)}")
    if len(raw["data"]["domains"]) < len(every):
        raw["stream"].pop("domain_mix", None)  # it names datasets that are not here
    for stage in raw["train"]["stages"]:
        stage["loss_weights"] = {k: v for k, v in stage["loss_weights"].items() if k in roots or k == "domain"}
    return raw


def write_config(raw: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ---------------------------------------------------------------- the plain alternative


def plain_train_step(config: Config, manifest: DatasetManifest, global_batch: int, stage_index: int = 0,
                     frozen_fraction: float | None = None) -> Callable[[dict[str, np.ndarray]], float]:
    """The training step of one process without Ray, set up as the set-up part of
    `mdfer.train_loop.train_stage` does it (seed, strategy, model, frozen share, optimizer, class
    weights, step; no checkpoint, no ImageNet weights), from the library's public functions:
    keep it in step with train_stage. Returns a function that trains on one batch of uint8
    images fed as train_stage feeds them and returns the loss (waiting for the step).
    Call `mdfer.train_loop.limit_threads` first: it must run before TensorFlow starts its pools."""
    import keras
    import tensorflow as tf

    from mdfer.model import model_from_config, set_trainable_fraction
    from mdfer.stages import class_weights
    from mdfer.steps import make_train_step
    from mdfer.train_loop import make_optimizer, make_strategy

    stage = config.train.stages[stage_index]
    keras.utils.set_random_seed(config.train.seed + stage_index % len(config.train.stages))
    strategy = make_strategy(1, config.train.gpus_per_worker)
    with strategy.scope():
        model = model_from_config(config, training=True, stage_index=stage_index)
    set_trainable_fraction(model, stage.frozen_fraction if frozen_fraction is None else frozen_fraction)
    with strategy.scope():
        optimizer = make_optimizer(config.train.optimizer, stage.lr, config.train.weight_decay)
    weights = {k: np.asarray(v, np.float32) for k, v in class_weights(config, manifest).items()}
    step = make_train_step(strategy, model, optimizer, list(config.classes()), stage.loss_weights,
                           global_batch, config.train.label_smoothing, weights)

    def train_on(batch: dict[str, np.ndarray]) -> float:
        feed = {**batch, "image": batch["image"].astype(np.float32)}
        loss, _ = step({k: tf.constant(v) for k, v in feed.items()})
        return float(loss)

    return train_on


# ---------------------------------------------------------------- tables and report


@dataclass(frozen=True)
class Column:
    header: str
    width: int
    align: str = ">"  # "<" for names


def print_table(columns: Sequence[Column], rows: Iterable[Sequence[str]]) -> None:
    """Formatted cells under their headers, one variant a row, so variants read side by side."""
    header = "".join(f"{c.header:{c.align}{c.width}}" for c in columns)
    print(header)
    print("-" * len(header))
    for row in rows:
        print("".join(f"{cell:{c.align}{c.width}}" for c, cell in zip(columns, row)).rstrip())


@dataclass
class Report:
    """One run's numbers, printed and written as JSON: `settings` say what was measured,
    `results` one entry (a dataclass or dict) a variant, `ratios` each against the plain
    alternative of the same run, `sections` anything else the benchmark reports."""

    settings: dict[str, Any]
    results: dict[str, Any] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    phases_s: dict[str, float] = field(default_factory=dict)
    sections: dict[str, Any] = field(default_factory=dict)

    def print_ratios(self, title: str, width: int = 70) -> None:
        print(title)
        for name, value in self.ratios.items():
            print(f"  {name:<{width}}{value:>7.2f}")

    def print_phases(self) -> None:
        print("phases: " + ", ".join(f"{k} {v:.0f} s" for k, v in self.phases_s.items()))

    def write(self, path: Path | None) -> None:
        """The report as JSON at `path` (nothing without one)."""
        if path is None:
            return
        data = asdict(self)
        data.update(data.pop("sections"))
        path.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {path}")
