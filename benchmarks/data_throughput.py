"""Does mdfer's Ray Data training stream keep up with training, and how does it compare with tf.data?

One run, on the real FER2013 JPEGs (same files, image size and batch size for every variant):

1. extract the tarball, write a one-dataset config, `mdfer.ingest.prepare` it into Parquet shards;
2. the mdfer Ray Data stream (`plan_epoch` -> `train_datasets` -> `iter_train_batches`), with the
   default augmentation and with augmentation off;
3. the plain alternative, `keras.utils.image_dataset_from_directory(...).prefetch(AUTOTUNE)`, with
   and without equivalent Keras augmentation layers;
4. what one training step consumes (EfficientNetV2B0, single process, fixed in-memory batch);
5. a per-image cost profile of the stream's decode function on one core, to say what dominates.

Warm-up batches and start-up are excluded from img/s (start-up is reported on its own). The
goal is stream img/s >= 2x train-step img/s: "the stream is never the bottleneck".

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
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
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


@dataclass
class Result:
    """One variant's measurement; img/s counts only the timed batches."""

    name: str
    images_per_s: float
    startup_s: float = 0.0  # build + first batch (streams) or trace + first step (train step)
    timed_batches: int = 0
    timed_images: int = 0
    timed_s: float = 0.0
    note: str = ""


@dataclass
class Report:
    settings: dict[str, Any]
    results: dict[str, Result] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    profile_us: dict[str, float] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, result: Result) -> Result:
        self.results[key] = result
        print(f"  {result.name}: {result.images_per_s:,.0f} img/s "
              f"(start-up {result.startup_s:.1f} s)", flush=True)
        return result


# ---------------------------------------------------------------- data preparation


def extract(tarball: Path, folder: Path) -> Path:
    """The tarball's fer2013/ root (train/<class>/*.jpg, test/<class>/*.jpg)."""
    with tarfile.open(tarball) as tar:
        tar.extractall(folder, filter="data")
    root = folder / DOMAIN
    if not (root / "train").is_dir():
        raise SystemExit(f"{tarball}: expected {DOMAIN}/train/<class>/*.jpg inside")
    return root


def write_config(root: Path, image_size: int, batch_size: int, folder: Path) -> Config:
    """A copy of the default config reduced to its fer2013 entry, so prepare and the stream
    see exactly what a one-dataset training run would."""
    raw = yaml.safe_load(DEFAULT_YAML.read_text())
    (fer,) = [d for d in raw["data"]["domains"] if d["name"] == DOMAIN]
    raw["data"]["domains"] = [{**fer, "root": str(root)}]
    raw["model"]["image_size"] = image_size
    raw["stream"]["batch_size"] = batch_size
    raw["train"]["workers"] = 1  # the benchmark is one consumer; keeps any batch size valid
    for stage in raw["train"]["stages"]:
        stage["loss_weights"] = {DOMAIN: stage["loss_weights"].get(DOMAIN, 1.0),
                                 "domain": stage["loss_weights"]["domain"]}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_config(path)


# ---------------------------------------------------------------- timing


def time_batches(make: Callable[[], Iterable], count: Callable[[Any], int], warmup: int,
                 batches: int, name: str) -> Result:
    """Start-up = build + first batch; the next warm-up batches are untimed; then `batches`
    batches are timed. Each batch must already be materialized when the iterator yields it."""
    started = time.perf_counter()
    iterator: Iterator = iter(make())
    next(iterator)
    startup = time.perf_counter() - started
    for _ in range(max(warmup - 1, 0)):
        next(iterator)
    images = 0
    started = time.perf_counter()
    for _ in range(batches):
        images += count(next(iterator))
    elapsed = time.perf_counter() - started
    close = getattr(iterator, "close", None)
    if close:  # stops the Ray Data executor instead of draining the epoch
        close()
    return Result(name, images / elapsed, startup, batches, images, elapsed)


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
    for name in ("ray", "ray.data", "ray.data._internal"):
        logging.getLogger(name).setLevel(logging.WARNING)


