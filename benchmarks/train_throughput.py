"""What does Ray Train cost mdfer's training, and how well do two workers scale?

One run, on the same prepared shards, image size, global batch and stage settings:

  (a) plain loop: one process, no Ray: `model_from_config` + `make_train_step` under OneDeviceStrategy,
      fed pre-decoded in-memory batches with the same per-dataset mix as the stream, TensorFlow
      threads set exactly as the 1-worker Ray Train worker of (b) sets them (--cpus-1worker);
  (s<size>-<precision>) the same plain loop at other input sizes (--sizes) and precisions
      (--precisions: float32, mixed_bfloat16), each against (a): what a resolution costs per image;
  (stride1-<groups>) the same plain loop with other backbone block groups at stride 1 (--stride1,
      model.stride1_blocks), each against (a): larger feature maps at the same input size;
  (<backbone>-s<size>) the same plain loop on another backbone (--backbones, model.backbone) at
      --image-size and each of --sizes, each against (a): e.g. EfficientNet-Lite0 at 48/64/96/112 px
      beside EfficientNetV2B0 at 48 px (random weights: the speed does not depend on them);
  (a/2) diagnostic: the same plain loop at half the global batch, i.e. what each worker of (c)
      computes per step, so the cost of a smaller per-worker batch is apart from Ray's;
  (b) Ray Train, 1 worker x 1 thread, through mdfer's own code path (`mdfer.stages.fit_stage`:
      Ray Data stream with augmentation, MultiWorkerMirroredStrategy, per-epoch validation
      and checkpoint); train.cpus_per_worker 1 leaves one of the 2 CPUs to Ray Data;
  (b0) as (b) with mdfer.stream.IdleBackoff off (MDFER_DATA_IDLE_BACKOFF=0): Ray Data's
      scheduling loop spins while the stream waits for training, on a core training wants;
  (c) Ray Train, 2 workers x 1 thread (train.cpus_per_worker 0.5).

The rate of each is the `images_per_second` the training loop measures per epoch (train steps
only, validation excluded), summed over epochs 2.. (epoch 1 traces the tf.function). Every
configuration runs in its own subprocess, one after the other, so TensorFlow's thread settings
are fresh and never two Ray clusters exist at once. Goals: (b)/(a) >= 0.95 and scaling
efficiency (c) / (2 x (b)) >= 0.85.

    python benchmarks/train_throughput.py --out /tmp/train_throughput.json
"""

from __future__ import annotations

import harness  # first: it quiets TensorFlow before anything imports it

import argparse
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

if TYPE_CHECKING:
    from mdfer.config import Config
    from mdfer.dataset import DatasetManifest
    from mdfer.storage import Store

PRECISION_ENV = "MDFER_BENCH_PRECISION"  # a Keras dtype policy for the plain loop
RUN_PREFIX = "bench"


@dataclass(frozen=True)
class Variant:
    """One configuration to measure; `workers == 0` means the plain loop without Ray."""

    key: str
    name: str
    workers: int
    cpus_per_worker: float
    batch_size: int  # global
    env: dict[str, str] = field(default_factory=dict)  # extra environment of its subprocess
    image_size: int | None = None  # None: --image-size
    stride1_blocks: tuple[int, ...] | None = None  # None: the config's model.stride1_blocks
    backbone: str | None = None  # None: the config's model.backbone


@dataclass
class Measured:
    """What one configuration's subprocess reports back."""

    key: str
    name: str
    epochs: list[dict]  # per epoch: epoch, images_per_second, train_seconds, data_wait_seconds, steps
    steps_per_epoch: int
    global_batch: int
    wall_stage_s: float  # build + epochs (plain); fit_stage() (Ray)
    wall_process_s: float = 0.0  # the whole subprocess: imports, Ray start and stop included
    ray_init_s: float | None = None
    cpu_busy: float | None = None  # share of all cores busy while the stage ran (whole machine)
    load_start: float = 0.0
    load_end: float = 0.0
    note: str = ""
    img_s_after_epoch_1: float | None = None  # rate(), for the JSON report

    def rate(self, skip: int = 1) -> float:
        """Images per second over epochs after the first `skip` (all epochs if too few)."""
        timed = self.epochs[skip:] or self.epochs
        return sum(e["steps"] * self.global_batch for e in timed) / sum(e["train_seconds"] for e in timed)

    def timed(self, skip: int = 1) -> list[dict]:
        return self.epochs[skip:] or self.epochs


