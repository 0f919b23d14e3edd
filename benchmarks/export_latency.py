"""Batch-1 latency, size and macro-F1 of an export's models, side by side, in one run.

    python benchmarks/export_latency.py --store STORE --run-id RUN [--images 300] [--threads 1]

Measures every format of `<store>/runs/<run>/export/` that takes camera pixels (mdfer.formats:
the Keras model, the float32, optimized (dynamic-range) and int8 TFLite files, ONNX) on the same
test images of the run's dataset, one image at a time (the way a camera loop on the Pi calls
them), each through its own runner, after a warm-up. Prints the ratios against the
float32 TFLite. Goal (issue 5): int8 >= 2x faster than float32 at <= 30% of its size, with
macro-F1 within 1 point.
"""

from __future__ import annotations

import harness  # first: it quiets TensorFlow before anything imports it

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np

from mdfer.dataset import read_manifest, split_images
from mdfer.export import head_scores
from mdfer.formats import FORMATS, Format
from mdfer.layout import EXPORT_DIR, TFLITE_FLOAT32, TFLITE_INT8, source_prefix
from mdfer.storage import Store

MODELS = tuple(f for f in FORMATS if not f.normalized_input)  # the Hailo TFLite is the compiler's input
WARMUP = 20
COLUMNS = (harness.Column("model", 41, "<"), harness.Column("median ms", 10), harness.Column("p90 ms", 9),
           harness.Column("MB", 8), harness.Column("macro-F1", 10), harness.Column("speed vs f32", 14),
           harness.Column("size vs f32", 13), harness.Column("F1 - f32", 10))


def measure(fmt: Format, folder: Path, images: np.ndarray, threads: int) -> tuple[list[float], dict[str, np.ndarray]]:
    runner = fmt.open(folder, threads)
    for image in images[:WARMUP]:
        runner(image[None])
    seconds, outputs = [], []
    for image in images:
        start = time.perf_counter()
        outputs.append(runner(image[None]))
        seconds.append(time.perf_counter() - start)
    return seconds, {name: np.concatenate([o[name] for o in outputs]) for name in outputs[0]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = harness.parser(__doc__, work=False)
    parser.add_argument("--store", required=True)
    parser.add_argument("--run-id")
    parser.add_argument("--sweep-id")
    parser.add_argument("--images", type=int, default=300, help="test images (batch 1 each)")
    parser.add_argument("--threads", type=int, default=1, help="TFLite interpreter and ONNX Runtime threads")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    store = Store(args.store)
    prefix = source_prefix(args.run_id, args.sweep_id)
    manifest = store.read_json(f"{prefix}/{EXPORT_DIR}/manifest.json")
    folder = Path(store.path(f"{prefix}/{EXPORT_DIR}"))  # a local store; fetch an s3 export first
    dataset = read_manifest(store, manifest["dataset_id"])
    classes = dataset.classes()
    images, domain, label = split_images(store, dataset, "test", manifest["image_size"], args.images)
    images = images.astype(np.float32)

    report = harness.Report(settings={
        "store": args.store, "source": prefix, "images": len(images), "threads": args.threads,
        "image_size": manifest["image_size"], "load_start": harness.wait_for_quiet(args.max_load, args.max_wait)})
    for fmt in MODELS:
        seconds, probs = measure(fmt, folder, images, args.threads)
        report.results[fmt.file] = {"ms": 1000 * statistics.median(seconds),
                                    "p90": 1000 * float(np.percentile(seconds, 90)),
                                    "mb": manifest["files"][fmt.file]["size"] / 1e6,
                                    "f1": head_scores(probs, domain, label, classes)["macro_f1"]}
    base, int8 = report.results[TFLITE_FLOAT32], report.results[TFLITE_INT8]
    report.ratios = {"int8 speed / float32  [goal >= 2]": base["ms"] / int8["ms"],
                     "int8 size / float32  [goal <= 0.30]": int8["mb"] / base["mb"],
                     "int8 macro-F1 - float32, in points  [goal >= -1]": 100 * (int8["f1"] - base["f1"])}
    print(f"{len(images)} test images, batch 1, {args.threads} thread(s), image {manifest['image_size']} px; "
          + harness.load_line(report.settings["load_start"], os.cpu_count()))
    harness.print_table(COLUMNS, ([
        name, f"{row['ms']:.2f}", f"{row['p90']:.2f}", f"{row['mb']:.2f}", f"{row['f1']:.4f}",
        f"{base['ms'] / row['ms']:.2f}x", f"{row['mb'] / base['mb']:.0%}", f"{row['f1'] - base['f1']:+.4f}"]
        for name, row in report.results.items()))
    report.print_ratios("goal, int8 against float32", 44)
    report.write(args.out)


if __name__ == "__main__":
    main()