def ray_stream(store: Store, manifest: dict, config: Config, warmup: int, batches: int,
               name: str) -> Result:
    """The training stream exactly as one Ray Train worker iterates it (same shuffle buffer)."""
    from mdfer.stream import iter_train_batches, plan_epoch, train_datasets

    plan = plan_epoch(manifest, config, num_workers=1)
    if warmup + batches > plan.steps_per_epoch:
        raise SystemExit(f"--batches {batches} + warm-up {warmup} exceed one epoch "
                         f"({plan.steps_per_epoch} steps at batch {config.stream.batch_size})")

    def make() -> Iterator[dict[str, np.ndarray]]:
        datasets = train_datasets(store, manifest, config, plan)
        return iter_train_batches({k: ds.iterator() for k, ds in datasets.items()}, plan,
                                  config.stream.shuffle_buffer)

    result = time_batches(make, lambda b: len(b["image"]), warmup, batches, name)
    result.note = f"shuffle buffer {config.stream.shuffle_buffer}, {plan.steps_per_epoch} steps/epoch"
    return result


# ---------------------------------------------------------------- tf.data


def keras_augmenter(aug: AugmentConfig):
    """Keras layers doing the work of mdfer.stream.augment_image (flip, shift, rotation,
    brightness, contrast), on 0..255 float images."""
    import keras
    return keras.Sequential([
        keras.layers.RandomFlip("horizontal"),
        keras.layers.RandomTranslation(aug.max_shift, aug.max_shift, fill_mode="constant"),
        keras.layers.RandomRotation(aug.max_rotation_deg / 360.0, fill_mode="constant"),
        keras.layers.RandomBrightness(aug.brightness, value_range=(0.0, 255.0)),
        keras.layers.RandomContrast(aug.contrast, value_range=(0.0, 255.0)),
    ], name="augment")


def tf_data(train_dir: Path, size: int, batch: int, augment: AugmentConfig | None,
            warmup: int, batches: int, name: str) -> Result:
    """`image_dataset_from_directory` as a Keras user would write it, prefetched."""
    import tensorflow as tf
    import keras

    def make():
        ds = keras.utils.image_dataset_from_directory(
            str(train_dir), image_size=(size, size), batch_size=batch, color_mode="rgb",
            shuffle=True, seed=0, verbose=False)
        if augment is not None:
            layers = keras_augmenter(augment)
            ds = ds.map(lambda x, y: (layers(x, training=True), y),
                        num_parallel_calls=tf.data.AUTOTUNE)
        return ds.prefetch(tf.data.AUTOTUNE)

    return time_batches(make, lambda b: int(b[0].shape[0]), warmup, batches, name)


# ---------------------------------------------------------------- training step


def train_step(size: int, batch: int, frozen_fraction: float, warmup: int, steps: int,
               name: str) -> Result:
    """Images/s one train step consumes on a fixed batch, fed the way train_loop feeds it
    (uint8 numpy -> float32 -> tf.constant), so only the model's own cost is measured."""
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
    rng = np.random.default_rng(0)
    fixed = {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
             "domain": np.zeros(batch, np.int32),
             "label": rng.integers(0, NUM_CLASSES, batch).astype(np.int32)}

    def steps_forever() -> Iterator[int]:
        while True:
            feed = dict(fixed, image=fixed["image"].astype(np.float32))
            loss, _ = step({k: tf.constant(v) for k, v in feed.items()})
            float(loss)  # wait for the step to finish
            yield batch

    result = time_batches(steps_forever, lambda n: n, warmup, steps, name)
    result.note = f"EfficientNetV2B0, {frozen_fraction:.0%} of backbone frozen"
    return result


# ---------------------------------------------------------------- profile