# ---------------------------------------------------------------- data and configs


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of all cores from /proc/stat: says whether the cores were saturated."""
    values = [float(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def busy_share(start: tuple[float, float], end: tuple[float, float]) -> float | None:
    busy, total = end[0] - start[0], end[1] - start[1]
    return busy / total if total > 0 else None


def write_config(path: Path, roots: dict[str, str], variant: Variant, args: argparse.Namespace) -> Path:
    """--config (the embedded default unless given) reduced to the given datasets and one stage, so
    every variant trains exactly what a run of mdfer would (same augmentation, shuffle buffer,
    optimizer, loss weights)."""
    raw = harness.reduced_config(args.config, roots)
    raw["model"]["image_size"] = variant.image_size or args.image_size
    if variant.stride1_blocks is not None:
        raw["model"]["stride1_blocks"] = list(variant.stride1_blocks)
    if variant.backbone is not None:  # its own options only: no stride-1 groups, weights by name
        raw["model"].update(backbone=variant.backbone, weights="none", stride1_blocks=[])
        for stage in raw["train"]["stages"]:
            stage.pop("stride1_blocks", None)
    raw["stream"]["batch_size"] = variant.batch_size
    if args.no_augment:
        raw["stream"]["augment"] = {"flip": False, "max_shift": 0.0, "max_rotation_deg": 0.0,
                                    "brightness": 0.0, "contrast": 0.0, "erase": 0.0}
    raw["train"]["workers"] = max(1, variant.workers)
    raw["train"]["cpus_per_worker"] = variant.cpus_per_worker
    raw["train"]["max_failures"] = 0  # a restarted worker group would hide in the numbers: fail instead
    last = raw["train"]["stages"][-1]  # the last stage: the whole network trains
    raw["train"]["stages"] = [{
        "name": "bench", "lr": last["lr"], "lr_schedule": "constant", "frozen_fraction": args.frozen_fraction,
        "epochs": args.epochs, "patience": args.epochs,  # never stop early
        "loss_weights": last["loss_weights"]}]
    return harness.write_config(raw, path)


# ---------------------------------------------------------------- the plain loop (child process)


def decoded_train_rows(store: Store, manifest: DatasetManifest, config: Config) -> dict[str, dict[str, np.ndarray]]:
    """Every train image of each dataset decoded once, as the stream decodes it (DecodeBatch,
    through mdfer.dataset.iter_split)."""
    from mdfer.dataset import iter_split
    from mdfer.stream import BATCH_KEYS

    parts = list(iter_split(store, manifest, "train", config.model.image_size))
    every = {k: np.concatenate([p[k] for p in parts]) for k in BATCH_KEYS}
    mine = {name: every["domain"] == index for index, name in enumerate(config.domain_names())}
    return {name: {k: v[rows] for k, v in every.items()} for name, rows in mine.items() if rows.any()}


def epoch_indices(n: int, needed: int, rng: np.random.Generator) -> np.ndarray:
    """`needed` row numbers: shuffled passes over all n rows, as the stream repeats a dataset."""
    passes = [rng.permutation(n) for _ in range(-(-needed // n))]
    return np.concatenate(passes)[:needed]


def run_plain(config: Config, store: Store, manifest: DatasetManifest) -> Measured:
    """Variant (a): the training step with data that costs nothing, the ceiling Ray Train aims at.
    Mirrors mdfer.train_loop.train_stage on one worker: its thread limits and set-up
    (harness.plain_train_step), its epoch loop and per-epoch numbers; not its Ray Data stream,
    validation, checkpoints and LR schedule (the stage here is constant-LR)."""
    from mdfer.train_loop import limit_threads

    limit_threads(config.train.cpus_per_worker)  # what the Ray Train worker sets, before TF starts its pools
    if os.environ.get(PRECISION_ENV):
        import keras
        keras.mixed_precision.set_global_policy(os.environ[PRECISION_ENV])

    from mdfer.stream import BATCH_KEYS, plan_epoch

    stage = config.train.stages[0]
    started = time.perf_counter()
    plan = plan_epoch(manifest, config, num_workers=1)
    rows = decoded_train_rows(store, manifest, config)
    train_on = harness.plain_train_step(config, manifest, plan.global_batch_size)
    rng = np.random.default_rng(config.train.seed)
    epochs = []
    for epoch in range(1, stage.epochs + 1):
        order = {d: epoch_indices(len(rows[d]["label"]), plan.rows_per_epoch(d), rng) for d in plan.domains}
        epoch_started, data_wait, loss_sum = time.perf_counter(), 0.0, 0.0
        for index in range(plan.steps_per_epoch):
            waited = time.perf_counter()
            parts = []
            for d in plan.domains:
                share = plan.per_worker_batch[d]
                picked = order[d][index * share:(index + 1) * share]
                parts.append({k: rows[d][k][picked] for k in BATCH_KEYS})
            batch = {k: np.concatenate([p[k] for p in parts]) for k in BATCH_KEYS}
            data_wait += time.perf_counter() - waited
            loss_sum += train_on(batch)
        seconds = time.perf_counter() - epoch_started
        epochs.append({"epoch": epoch, "steps": plan.steps_per_epoch, "train_seconds": seconds,
                       "data_wait_seconds": data_wait, "loss": loss_sum / plan.steps_per_epoch,
                       "images_per_second": plan.steps_per_epoch * plan.global_batch_size / seconds})
        print(f"plain epoch {epoch}/{stage.epochs}: {epochs[-1]['images_per_second']:.1f} img/s", flush=True)
    return Measured("", "", epochs, plan.steps_per_epoch, plan.global_batch_size,
                    time.perf_counter() - started, note="no validation pass, no checkpoint")


# ---------------------------------------------------------------- Ray Train (child process)


def ray_history(result: Any) -> tuple[list[dict], str]:
    """Every epoch's metrics of the stage, and where they came from.

    Under Ray Train v2 `Result.metrics_dataframe` holds only the kept checkpoints' reports
    (mdfer keeps 2), so with 3 epochs one epoch can be missing; the latest checkpoint's
    state.json holds the loop's complete history, so that is read first.
    """
    frame = result.metrics_dataframe
    in_frame = sorted(int(e) for e in frame["epoch"]) if frame is not None and not frame.empty else []
    history: list[dict] = []
    if result.checkpoint is not None:
        from mdfer.layout import CHECKPOINT_STATE_FILE
        with result.checkpoint.as_directory() as folder:
            history = json.loads((Path(folder) / CHECKPOINT_STATE_FILE).read_text()).get("history", [])
    source = "latest checkpoint's state.json"
    if not history and in_frame:
        history = frame.sort_values("epoch").to_dict("records")
        source = "metrics_dataframe"
    return history, f"history from {source}; metrics_dataframe had epochs {in_frame}"


def run_ray(config: Config, store: Store, manifest: DatasetManifest, cores: int) -> Measured:
    """Variants (b) and (c): one stage through mdfer's own `fit_stage` on a private Ray."""
    import ray

    from mdfer.stages import ensure_ray, fit_stage
    from mdfer.stream import plan_epoch

    os.environ["RAY_ADDRESS"] = ""  # a private cluster even under `ray job submit`
    started = time.perf_counter()
    ensure_ray(num_cpus=cores, include_dashboard=True, logging_level=logging.WARNING)  # pins the State API
    ray_init_s = time.perf_counter() - started
    try:
        plan = plan_epoch(manifest, config, config.train.workers)
        run_id = f"{RUN_PREFIX}-{config.train.workers}w-{time.time_ns()}"  # fresh: never resume
        started = time.perf_counter()
        result = fit_stage(config, store, run_id, 0, manifest, None)
        wall = time.perf_counter() - started
        history, note = ray_history(result)
    finally:
        ray.shutdown()
    epochs = [{"epoch": int(m["epoch"]), "steps": plan.steps_per_epoch,
               **{k: float(m[k]) for k in ("images_per_second", "train_seconds", "data_wait_seconds", "loss")}}
              for m in sorted(history, key=lambda m: m["epoch"])]
    return Measured("", "", epochs, plan.steps_per_epoch, plan.global_batch_size, wall,
                    ray_init_s=ray_init_s, note=note)


