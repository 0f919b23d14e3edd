"""Does mdfer's Ray Data training stream keep up with training, and how does it compare with tf.data?

One run, on the real FER2013 JPEGs (same files, image size and batch size for every variant):

1. extract the tarball, write a one-dataset config, `mdfer.ingest.prepare` it into Parquet shards;
2. profile the stream's decode function on one core (CPU time per image: decode vs augment);
3. the plain alternative, `keras.utils.image_dataset_from_directory(...).prefetch(AUTOTUNE)`, with
   and without Keras augmentation layers doing the same kind of work;
4. what one training step consumes (EfficientNetV2B0, one process, fixed in-memory batch);
5. the mdfer Ray Data stream (`plan_epoch` -> `train_datasets` -> `iter_train_batches`), with the
   default augmentation and with augmentation off;
6. end to end: the Ray stream feeding the training step, as a Ray Train worker does.

Every stream runs one full epoch and records when each batch arrives, which gives two rates:
"window" (the brief's measure: --batches batches after --warmup, start-up excluded) and "epoch"
(all images / wall time from building the stream to its last batch, start-up included). Only the
epoch rate is a production rate when a stream emits large pre-decoded blocks, because the window
then just slices memory; windows faster than the decode function can possibly run on all cores
are marked "buffered". Goal: stream >= 2x what the training step consumes.

    python benchmarks/data_throughput.py --out /tmp/data_throughput.json
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported anywhere
os.environ.setdefault("TQDM_DISABLE", "1")  # prepare's progress bars would bury the table

import argparse
import dataclasses
import json
import logging
import re
import shutil
import sys
import tarfile
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mdfer.config import AugmentConfig, Config, load_config
from mdfer.ingest import prepare
from mdfer.storage import Store

DEFAULT_DATA = "/work/shared/data/fer2013-dev.tar.gz"
DOMAIN = "fer2013"
NUM_CLASSES = 7
DEFAULT_YAML = Path(__file__).resolve().parents[1] / "mdfer" / "configs" / "default.yaml"
ZERO_AUGMENT = AugmentConfig(flip=False, max_shift=0.0, max_rotation_deg=0.0, brightness=0.0, contrast=0.0)


@dataclass
class Timeline:
    """When each batch of one pass arrived, in seconds since the stream was built."""

    times: list[float]
    sizes: list[int]

    def window(self, warmup: int, batches: int) -> tuple[float, int]:
        """img/s over batches [warmup, warmup + batches): the time from the end of the last
        warm-up batch to the end of the last timed one."""
        end = min(warmup + batches, len(self.times)) - 1
        start = max(min(warmup, end) - 1, 0)
        images = sum(self.sizes[start + 1:end + 1])
        return images / max(self.times[end] - self.times[start], 1e-9), end - start

    def epoch(self) -> float:
        return sum(self.sizes) / self.times[-1]


@dataclass
class Result:
    name: str
    startup_s: float  # build + first batch (streams); trace + first step (train step)
    window_img_s: float
    window_batches: int
    epoch_img_s: float | None = None  # whole pass incl. start-up; None for the train step
    buffered: bool = False  # window faster than the decode ceiling: it drained a buffer
    note: str = ""


@dataclass
class Report:
    settings: dict[str, Any]
    results: dict[str, Result] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    profile_cpu_us: dict[str, float] = field(default_factory=dict)
    phases_s: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, result: Result) -> None:
        self.results[key] = result
        epoch = f", epoch {result.epoch_img_s:,.0f} img/s" if result.epoch_img_s else ""
        print(f"  {result.name}: start-up {result.startup_s:.1f} s, window {result.window_img_s:,.0f} "
              f"img/s{epoch}", flush=True)

    def rate(self, key: str) -> float:
        """A variant's sustained rate: its epoch rate where measured, else its window rate."""
        r = self.results[key]
        return r.epoch_img_s or r.window_img_s


# ---------------------------------------------------------------- data preparation


def extract(tarball: Path, folder: Path) -> Path:
    """The tarball's fer2013/ root (train/<class>/*.jpg, test/<class>/*.jpg); reused if present."""
    root = folder / DOMAIN
    if not (root / "train").is_dir():
        with tarfile.open(tarball) as tar:
            tar.extractall(folder, filter="data")
    if not (root / "train").is_dir():
        raise SystemExit(f"{tarball}: expected {DOMAIN}/train/<class>/*.jpg inside")
    return root