def profile_decode(store: Store, manifest: dict, config: Config, rows: int = 512) -> dict[str, float]:
    """Per-image microseconds, one core, of each part of mdfer.stream.DecodeBatch: tells
    whether PIL decoding, augmentation or Ray's own overhead limits the stream."""
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

    def per_image(fn: Callable[[], object], n: int = len(data)) -> float:
        fn()  # warm caches
        started = time.perf_counter()
        fn()
        return (time.perf_counter() - started) / n * 1e6

    def jpeg_only() -> None:
        for d in data:
            with Image.open(io.BytesIO(d)) as im:
                im.load()

    decoded = [decode_image(d, size) for d in data]
    zero_aug = AugmentConfig(flip=False, max_shift=0.0, max_rotation_deg=0.0, brightness=0.0, contrast=0.0)
    return {
        "jpeg decode only (PIL)": per_image(jpeg_only),
        "decode_image (decode + RGB + resize)": per_image(lambda: [decode_image(d, size) for d in data]),
        "augment_image (default augment)": per_image(lambda: [augment_image(i, aug, rng) for i in decoded]),
        "  of which rotate/shift warp": per_image(lambda: [i.rotate(5.0, resample=Image.Resampling.BILINEAR,
                                                                    translate=(2.0, 1.0), fillcolor=(0, 0, 0))
                                                           for i in decoded]),
        "augment_image (all-zero augment)": per_image(lambda: [augment_image(i, zero_aug, rng) for i in decoded]),
        "DecodeBatch, default augment": per_image(lambda: DecodeBatch(size, aug)(batch)),
        "DecodeBatch, all-zero augment": per_image(lambda: DecodeBatch(size, zero_aug)(batch)),
    }


# ---------------------------------------------------------------- report


def ratio(report: Report, a: str, b: str) -> float | None:
    if a in report.results and b in report.results:
        return report.results[a].images_per_s / report.results[b].images_per_s
    return None