def child_main(args: argparse.Namespace) -> int:
    """One configuration in this process; the result goes to --result as JSON."""
    from mdfer.config import load_config
    from mdfer.dataset import read_manifest
    from mdfer.storage import Store

    process_started = time.perf_counter()
    config = load_config(args.child_config)
    store = Store(str(args.work / "store"))
    manifest = read_manifest(store, args.dataset_id)
    load_start, cpu_start = os.getloadavg()[0], cpu_times()
    if args.child == "plain":
        measured = run_plain(config, store, manifest)
    else:
        measured = run_ray(config, store, manifest, args.cores)
    measured.cpu_busy = busy_share(cpu_start, cpu_times())
    measured.load_start, measured.load_end = load_start, os.getloadavg()[0]
    measured.wall_process_s = time.perf_counter() - process_started
    args.result.write_text(json.dumps(asdict(measured)))
    return 0


# ---------------------------------------------------------------- driver


EPOCH_LINE = re.compile(r"(bench|plain) epoch \d+/\d+")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def run_child(variant: Variant, config_path: Path, args: argparse.Namespace, dataset_id: str) -> Measured:
    """Run one configuration in a fresh process; echo its per-epoch lines, keep the rest in a log."""
    result_path = args.work / f"result-{variant.key}.json"
    log_path = args.work / f"log-{variant.key}.txt"
    result_path.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "plain" if variant.workers == 0 else "ray",
               "--child-config", str(config_path), "--result", str(result_path), "--work", str(args.work),
               "--dataset-id", dataset_id, "--cores", str(args.cores)]
    env = {**os.environ, "RAY_ADDRESS": "", "OMP_NUM_THREADS": "1", **variant.env}
    timed_out = threading.Event()
    with open(log_path, "w") as log, subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            start_new_session=True) as child:  # its own group: a hung run can be stopped whole
        watchdog = threading.Timer(args.timeout, lambda: (timed_out.set(), stop_group(child)))
        watchdog.start()
        try:
            echoed = ""
            for line in child.stdout:
                log.write(line)
                line = ANSI.sub("", line).strip()
                if EPOCH_LINE.search(line) and line != echoed:  # Ray can forward a line twice
                    print(f"  {variant.key}: {line[:150]}", flush=True)
                    echoed = line
            child.wait()
        except BaseException:
            stop_group(child)
            raise
        finally:
            watchdog.cancel()
    if timed_out.is_set():
        raise SystemExit(f"{variant.name}: stopped after {args.timeout:.0f} s without a result; see {log_path}")
    if child.returncode != 0 or not result_path.exists():
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"{variant.name}: exit code {child.returncode}; last lines of {log_path}:\n{tail}")
    measured = Measured(**json.loads(result_path.read_text()))
    measured.key, measured.name, measured.img_s_after_epoch_1 = variant.key, variant.name, measured.rate()
    return measured


