"""Does mdfer's Ray Data training stream keep up with training, and how does it compare with tf.data?

One run, on the same JPEGs, image size and batch size for every variant:

1. generate FER-like faces (`mdfer.synth`), or take FER2013 from --data (its tarball or folder),
   write a one-dataset config, `mdfer.ingest.prepare` it into Parquet shards;
2. profile the stream's batch functions on one core (CPU time per image: decode vs augment);
3. the plain alternative, `keras.utils.image_dataset_from_directory(...).prefetch(AUTOTUNE)`, with
   and without Keras augmentation layers doing the same kind of work;
4. what one training step consumes (EfficientNetV2B0, one process, fixed in-memory batch);
5. the mdfer Ray Data stream (`plan_epoch` -> `train_datasets` -> `iter_train_batches`), with the
   default augmentation and with augmentation off; `train_datasets` decodes every image once and
   materializes it (once per training stage), so that build is timed on its own, apart from epochs;
6. end to end: a second epoch of the Ray stream feeding the training step, as a Ray Train worker
   does.

Every stream runs one full epoch and records when each batch arrives, which gives two rates:
"window" (--batches batches after --warmup, start-up excluded) and "epoch" (all images / wall time
from starting the pass to its last batch, start-up included). Only the epoch rate is a production
rate when a stream emits large blocks prepared before its first batch, because the window then
just slices memory; windows faster than the per-epoch batch function can possibly run on all
cores are marked "buffered". Goal: stream >= 2x what the training step consumes.

    python benchmarks/data_throughput.py --out /tmp/data_throughput.json
    python benchmarks/data_throughput.py --data fer2013.tar.gz
"""

from __future__ import annotations

import harness  # first: it quiets TensorFlow before anything imports it

import argparse
import dataclasses
import logging
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mdfer.config import AugmentConfig, Config, load_config
from mdfer.dataset import DatasetManifest
from mdfer.ingest import prepare
from mdfer.storage import Store

DOMAIN = harness.FER
GENERATED_PER_CLASS = 2000  # enough train rows after the val carve for a 150-batch window at batch 64
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
    startup_s: float  # to the first batch of a pass; trace + first step (train step); build time
    window_img_s: float | None  # None: no batches (the one-time build)
    window_batches: int = 0
    epoch_img_s: float | None = None  # whole pass incl. start-up; None for the train step
    buffered: bool = False  # window faster than the decode ceiling: it drained a buffer
    note: str = ""


class Report(harness.Report):
    def add(self, key: str, result: Result) -> None:
        self.results[key] = result
        window = f", window {result.window_img_s:,.0f} img/s" if result.window_img_s else ""
        epoch = f", epoch {result.epoch_img_s:,.0f} img/s" if result.epoch_img_s else ""
        print(f"  {result.name}: start-up {result.startup_s:.1f} s{window}{epoch}", flush=True)

    def rate(self, key: str) -> float:
        """A variant's sustained rate: its epoch rate where measured, else its window rate."""
        r = self.results[key]
        return r.epoch_img_s or r.window_img_s


# ---------------------------------------------------------------- config


def write_config(root: str, image_size: int, batch_size: int, folder: Path) -> Config:
    """The default config reduced to its fer2013 entry, so prepare and the stream see exactly
    what a one-dataset training run would (same augmentation, shuffle buffer, shard size)."""
    raw = harness.reduced_config(harness.DEFAULT_YAML, {DOMAIN: root})
    raw["model"]["image_size"] = image_size
    raw["stream"]["batch_size"] = batch_size
    raw["train"]["workers"] = 1  # one consumer here; keeps any batch size valid
    return load_config(harness.write_config(raw, folder / "config.yaml"))


# ---------------------------------------------------------------- timing


def record(make: Callable[[], Iterable], count: Callable[[Any], int],
           on_batch: Callable[[Any], None] | None = None, limit: int | None = None) -> Timeline:
    """Iterate a freshly built stream to its end, stamping (and handing to `on_batch`) the first
    `limit` batches; the rest are drained so Ray Data finishes its execution cleanly. Batches
    must be materialized when yielded (numpy arrays, eager tensors)."""
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