def print_table(report: Report) -> None:
    s = report.settings
    print()
    print(f"mdfer data throughput: {s['data']} ({s['train_rows']} train rows after prepare), "
          f"{s['image_size']}x{s['image_size']} RGB, batch {s['batch_size']}, {s['cores']} cores, "
          f"{s['batches']} timed batches after {s['warmup']} warm-up")
    print()
    print(f"{'variant':<52}{'img/s':>9}{'start-up s':>12}  note")
    print("-" * 110)
    for r in report.results.values():
        print(f"{r.name:<52}{r.images_per_s:>9,.0f}{r.startup_s:>12.1f}  {r.note}")
    print()
    print("ratios")
    for name, value in report.ratios.items():
        print(f"  {name:<62}{value:>6.2f}x")
    if report.profile_us:
        print()
        print("per-image cost of the stream's decode function, one core, no Ray (us/img -> img/s/core)")
        for name, us in report.profile_us.items():
            print(f"  {name:<50}{us:>8.0f} us  {1e6 / us:>8,.0f} img/s")
    print()
    print("phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in report.timings_s.items()))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path(DEFAULT_DATA), help="FER2013 Kaggle-layout tarball")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=150, help="timed batches per stream variant")
    parser.add_argument("--warmup", type=int, default=10, help="untimed batches (and steps) first")
    parser.add_argument("--train-steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--frozen", type=float, nargs="*", default=[0.0, 0.5],
                        help="backbone frozen fractions to time the train step at (stage 3 / stage 1)")
    parser.add_argument("--cores", type=int, default=2, help="Ray num_cpus and TensorFlow threads")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size, batch, warmup, batches = args.image_size, args.batch_size, args.warmup, args.batches
    zero_aug = AugmentConfig(flip=False, max_shift=0.0, max_rotation_deg=0.0, brightness=0.0, contrast=0.0)
    work = Path(tempfile.mkdtemp(prefix="mdfer-bench-"))
    ray_started = False
    try:
        phase = time.perf_counter()
        print(f"extracting {args.data} and preparing shards in {work} ...", flush=True)
        root = extract(args.data, work / "data")
        config = write_config(root, size, batch, work)
        store = Store(str(work / "store"))
        manifest = prepare(config, store)
        train_rows = sum(manifest["counts"][DOMAIN]["train"].values())
        report = Report(settings={
            "data": str(args.data), "image_size": size, "batch_size": batch, "batches": batches,
            "warmup": warmup, "train_steps": args.train_steps, "cores": args.cores,
            "train_rows": train_rows, "augment": dataclasses.asdict(config.stream.augment),
            "shuffle_buffer": config.stream.shuffle_buffer})
        report.timings_s["extract + prepare"] = time.perf_counter() - phase

        phase = time.perf_counter()
        print("profiling the decode function ...", flush=True)
        report.profile_us = profile_decode(store, manifest, config)
        report.timings_s["profile"] = time.perf_counter() - phase

        import ray
        phase = time.perf_counter()
        ray.init(address="local", num_cpus=args.cores, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.WARNING)
        ray_started = True
        quiet_ray_data()
        report.timings_s["ray.init"] = time.perf_counter() - phase
        print("Ray Data stream ...", flush=True)
        phase = time.perf_counter()
        report.add("ray_aug", ray_stream(store, manifest, config, warmup, batches,
                                         "Ray Data stream, default augment"))
        no_aug = dataclasses.replace(config, stream=dataclasses.replace(config.stream, augment=zero_aug))
        report.add("ray_noaug", ray_stream(store, manifest, no_aug, warmup, batches,
                                           "Ray Data stream, augment off (all-zero)"))
        report.timings_s["Ray Data"] = time.perf_counter() - phase
        ray.shutdown()  # free both cores for TensorFlow
        ray_started = False

        import tensorflow as tf
        tf.config.threading.set_intra_op_parallelism_threads(args.cores)
        tf.config.threading.set_inter_op_parallelism_threads(args.cores)
        print("tf.data ...", flush=True)
        phase = time.perf_counter()
        train_dir = root / "train"
        report.add("tf_plain", tf_data(train_dir, size, batch, None, warmup, batches,
                                       "tf.data image_dataset_from_directory"))
        report.add("tf_aug", tf_data(train_dir, size, batch, config.stream.augment, warmup, batches,
                                     "tf.data + Keras augmentation layers"))
        report.timings_s["tf.data"] = time.perf_counter() - phase

        print("training step ...", flush=True)
        phase = time.perf_counter()
        for frozen in args.frozen:
            report.add(f"step_frozen_{frozen:g}",
                       train_step(size, batch, frozen, warmup, args.train_steps,
                                  f"train step, {frozen:.0%} backbone frozen"))
        report.timings_s["train step"] = time.perf_counter() - phase

        report.ratios = {k: v for k, v in {
            "Ray Data stream / tf.data, both augmented": ratio(report, "ray_aug", "tf_aug"),
            "Ray Data stream / tf.data, no augmentation": ratio(report, "ray_noaug", "tf_plain"),
        }.items() if v is not None}
        steps = [k for k in report.results if k.startswith("step_")]
        if steps:
            fastest = max(steps, key=lambda k: report.results[k].images_per_s)
            label = report.results[fastest].name.removeprefix("train step, ")
            report.ratios[f"Ray stream (augmented) / fastest train step ({label}); goal >= 2"] = \
                ratio(report, "ray_aug", fastest)
        print_table(report)
        if args.out:
            args.out.write_text(json.dumps({
                "settings": report.settings,
                "results": {k: dataclasses.asdict(v) for k, v in report.results.items()},
                "ratios": report.ratios, "profile_us_per_image": report.profile_us,
                "timings_s": report.timings_s}, indent=2) + "\n")
            print(f"wrote {args.out}")
        return 0
    finally:
        if ray_started:
            import ray
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