def write_config(root: Path, image_size: int, batch_size: int, folder: Path) -> Config:
    """The default config reduced to its fer2013 entry, so prepare and the stream see exactly
    what a one-dataset training run would (same augmentation, shuffle buffer, shard size)."""
    raw = yaml.safe_load(DEFAULT_YAML.read_text())
    (fer,) = [d for d in raw["data"]["domains"] if d["name"] == DOMAIN]
    raw["data"]["domains"] = [{**fer, "root": str(root)}]
    raw["model"]["image_size"] = image_size
    raw["stream"]["batch_size"] = batch_size
    raw["train"]["workers"] = 1  # one consumer here; keeps any batch size valid
    for stage in raw["train"]["stages"]:
        stage["loss_weights"] = {DOMAIN: stage["loss_weights"].get(DOMAIN, 1.0),
                                 "domain": stage["loss_weights"]["domain"]}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_config(path)


# ---------------------------------------------------------------- timing


def record(make: Callable[[], Iterable], count: Callable[[Any], int],
           on_batch: Callable[[Any], None] | None = None, limit: int | None = None) -> Timeline:
    """Iterate a freshly built stream to its end (or `limit` batches), stamping each batch.
    Batches must be materialized when yielded (numpy arrays, eager tensors)."""
    times, sizes = [], []
    started = time.perf_counter()
    for batch in make():
        if on_batch is not None and (limit is None or len(times) < limit):
            on_batch(batch)
        if limit is None or len(times) < limit:
            times.append(time.perf_counter() - started)
            sizes.append(count(batch))
    return Timeline(times, sizes)


def stream_result(name: str, timeline: Timeline, warmup: int, batches: int, ceiling: float | None = None,
                  note: str = "", whole_pass: bool = True) -> Result:
    """whole_pass=False when the timeline is not a full epoch (train step, end to end)."""
    rate, timed = timeline.window(warmup, batches)
    return Result(name, timeline.times[0], rate, timed, timeline.epoch() if whole_pass else None,
                  buffered=ceiling is not None and rate > ceiling, note=note)


# ---------------------------------------------------------------- profile


