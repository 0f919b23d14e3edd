"""Batch-1 latency, size and macro-F1 of an export's models, side by side, in one run.

    python benchmarks/export_latency.py --store STORE --run-id RUN [--images 300] [--threads 1]

Measures the Keras model and the float32, optimized (dynamic-range) and int8 TFLite files of
`<store>/runs/<run>/export/` on the same test images of the run's dataset, one image at a time
(the way a camera loop on the Pi calls them), after a warm-up. Prints the ratios against the
float32 TFLite. Goal (issue 5): int8 >= 2x faster than float32 at <= 30% of its size, with
macro-F1 within 1 point.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from mdfer.export import head_scores, split_images
from mdfer.layout import EXPORT_DIR, KERAS_FILE, TFLITE_FLOAT32, TFLITE_INT8, TFLITE_OPTIMIZED, source_prefix
from mdfer.ingest import load_manifest
from mdfer.predict import open_model
from mdfer.storage import Store

MODELS = (KERAS_FILE, TFLITE_FLOAT32, TFLITE_OPTIMIZED, TFLITE_INT8)
WARMUP = 20


def measure(path: str, images: np.ndarray, threads: int) -> tuple[list[float], dict[str, np.ndarray]]:
    runner = open_model(path, num_threads=threads) if path.endswith(".tflite") else open_model(path)
    for image in images[:WARMUP]:
        runner(image[None])
    seconds, outputs = [], []
    for image in images:
        start = time.perf_counter()
        outputs.append(runner(image[None]))
        seconds.append(time.perf_counter() - start)
    return seconds, {name: np.concatenate([o[name] for o in outputs]) for name in outputs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--run-id")
    parser.add_argument("--sweep-id")
    parser.add_argument("--images", type=int, default=300, help="test images (batch 1 each)")
    parser.add_argument("--threads", type=int, default=1, help="TFLite interpreter threads")
    args = parser.parse_args()

    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    store = Store(args.store)
    prefix = source_prefix(args.run_id, args.sweep_id)
    manifest = store.read_json(f"{prefix}/{EXPORT_DIR}/manifest.json")
    folder = Path(store.path(f"{prefix}/{EXPORT_DIR}"))  # a local store; fetch an s3 export first
    dataset = load_manifest(store, manifest["dataset_id"])
    classes = {name: domain["classes"] for name, domain in dataset["domains"].items()}
    images, domain, label = split_images(store, dataset, "test", manifest["image_size"], args.images)
    images = images.astype(np.float32)

    rows = {}
    for name in MODELS:
        seconds, probs = measure(str(folder / name), images, args.threads)
        rows[name] = {"ms": 1000 * statistics.median(seconds), "p90": 1000 * float(np.percentile(seconds, 90)),
                      "mb": manifest["files"][name]["size"] / 1e6,
                      "f1": head_scores(probs, domain, label, classes)["macro_f1"]}
    base = rows[TFLITE_FLOAT32]
    print(f"{len(images)} test images, batch 1, {args.threads} thread(s), image {manifest['image_size']} px")
    print(f"{'model':<40} {'median ms':>10} {'p90 ms':>8} {'MB':>7} {'macro-F1':>9} "
          f"{'speed vs f32':>13} {'size vs f32':>12} {'F1 - f32':>9}")
    for name, row in rows.items():
        print(f"{name:<40} {row['ms']:>10.2f} {row['p90']:>8.2f} {row['mb']:>7.2f} {row['f1']:>9.4f} "
              f"{base['ms'] / row['ms']:>12.2f}x {row['mb'] / base['mb']:>11.0%} {row['f1'] - base['f1']:>+9.4f}")
    int8 = rows[TFLITE_INT8]
    print(f"goal int8: >= 2x faster ({base['ms'] / int8['ms']:.2f}x), <= 30% size "
          f"({int8['mb'] / base['mb']:.0%}), macro-F1 within 0.01 ({int8['f1'] - base['f1']:+.4f})")


if __name__ == "__main__":
    main()