def stop_group(child: subprocess.Popen) -> None:
    """SIGTERM lets the child shut its Ray down; what is left of its own group is then killed."""
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(child.pid, signal.SIGKILL)  # the group id is the child's pid (new session)
    except ProcessLookupError:
        pass


def variants(args: argparse.Namespace) -> list[Variant]:
    from mdfer.stream import IDLE_BACKOFF_ENV
    from mdfer.train_loop import intra_op_threads

    batch, cpus = args.batch_size, args.cpus_1worker
    out = [Variant("plain", f"(a) plain TF loop, 1 process, cpus {cpus:g}", 0, cpus, batch)]
    for size in args.sizes:
        for precision in args.precisions:
            if (size, precision) != (args.image_size, "float32"):
                out.append(Variant(f"s{size}-{precision}", f"(s) plain TF loop, {size} px, {precision}", 0, cpus,
                                   batch, env={PRECISION_ENV: precision} if precision != "float32" else {},
                                   image_size=size))
    for groups in args.stride1:
        blocks = tuple(int(g) for g in groups.split(",") if g and g != "none")
        out.append(Variant(f"stride1-{'-'.join(map(str, blocks)) or 'none'}",
                           f"(stride1) plain TF loop, groups {list(blocks)} at stride 1", 0, cpus, batch,
                           stride1_blocks=blocks))
    for backbone in args.backbones:
        for size in dict.fromkeys([args.image_size, *args.sizes]):
            out.append(Variant(f"{backbone}-s{size}", f"(bb) plain TF loop, {backbone}, {size} px", 0, cpus, batch,
                               image_size=size, backbone=backbone))
    if not args.skip_half_batch:
        out.append(Variant("plain_half", f"(a/2) plain TF loop, batch {batch // 2} (diagnostic)", 0, 1.0, batch // 2))
    threads = intra_op_threads(args.cpus_1worker)
    out.append(Variant("ray1", f"(b) Ray Train, 1 worker x {threads} thread{'s' * (threads > 1)} "
                               f"(cpus {args.cpus_1worker:g})",
                       1, args.cpus_1worker, batch))
    out.append(Variant("ray1_spin", "(b0) as (b), Ray Data's idle loop left spinning", 1, args.cpus_1worker, batch,
                       env={IDLE_BACKOFF_ENV: "0"}))
    out.append(Variant("ray2", "(c) Ray Train, 2 workers x 1 thread (cpus 0.5 each)", 2, 0.5, batch))
    def group(key: str) -> str:  # --only names the --sizes, --stride1 and --backbones variants as groups
        if any(key.startswith(f"{b}-s") for b in args.backbones):
            return "backbones"
        return "stride1" if key.startswith("stride1-") else "sizes" if key[0] == "s" and key[1].isdigit() else key
    return [v for v in out if not args.only or group(v.key) in args.only]


def stride1_label(config_path: Path) -> str:
    """The config's own model.stride1_blocks, as the ratios name it."""
    return str((yaml.safe_load(config_path.read_text()).get("model") or {}).get("stride1_blocks", []))


def add_ratios(report: harness.Report) -> None:
    r, got, ratios = (lambda k: report.results[k].rate()), report.results, {}
    if {"ray1", "plain"} <= got.keys():
        ratios["(b) Ray Train 1 worker / (a) plain loop  [goal >= 0.95]"] = r("ray1") / r("plain")
    if {"ray1", "ray1_spin"} <= got.keys():
        ratios["(b) / (b0): mdfer's Ray Data idle back-off on vs off"] = r("ray1") / r("ray1_spin")
    if {"ray2", "ray1"} <= got.keys():
        ratios["scaling efficiency (c) / (2 x (b))  [goal >= 0.85]"] = r("ray2") / (2 * r("ray1"))
    for key in (k for k in got if k.startswith("stride1-")):
        ratios[f"({key}) / (a): img/s with groups {key[8:].replace('-', ',')} at stride 1 vs "
               f"{report.settings['stride1_blocks']}"] = r(key) / r("plain")
    for key in (k for k in got if k.startswith("s") and k[1].isdigit()):
        ratios[f"({key}) / (a): img/s at {key[1:].replace('-', ' px, ')} vs {report.settings['image_size']} px float32"] = \
            r(key) / r("plain")
    for key in (k for k in got if "-s" in k and not k.startswith("stride1-") and k[0] != "s"):
        backbone, size = key.rsplit("-s", 1)
        ratios[f"({key}) / (a): img/s of {backbone} at {size} px vs the config's backbone at "
               f"{report.settings['image_size']} px"] = r(key) / r("plain")
    if {"plain_half", "plain"} <= got.keys():
        ratios["(a/2) / (a): per-image speed at the per-worker batch of (c)"] = r("plain_half") / r("plain")
    if {"ray2", "plain_half"} <= got.keys():
        ratios["(c) / (2 x (a/2)): 2 workers vs two free cores at that batch"] = r("ray2") / (2 * r("plain_half"))
    report.ratios = ratios


COLUMNS = (harness.Column("configuration", 54, "<"), harness.Column("img/s", 7), harness.Column("per epoch", 22),
           harness.Column("step ms", 9), harness.Column("compute", 9), harness.Column("wait s/ep", 10),
           harness.Column("stage s", 9), harness.Column("proc s", 8), harness.Column("busy", 6),
           harness.Column("load", 11))


def table_row(m: Measured) -> list[str]:
    timed = m.timed()
    steps = sum(e["steps"] for e in timed)
    seconds = sum(e["train_seconds"] for e in timed)
    wait = sum(e["data_wait_seconds"] for e in timed)
    return [m.name, f"{m.rate():.1f}", " ".join(f"{e['images_per_second']:.0f}" for e in m.epochs),
            f"{1e3 * seconds / steps:.0f}", f"{1e3 * (seconds - wait) / steps:.0f}", f"{wait / len(timed):.1f}",
            f"{m.wall_stage_s:.0f}", f"{m.wall_process_s:.0f}", f"{m.cpu_busy:.0%}" if m.cpu_busy is not None else "-",
            f"{m.load_start:.1f}->{m.load_end:<4.1f}"]


def print_table(report: harness.Report) -> None:
    s = report.settings
    print()
    print(f"mdfer training throughput: {s['data']}, {s['train_rows']:,} train rows, {s['image_size']}x"
          f"{s['image_size']}, global batch {s['batch_size']}, frozen {s['frozen_fraction']:.0%}, "
          f"{s['epochs']} epochs, {s['cores']} cores, augment {'off' if s['no_augment'] else 'default'}")
    print(f"img/s = images / train seconds of epochs 2..{s['epochs']} (epoch 1 traces the step); "
          + harness.load_line(s["load_start"], s["cores"]))
    print()
    harness.print_table(COLUMNS, map(table_row, report.results.values()))
    print("step ms = train seconds / steps; compute = the same without the time spent waiting for a batch; "
          "stage s = data build + model + epochs (plain: no validation) or fit_stage() (Ray: Ray Data build, "
          "worker start, epochs with validation and checkpoints); proc s = the whole subprocess; busy = share "
          "of all cores busy during the stage, whole machine")
    for m in report.results.values():
        if m.note or m.ray_init_s is not None:
            init = f"ray.init {m.ray_init_s:.1f} s; " if m.ray_init_s is not None else ""
            print(f"  {m.key}: {init}{m.note}")
    print()
    report.print_ratios("ratios of img/s", 66)
    print()
    report.print_phases()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = harness.parser(__doc__)
    parser.add_argument("--data", type=Path, help="FER2013: its Kaggle-layout tarball (fer2013/train/<class>/*.jpg "
                        "inside) or that folder; default: generated FER-like + FANE-like faces")
    parser.add_argument("--per-class", type=int, default=150,
                        help="train images per class: generated, or taken from --data")
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=32, help="global batch, every configuration")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--frozen-fraction", type=float, default=0.0, help="share of the backbone frozen")
    parser.add_argument("--no-augment", action="store_true", help="stream without augmentation")
    parser.add_argument("--cpus-1worker", type=float, default=1.0,
                        help="train.cpus_per_worker of (b); must leave a CPU to Ray Data")
    parser.add_argument("--skip-half-batch", action="store_true", help="skip the (a/2) diagnostic")
    parser.add_argument("--config", type=Path, default=harness.DEFAULT_YAML,
                        help="the config whose stream, model and train settings every variant uses "
                             "(default: the embedded default.yaml); its last stage's LR, one stage")
    parser.add_argument("--sizes", type=int, nargs="*", default=[],
                        help="also time the plain loop at these input sizes (px), against (a)")
    parser.add_argument("--precisions", nargs="+", default=["float32"], choices=("float32", "mixed_bfloat16"),
                        help="with --sizes: Keras dtype policies to time the plain loop in")
    parser.add_argument("--stride1", nargs="*", default=[], metavar="GROUPS",
                        help="also time the plain loop with these backbone block groups at stride 1, "
                             "each a comma list or 'none' (e.g. --stride1 none 6 4): against (a), which "
                             "uses the config's model.stride1_blocks")
    parser.add_argument("--backbones", nargs="*", default=[], metavar="NAME",
                        help="also time the plain loop on these backbones (mdfer.backbones) at --image-size "
                             "and each of --sizes, against (a): the config's backbone at --image-size")
    parser.add_argument("--only", nargs="+",
                        choices=("plain", "plain_half", "ray1", "ray1_spin", "ray2", "sizes", "stride1", "backbones"),
                        help="run only these configurations (to debug one)")
    parser.add_argument("--timeout", type=float, default=480, help="seconds per configuration at most")
    # one configuration in a subprocess (internal)
    parser.add_argument("--child", choices=("plain", "ray"), help=argparse.SUPPRESS)
    parser.add_argument("--child-config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dataset-id", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM runs the finally blocks: the child's ray.shutdown; the parent's stop of the running
    # child's process group and removal of the work folder
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.child:
        return child_main(args)
    if args.batch_size % 2:
        raise SystemExit("--batch-size must be even: (c) splits it over 2 workers")
    phases = harness.Phases()
    with harness.work_folder(args.work, "mdfer-train-bench-") as work:
        try:
            report = measure(args, work, phases)
        finally:
            shutil.rmtree(work / "store" / "runs", ignore_errors=True)  # a kept --work: data and shards only
    add_ratios(report)
    print_table(report)
    report.write(args.out)
    return 0


def measure(args: argparse.Namespace, work: Path, phases: harness.Phases) -> harness.Report:
    """Every configuration of the run, one subprocess after another, on the same shards."""
    from mdfer.config import load_config
    from mdfer.ingest import prepare
    from mdfer.storage import Store

    source = f"{args.data}, {args.per_class}/class" if args.data else \
        f"generated FER-like + FANE-like, {args.per_class}/class"
    print(f"{source}: preparing shards in {work} ...", flush=True)
    roots = harness.dataset_roots(args.data, work / "data", args.per_class)
    todo = variants(args)
    paths = {v.key: write_config(work / f"config-{v.key}.yaml", roots, v, args) for v in todo}
    store = Store(str(work / "store"))
    manifest = prepare(load_config(next(iter(paths.values()))), store)  # same data in all
    store.delete_prefix("runs")  # a reused --work: no earlier checkpoints to resume from
    phases.lap("data + prepare")

    load = harness.wait_for_quiet(args.max_load, args.max_wait)
    phases.lap("waiting for load")
    report = harness.Report(settings={
        "data": source, "per_class": args.per_class, "image_size": args.image_size, "batch_size": args.batch_size,
        "epochs": args.epochs, "frozen_fraction": args.frozen_fraction, "no_augment": args.no_augment,
        "cores": args.cores, "cpus_1worker": args.cpus_1worker, "load_start": load,
        "stride1_blocks": stride1_label(args.config),
        "train_rows": sum(manifest.split_sizes("train").values()),
        "dataset_id": manifest.dataset_id}, phases_s=phases.seconds)
    args.work = work  # the children's --work
    for variant in todo:
        print(f"{variant.name} ...", flush=True)
        report.results[variant.key] = run_child(variant, paths[variant.key], args, manifest.dataset_id)
        phases.lap(variant.key)
    return report


if __name__ == "__main__":
    sys.exit(main())