def profile_decode(store: Store, manifest: dict, config: Config, rows: int = 512) -> dict[str, float]:
    """CPU microseconds per image, one thread, of each part of mdfer.stream.DecodeBatch: says
    whether JPEG decoding, augmentation or Ray's own overhead limits the stream. CPU time,
    not wall time, so other processes on the machine do not inflate it."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    from mdfer.ingest import dataset_key
    from mdfer.stream import DecodeBatch, augment_image, decode_image

    shard = manifest["shards"]["train"][0]["file"]
    table = pq.read_table(store.path(f"{dataset_key(manifest['dataset_id'])}/{shard}"),
                          columns=["image", "domain_index", "label"]).slice(0, rows)
    batch = {k: table.column(k).to_numpy(zero_copy_only=False) for k in table.column_names}
    data = list(batch["image"])
    size, aug = config.model.image_size, config.stream.augment
    rng = np.random.default_rng(0)
    decoded = [decode_image(d, size) for d in data]

    def cpu_us(fn: Callable[[], object]) -> float:
        fn()  # warm caches
        started = time.thread_time()
        fn()
        return (time.thread_time() - started) / len(data) * 1e6

    def jpeg_only() -> None:
        for d in data:
            with Image.open(io.BytesIO(d)) as image:
                image.load()

    def warp_only() -> None:
        for image in decoded:
            image.rotate(5.0, resample=Image.Resampling.BILINEAR, translate=(2.0, 1.0), fillcolor=(0, 0, 0))

    return {
        "JPEG decode only (PIL)": cpu_us(jpeg_only),
        "decode_image: decode + RGB + resize": cpu_us(lambda: [decode_image(d, size) for d in data]),
        "augment_image, default augment": cpu_us(lambda: [augment_image(i, aug, rng) for i in decoded]),
        "  of which the rotate/shift warp": cpu_us(warp_only),
        "augment_image, all-zero augment": cpu_us(lambda: [augment_image(i, ZERO_AUGMENT, rng) for i in decoded]),
        "DecodeBatch, default augment": cpu_us(lambda: DecodeBatch(size, aug)(batch)),
        "DecodeBatch, all-zero augment": cpu_us(lambda: DecodeBatch(size, ZERO_AUGMENT)(batch)),
    }


# ---------------------------------------------------------------- tf.data


def keras_augmenter(aug: AugmentConfig):
    """Keras layers doing the work of mdfer.stream.augment_image (flip, shift, rotation,
    brightness, contrast) on 0..255 float images."""
    import keras
    return keras.Sequential([
        keras.layers.RandomFlip("horizontal"),
        keras.layers.RandomTranslation(aug.max_shift, aug.max_shift, fill_mode="constant"),
        keras.layers.RandomRotation(aug.max_rotation_deg / 360.0, fill_mode="constant"),
        keras.layers.RandomBrightness(aug.brightness, value_range=(0.0, 255.0)),
        keras.layers.RandomContrast(aug.contrast, value_range=(0.0, 255.0)),
    ], name="augment")


def tf_data(train_dir: Path, size: int, batch: int, augment: AugmentConfig | None) -> Timeline:
    """`image_dataset_from_directory` as a Keras user would write it, prefetched; one epoch."""
    import keras
    import tensorflow as tf

    def make():
        ds = keras.utils.image_dataset_from_directory(
            str(train_dir), image_size=(size, size), batch_size=batch, color_mode="rgb",
            shuffle=True, seed=0, verbose=False)
        if augment is not None:
            layers = keras_augmenter(augment)
            ds = ds.map(lambda x, y: (layers(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
        return ds.prefetch(tf.data.AUTOTUNE)

    return record(make, lambda b: int(b[0].shape[0]))


# ---------------------------------------------------------------- training step


def make_step(size: int, batch: int, frozen_fraction: float) -> Callable[[dict[str, np.ndarray]], None]:
    """A train step fed the way train_loop feeds it (uint8 numpy -> float32 -> tf.constant),
    blocking until the step is done."""
    import keras
    import tensorflow as tf

    from mdfer.model import build_model, set_trainable_fraction
    from mdfer.steps import make_train_step

    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = build_model([(DOMAIN, NUM_CLASSES)], size)
    set_trainable_fraction(model, frozen_fraction)
    with strategy.scope():
        optimizer = keras.optimizers.Adam(1e-4)
    step = make_train_step(strategy, model, optimizer, [DOMAIN], {DOMAIN: 2.0, "domain": 0.1}, batch)

    def run(batch_: dict[str, np.ndarray]) -> None:
        feed = dict(batch_, image=batch_["image"].astype(np.float32))
        loss, _ = step({k: tf.constant(v) for k, v in feed.items()})
        float(loss)

    return run


def time_step(step: Callable[[dict[str, np.ndarray]], None], size: int, batch: int,
              warmup: int, steps: int) -> Timeline:
    """The step alone on one fixed batch: what training consumes when data is free."""
    rng = np.random.default_rng(0)
    fixed = {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
             "domain": np.zeros(batch, np.int32),
             "label": rng.integers(0, NUM_CLASSES, batch).astype(np.int32)}
    return record(lambda: (fixed for _ in range(warmup + steps)), lambda b: batch, on_batch=step)


# ---------------------------------------------------------------- Ray Data stream


def quiet_ray_data() -> None:
    """Ray Data logs every execution and draws progress bars; the table must stay readable."""
    import ray.data
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    ctx.verbose_stats_logs = False
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)


def ray_stream(store: Store, manifest: dict, config: Config,
               on_batch: Callable[[dict], None] | None = None, limit: int | None = None) -> tuple[Timeline, str]:
    """One epoch of the training stream exactly as one Ray Train worker iterates it (same
    plan, datasets and shuffle buffer), run to its end so Ray Data shuts down cleanly.
    Also returns how the decode operator split its work (from Ray Data's stats)."""
    from mdfer.stream import iter_train_batches, plan_epoch, train_datasets

    plan = plan_epoch(manifest, config, num_workers=1)
    iterators = {}

    def make():
        datasets = train_datasets(store, manifest, config, plan)
        iterators.update({k: ds.iterator() for k, ds in datasets.items()})
        return iter_train_batches(iterators, plan, config.stream.shuffle_buffer)

    timeline = record(make, lambda b: len(b["image"]), on_batch, limit)
    stats = "".join(it.stats() for it in iterators.values())
    found = re.search(r"MapBatches\(DecodeBatch\): (\d+) tasks executed, (\d+) blocks", stats)
    rows = re.search(r"MapBatches\(DecodeBatch\).*?Output num rows per block: \d+ min, (\d+) max", stats, re.S)
    split = (f"decode: {found[1]} tasks, {found[2]} blocks" + (f" of <= {int(rows[1]):,} rows" if rows else "")
             if found else "")
    return timeline, split


# ---------------------------------------------------------------- report


def print_table(report: Report) -> None:
    s = report.settings
    print()
    print(f"mdfer data throughput: {Path(s['data']).name}, {s['train_rows']:,} train rows after prepare, "
          f"{s['image_size']}x{s['image_size']} RGB, batch {s['batch_size']}, {s['cores']} cores")
    print(f"window = {s['batches']} batches after {s['warmup']} warm-up (train step: {s['train_steps']} "
          f"steps after {s['warmup']}); epoch = one full pass incl. start-up")
    print(f"1-min load average before the run: {s['load_start']:.1f}"
          + ("  (other processes were using the cores: expect noise)" if s["load_start"] > 0.5 * s["cores"] else ""))
    print()
    print(f"{'variant':<44}{'start-up s':>11}{'window img/s':>14}{'epoch img/s':>13}  note")
    print("-" * 120)
    for r in report.results.values():
        window = f"{r.window_img_s:,.0f}{'*' if r.buffered else ' '}"
        epoch = f"{r.epoch_img_s:,.0f}" if r.epoch_img_s else "-"
        print(f"{r.name:<44}{r.startup_s:>11.1f}{window:>14}{epoch:>13}  {r.note}")
    if any(r.buffered for r in report.results.values()):
        print(f"* buffered: faster than DecodeBatch can run on {s['cores']} cores "
              f"({s['decode_ceiling_img_s']:,.0f} img/s), so the window only sliced blocks decoded "
              "during start-up; use the epoch rate")
    print()
    print("ratios (sustained rates: epoch where measured, else window)")
    for name, value in report.ratios.items():
        print(f"  {name:<70}{value:>7.2f}")
    print()
    print("CPU time per image of the stream's decode function, one thread, no Ray")
    for name, us in report.profile_cpu_us.items():
        print(f"  {name:<44}{us:>7.0f} us  = {1e6 / us:>7,.0f} img/s per core")
    print()
    print("phases: " + ", ".join(f"{k} {v:.0f} s" for k, v in report.phases_s.items()))


def add_ratios(report: Report, fastest_step: str | None) -> None:
    r, results = report.rate, report.results
    ratios = {}
    if {"ray_aug", "tf_aug"} <= results.keys():
        ratios["Ray Data stream / tf.data, both augmented"] = r("ray_aug") / r("tf_aug")
    if {"ray_noaug", "tf_plain"} <= results.keys():
        ratios["Ray Data stream / tf.data, no augmentation"] = r("ray_noaug") / r("tf_plain")
    if fastest_step and "ray_aug" in results:
        ratios[f"Ray stream (augmented) / {results[fastest_step].name}  [goal >= 2]"] = \
            r("ray_aug") / r(fastest_step)
        if "tf_aug" in results:
            ratios[f"tf.data (augmented) / {results[fastest_step].name}"] = r("tf_aug") / r(fastest_step)
    if fastest_step and "e2e" in results:
        ratios["end to end / train step alone (1.00 = the stream costs training nothing)"] = \
            results["e2e"].window_img_s / results[fastest_step].window_img_s
        epoch_s = report.settings["train_rows"] / results[fastest_step].window_img_s
        ratios["first-batch wait per epoch / epoch at train-step speed"] = \
            results["e2e"].startup_s / epoch_s
    report.ratios = ratios


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path(DEFAULT_DATA), help="FER2013 Kaggle-layout tarball")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=150, help="batches in each stream's timed window")
    parser.add_argument("--warmup", type=int, default=10, help="untimed batches (and steps) first")
    parser.add_argument("--train-steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--frozen", type=float, nargs="*", default=[0.0, 0.5],
                        help="backbone frozen fractions to time the step at (default: stage 3, stage 1)")
    parser.add_argument("--no-e2e", action="store_true", help="skip the stream-feeds-training run")
    parser.add_argument("--cores", type=int, default=2, help="Ray num_cpus and TensorFlow threads")
    parser.add_argument("--work", type=Path, help="keep extracted data and shards here and reuse them "
                                                   "(default: a temp dir, removed at the end)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size, batch, warmup, batches = args.image_size, args.batch_size, args.warmup, args.batches
    work = args.work or Path(tempfile.mkdtemp(prefix="mdfer-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    ray_started = False
    phase = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal phase
        report.phases_s[name] = time.perf_counter() - phase
        phase = time.perf_counter()

    try:
        print(f"extracting {args.data} and preparing shards in {work} ...", flush=True)
        load_start = os.getloadavg()[0]
        root = extract(args.data, work / "data")
        config = write_config(root, size, batch, work)
        store = Store(str(work / "store"))
        manifest = prepare(config, store)
        report = Report(settings={
            "data": str(args.data), "image_size": size, "batch_size": batch, "batches": batches,
            "warmup": warmup, "train_steps": args.train_steps, "cores": args.cores,
            "train_rows": sum(manifest["counts"][DOMAIN]["train"].values()),
            "augment": dataclasses.asdict(config.stream.augment),
            "shuffle_buffer": config.stream.shuffle_buffer, "load_start": load_start})
        lap("extract + prepare")

        print("profiling the decode function ...", flush=True)
        report.profile_cpu_us = profile_decode(store, manifest, config)
        ceiling = args.cores * 1e6 / report.profile_cpu_us["DecodeBatch, default augment"]
        report.settings["decode_ceiling_img_s"] = ceiling
        lap("profile")

        import tensorflow as tf
        tf.config.threading.set_intra_op_parallelism_threads(args.cores)
        tf.config.threading.set_inter_op_parallelism_threads(args.cores)
        print("tf.data ...", flush=True)
        for key, augment, name in (("tf_plain", None, "tf.data image_dataset_from_directory"),
                                   ("tf_aug", config.stream.augment, "tf.data + Keras augmentation layers")):
            report.add(key, stream_result(name, tf_data(root / "train", size, batch, augment), warmup, batches))
        lap("tf.data")

        print("training step alone ...", flush=True)
        warnings.filterwarnings("ignore", message="You are using a softmax over axis -1")  # 1-dataset domain head
        steps: dict[str, Callable] = {}
        for frozen in args.frozen:
            key = f"step_frozen_{frozen:g}"
            steps[key] = make_step(size, batch, frozen)
            timeline = time_step(steps[key], size, batch, warmup, args.train_steps)
            report.add(key, stream_result(f"train step, {frozen:.0%} of backbone frozen", timeline,
                                          warmup, args.train_steps, note="EfficientNetV2B0, fixed batch",
                                          whole_pass=False))
        fastest = max(steps, key=lambda k: report.results[k].window_img_s) if steps else None
        lap("train step")

        import ray
        ray.init(address="local", num_cpus=args.cores, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.WARNING)
        ray_started = True
        quiet_ray_data()
        lap("ray.init")
        print("Ray Data stream ...", flush=True)
        no_aug = dataclasses.replace(config, stream=dataclasses.replace(config.stream, augment=ZERO_AUGMENT))
        for key, cfg, name in (("ray_aug", config, "Ray Data stream, default augment"),
                               ("ray_noaug", no_aug, "Ray Data stream, augment off (all zero)")):
            timeline, split = ray_stream(store, manifest, cfg)
            report.add(key, stream_result(name, timeline, warmup, batches, ceiling, note=split))
        lap("Ray Data")

        if fastest and not args.no_e2e:
            print("Ray Data stream feeding the training step ...", flush=True)
            timeline, _ = ray_stream(store, manifest, config, on_batch=steps[fastest],
                                     limit=warmup + args.train_steps)
            frozen = float(fastest.removeprefix("step_frozen_"))
            result = stream_result(f"end to end: Ray stream -> step, {frozen:.0%} frozen",
                                   timeline, warmup, args.train_steps,
                                   note="start-up = wait for the first batch + first step",
                                   whole_pass=False)
            report.add("e2e", result)
            lap("end to end")
        ray.shutdown()
        ray_started = False

        add_ratios(report, fastest)
        print_table(report)
        if args.out:
            args.out.write_text(json.dumps({
                "settings": report.settings,
                "results": {k: dataclasses.asdict(v) for k, v in report.results.items()},
                "ratios": report.ratios, "profile_cpu_us_per_image": report.profile_cpu_us,
                "phases_s": report.phases_s}, indent=2) + "\n")
            print(f"wrote {args.out}")
        return 0
    finally:
        if ray_started:
            import ray
            ray.shutdown()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
