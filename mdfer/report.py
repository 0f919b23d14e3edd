"""Pictures people look at: confusion matrices per head and the training curves, as PNG."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mdfer.layout import CURVES_FILE, METRICS_FILE, confusion_file  # noqa: E402
from mdfer.storage import Store  # noqa: E402


def figure_png(figure: "plt.Figure") -> bytes:
    """PNG bytes of a figure, which is closed afterwards (pyplot keeps every open one)."""
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return out.getvalue()


def confusion_png(matrix: list[list[int]], classes: list[str], title: str) -> bytes:
    """Row-normalised colours (recall per class) with the raw counts written in each cell."""
    counts = np.asarray(matrix)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    size = 1.2 + 0.6 * len(classes)
    figure, axis = plt.subplots(figsize=(size + 1.5, size))
    image = axis.imshow(share, cmap="Blues", vmin=0, vmax=1)
    axis.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axis.set_yticks(range(len(classes)), classes)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title)
    for i in range(len(classes)):
        for j in range(len(classes)):
            axis.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                      color="white" if share[i, j] > 0.5 else "black")
    figure.colorbar(image, ax=axis, fraction=0.046, label="share of true class")
    return figure_png(figure)


def curves_png(history: dict) -> bytes:
    """Loss and validation macro-F1 per epoch, stages laid end to end."""
    figure, (loss_axis, f1_axis) = plt.subplots(1, 2, figsize=(11, 4))
    offset = 0
    for name, stage in history["stages"].items():
        epochs = [offset + row["epoch"] for row in stage["history"]]
        loss_axis.plot(epochs, [row["loss"] for row in stage["history"]], marker="o", label=name)
        f1_axis.plot(epochs, [row["val_macro_f1"] for row in stage["history"]], marker="o", label=name)
        offset = max(epochs, default=offset)
    loss_axis.set(title="training loss", xlabel="epoch (all stages)", ylabel="loss")
    f1_axis.set(title="validation macro-F1 (mean over datasets)", xlabel="epoch (all stages)",
                ylabel="macro-F1", ylim=(0, 1))
    for axis in (loss_axis, f1_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    return figure_png(figure)


def write_report(store: Store, prefix: str, result: dict, history: dict | None) -> list[str]:
    """metrics.json plus the PNGs under `prefix`; returns the keys written (metrics.json last)."""
    written = []
    for head, metrics in result["heads"].items():
        classes = list(metrics["per_class"])
        title = f"{head}: accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f} (n={metrics['n']})"
        key = f"{prefix}/{confusion_file(head)}"
        store.write_bytes(key, confusion_png(metrics["confusion"], classes, title))
        written.append(key)
    if history:
        key = f"{prefix}/{CURVES_FILE}"
        store.write_bytes(key, curves_png(history))
        written.append(key)
    store.write_json(f"{prefix}/{METRICS_FILE}", result)
    return written + [f"{prefix}/{METRICS_FILE}"]