def profile_decode(store: Store, manifest: DatasetManifest, config: Config, rows: int = 512) -> dict[str, float]:
    """CPU microseconds per image, one thread, of the stream's batch functions and their parts:
    says whether JPEG decoding, augmentation or Ray's own overhead limits the stream. CPU time,
    not wall time, so other processes on the machine do not inflate it."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    from mdfer.images import AugmentBatch, DecodeBatch, augment_image, decode_image

    table = pq.read_table(store.path(manifest.shard_keys("train")[0]),
                          columns=["image", "domain_index", "label"]).slice(0, rows)
    batch = {k: table.column(k).to_numpy(zero_copy_only=False) for k in table.column_names}
    size, aug = config.model.image_size, config.stream.augment
    decoded = DecodeBatch(size)(batch)
    pixels = list(decoded["image"])
    rng = np.random.default_rng(0)

    def cpu_us(fn: Callable[[], object]) -> float:
        fn()  # warm caches
        started = time.thread_time()
        fn()
        return (time.thread_time() - started) / len(pixels) * 1e6

    def jpeg_only() -> None:
        for data in batch["image"]:
            with Image.open(io.BytesIO(data)) as image:
                image.load()

    def warp_only() -> None:
        for p in pixels:
            Image.fromarray(p).rotate(5.0, resample=Image.Resampling.BILINEAR, translate=(2.0, 1.0),
                                      fillcolor=(0, 0, 0))

    return {
        "DecodeBatch (once per stage)": cpu_us(lambda: DecodeBatch(size)(batch)),
        "  JPEG decode only (PIL)": cpu_us(jpeg_only),
        "  decode_image: decode + RGB + resize": cpu_us(lambda: [decode_image(d, size) for d in batch["image"]]),
        "AugmentBatch, default augment (every epoch)": cpu_us(lambda: AugmentBatch(aug)(decoded)),
        "  augment_image, default augment": cpu_us(lambda: [augment_image(p, aug, rng) for p in pixels]),
        "    of which the rotate/shift warp": cpu_us(warp_only),
        "AugmentBatch, all-zero augment": cpu_us(lambda: AugmentBatch(ZERO_AUGMENT)(decoded)),
    }


# ---------------------------------------------------------------- tf.data


def keras_augmenter(aug: AugmentConfig):
    """Keras layers doing the work of mdfer.images.augment_image (flip, shift, rotation,
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


def time_step(step: Callable[[dict[str, np.ndarray]], float], size: int, batch: int,
              warmup: int, steps: int) -> Timeline:
    """The step alone on one fixed batch: what training consumes when data is free."""
    rng = np.random.default_rng(0)
    fixed = {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
             "domain": np.zeros(batch, np.int32),
             "label": rng.integers(0, 7, batch).astype(np.int32)}  # FER2013's 7 classes
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


class RayStream:
    """The training stream exactly as a one-worker stage uses it: `train_datasets` once (it
    decodes and materializes), then one `iter_train_batches` pass per epoch with the config's
    shuffle buffer. Epochs run to their end so Ray Data shuts each execution down cleanly."""

    def __init__(self, store: Store, manifest: DatasetManifest, config: Config):
        from mdfer.stream import plan_epoch, train_datasets

        self.config = config
        self.plan = plan_epoch(manifest, config, num_workers=1)
        started = time.perf_counter()
        self.datasets = train_datasets(store, manifest, config, self.plan)
        self.build_s = time.perf_counter() - started
        self.rows = sum(self.plan.rows_per_epoch(d) for d in self.plan.domains)
        self.iterators: dict[str, Any] = {}

    def epoch(self, on_batch: Callable[[dict], None] | None = None, limit: int | None = None) -> Timeline:
        from mdfer.stream import iter_train_batches

        def make():
            self.iterators = {k: ds.iterator() for k, ds in self.datasets.items()}
            return iter_train_batches(self.iterators, self.plan, self.config.stream.shuffle_buffer)

        return record(make, lambda b: len(b["image"]), on_batch, limit)

    def block_split(self) -> str:
        """How the last epoch's augment operator split its work, from Ray Data's stats."""
        stats = "".join(it.stats() for it in self.iterators.values())
        notes, largest = [], 0
        for op in ("DecodeBatch", "AugmentBatch"):
            found = re.search(rf"MapBatches\({op}\): (\d+) tasks executed", stats)
            rows = re.search(rf"MapBatches\({op}\): \d+ tasks.*?rows per block: \d+ min, (\d+) max", stats, re.S)
            if found:
                notes.append(f"{op} {found[1]} task(s)")
                largest = max(largest, int(rows[1]) if rows else 0)
        return ", ".join(notes) + (f"; blocks up to {largest:,} rows" if largest else "")


# ---------------------------------------------------------------- report


COLUMNS = (harness.Column("variant", 46, "<"), harness.Column("start-up s", 10),
           harness.Column("window img/s", 14), harness.Column("epoch img/s", 13), harness.Column("  note", 0, "<"))


def print_table(report: Report) -> None:
    s = report.settings
    print()
    print(f"mdfer data throughput: {s['data']}, {s['train_rows']:,} train rows after prepare, "
          f"{s['image_size']}x{s['image_size']} RGB, batch {s['batch_size']}, {s['cores']} cores")
    print(f"window = {s['batches']} batches after {s['warmup']} warm-up (train step: {s['train_steps']} "
          f"steps after {s['warmup']}); epoch = one full pass incl. start-up")
    print(harness.load_line(s["load_start"], s["cores"]))
    print()
    harness.print_table(COLUMNS, ([
        r.name, f"{r.startup_s:.1f}",
        f"{r.window_img_s:,.0f}{'*' if r.buffered else ' '}" if r.window_img_s else "- ",
        f"{r.epoch_img_s:,.0f}" if r.epoch_img_s else "-", f"  {r.note}"] for r in report.results.values()))
    if any(r.buffered for r in report.results.values()):
        print(f"* buffered: faster than AugmentBatch can run on {s['cores']} cores "
              f"({s['augment_ceiling_img_s']:,.0f} img/s), so the window only sliced blocks augmented "
              "before the first batch came out; the epoch rate is the real one")
    print()
    report.print_ratios("ratios of sustained rates (epoch where measured, else window)", 78)
    print()
    print("CPU time per image of the stream's batch functions, one thread, no Ray")
    for name, us in report.sections["profile_cpu_us_per_image"].items():
        print(f"  {name:<46}{us:>7.0f} us  = {1e6 / us:>7,.0f} img/s per core")
    print()
    report.print_phases()


def add_ratios(report: Report, fastest_step: str | None) -> None:
    r, results, ratios = report.rate, report.results, {}
    if {"ray_aug", "tf_aug"} <= results.keys():
        ratios["Ray Data stream / tf.data, both augmented, per epoch"] = r("ray_aug") / r("tf_aug")
    if {"ray_build", "ray_aug", "tf_aug"} <= results.keys():
        rows = report.settings["train_rows"]
        first = rows / (rows / r("ray_aug") + results["ray_build"].startup_s)
        ratios["  same, a stage's first epoch (incl. the one-time decode)"] = first / r("tf_aug")
    if {"ray_noaug", "tf_plain"} <= results.keys():
        ratios["Ray Data stream / tf.data, no augmentation, per epoch"] = r("ray_noaug") / r("tf_plain")
    if fastest_step:
        step = results[fastest_step]
        for key, name in (("ray_aug", "Ray Data stream"), ("tf_aug", "tf.data")):
            if key in results:
                goal = "  [goal >= 2]" if key == "ray_aug" else ""
                ratios[f"{name} (augmented) / {step.name}{goal}"] = r(key) / step.window_img_s
        if "e2e" in results:
            ratios["end to end / train step alone (1.00: the stream costs training nothing)"] = \
                results["e2e"].window_img_s / step.window_img_s
            epoch_s = report.settings["train_rows"] / step.window_img_s
            ratios["first-batch wait per epoch / one epoch at train-step speed"] = results["e2e"].startup_s / epoch_s
    report.ratios = ratios


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = harness.parser(__doc__)
    parser.add_argument("--data", type=Path, help="FER2013: its Kaggle-layout tarball (fer2013/train/<class>/*.jpg "
                        "inside) or that folder; default: generated FER-like faces")
    parser.add_argument("--per-class", type=int, help=f"train images per class: generated (default "
                        f"{GENERATED_PER_CLASS}), or taken from --data (default: all)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=150, help="batches in each stream's timed window")
    parser.add_argument("--warmup", type=int, default=10, help="untimed batches (and steps) first")
    parser.add_argument("--train-steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--frozen", type=float, nargs="*", default=[0.0, 0.5],
                        help="backbone frozen fractions to time the step at (default: stage 3, stage 1)")
    parser.add_argument("--no-e2e", action="store_true", help="skip the stream-feeds-training run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size, batch, warmup, batches = args.image_size, args.batch_size, args.warmup, args.batches
    per_class = args.per_class or (None if args.data else GENERATED_PER_CLASS)
    phases = harness.Phases()
    ray_started = False
    with harness.work_folder(args.work, "mdfer-bench-") as work:
        try:
            source = f"{args.data.name}{f', {per_class}/class' if per_class else ''}" if args.data \
                else f"generated FER-like, {per_class}/class"
            print(f"{source}: preparing shards in {work} ...", flush=True)
            roots = harness.dataset_roots(args.data, work / "data", per_class, fane=False)
            config = write_config(roots[DOMAIN], size, batch, work)
            store = Store(str(work / "store"))
            manifest = prepare(config, store)
            phases.lap("data + prepare")
            load_start = harness.wait_for_quiet(args.max_load, args.max_wait)
            phases.lap("waiting for load")
            report = Report(settings={
                "data": source, "image_size": size, "batch_size": batch, "batches": batches,
                "warmup": warmup, "train_steps": args.train_steps, "cores": args.cores,
                "train_rows": manifest.split_sizes("train")[DOMAIN],
                "augment": dataclasses.asdict(config.stream.augment),
                "shuffle_buffer": config.stream.shuffle_buffer, "load_start": load_start},
                phases_s=phases.seconds)

            print("profiling the decode function ...", flush=True)
            ceiling = None
            report.sections["profile_cpu_us_per_image"] = {}
            try:
                profile = report.sections["profile_cpu_us_per_image"] = profile_decode(store, manifest, config)
                ceiling = args.cores * 1e6 / profile["AugmentBatch, default augment (every epoch)"]
                report.settings["augment_ceiling_img_s"] = ceiling
            except Exception as exc:  # mdfer.stream is being reworked: keep the measurements
                print(f"  profile skipped: {type(exc).__name__}: {exc}", flush=True)
            phases.lap("profile")

            from mdfer.train_loop import limit_threads
            limit_threads(args.cores)  # before TensorFlow starts its thread pools
            print("tf.data ...", flush=True)
            for key, augment, name in (("tf_plain", None, "tf.data image_dataset_from_directory"),
                                       ("tf_aug", config.stream.augment, "tf.data + Keras augmentation layers")):
                timeline = tf_data(Path(roots[DOMAIN]) / "train", size, batch, augment)
                report.add(key, stream_result(name, timeline, warmup, batches))
            phases.lap("tf.data")

            print("training step alone ...", flush=True)
            warnings.filterwarnings("ignore", message="You are using a softmax over axis -1")  # 1-dataset domain head
            steps: dict[str, Callable] = {}
            for frozen in args.frozen:
                key = f"step_frozen_{frozen:g}"
                steps[key] = harness.plain_train_step(config, manifest, batch, stage_index=-1, frozen_fraction=frozen)
                timeline = time_step(steps[key], size, batch, warmup, args.train_steps)
                report.add(key, stream_result(f"train step, {frozen:.0%} of backbone frozen", timeline,
                                              warmup, args.train_steps, note="EfficientNetV2B0, fixed batch",
                                              whole_pass=False))
            fastest = max(steps, key=lambda k: report.results[k].window_img_s) if steps else None
            phases.lap("train step")

            import ray
            ray.init(address="local", num_cpus=args.cores, include_dashboard=False,
                     log_to_driver=False, logging_level=logging.WARNING)
            ray_started = True
            quiet_ray_data()
            phases.lap("ray.init")
            print("Ray Data stream ...", flush=True)
            no_aug = dataclasses.replace(config, stream=dataclasses.replace(config.stream, augment=ZERO_AUGMENT))
            stream = RayStream(store, manifest, config)
            report.add("ray_build", Result("Ray Data build: decode + materialize", stream.build_s, None,
                                           epoch_img_s=stream.rows / stream.build_s,
                                           note="train_datasets(): once per stage"))
            report.add("ray_aug", stream_result("Ray Data stream, default augment", stream.epoch(), warmup,
                                                batches, ceiling, note=stream.block_split()))
            unaugmented = RayStream(store, manifest, no_aug)
            report.add("ray_noaug", stream_result("Ray Data stream, augment off (all zero)", unaugmented.epoch(),
                                                  warmup, batches, ceiling, note=unaugmented.block_split()))
            del unaugmented  # frees its materialized images
            phases.lap("Ray Data")

            if fastest and not args.no_e2e:
                print("Ray Data stream feeding the training step (the stream's 2nd epoch) ...", flush=True)
                timeline = stream.epoch(on_batch=steps[fastest], limit=warmup + args.train_steps)
                frozen = float(fastest.removeprefix("step_frozen_"))
                result = stream_result(f"end to end: Ray stream -> step, {frozen:.0%} frozen",
                                       timeline, warmup, args.train_steps,
                                       note="first steps of epoch 2; start-up = first batch + first step",
                                       whole_pass=False)
                report.add("e2e", result)
                phases.lap("end to end")
            del stream
            ray.shutdown()
            ray_started = False
        finally:
            if ray_started:
                import ray
                ray.shutdown()

    add_ratios(report, fastest)
    print_table(report)
    report.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
