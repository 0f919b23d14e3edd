"""Per-head metrics from confusion matrices; shared by training, Tune and `mdfer evaluate`.

Everything is derived from the confusion matrix, so workers can sum matrices over their
shards of the evaluation set and get exactly the numbers one process would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from sklearn.metrics import confusion_matrix

from mdfer.config import DOMAIN_HEAD


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """[true, predicted] counts over a fixed label set (absent classes keep their row)."""
    if len(y_true) == 0:  # a batch may hold no sample of some dataset
        return np.zeros((num_classes, num_classes), np.int64)
    return confusion_matrix(y_true, y_pred, labels=list(range(num_classes))).astype(np.int64)


def head_metrics(matrix: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, macro-F1 over all classes (a class never predicted nor present counts as 0),
    per-class precision/recall/F1/support, and the matrix itself."""
    matrix = np.asarray(matrix, dtype=np.int64)
    hits = np.diag(matrix).astype(float)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, support, out=np.zeros_like(hits), where=support > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(hits), where=denominator > 0)
    total = int(matrix.sum())
    return {
        "n": total,
        "accuracy": float(hits.sum() / total) if total else 0.0,
        "macro_f1": float(f1.mean()),
        "per_class": {c: {"precision": float(precision[i]), "recall": float(recall[i]),
                          "f1": float(f1[i]), "support": int(support[i])} for i, c in enumerate(classes)},
        "confusion": matrix.tolist(),
    }


def summarize(matrices: dict[str, np.ndarray], classes: dict[str, list[str]]) -> dict:
    """All heads: each dataset head is scored on its own samples only, the domain head on all.
    `macro_f1` (the mean over datasets) is the number model selection follows."""
    names = list(classes)
    heads = {name: head_metrics(matrices[name], classes[name]) for name in names}
    heads[DOMAIN_HEAD] = head_metrics(matrices[DOMAIN_HEAD], names)
    scored = [heads[n]["macro_f1"] for n in names if heads[n]["n"] > 0]
    return {
        "macro_f1": float(np.mean(scored)) if scored else 0.0,
        "domain_accuracy": heads[DOMAIN_HEAD]["accuracy"],
        "heads": heads,
    }


def batch_confusions(probs: dict[str, np.ndarray], domain: np.ndarray, label: np.ndarray,
                     classes: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """Confusion matrices of one batch, ready to be summed over batches and workers."""
    out = {}
    for index, name in enumerate(classes):
        mine = domain == index
        out[name] = confusion(label[mine], np.asarray(probs[name])[mine].argmax(-1), len(classes[name]))
    out[DOMAIN_HEAD] = confusion(domain, np.asarray(probs[DOMAIN_HEAD]).argmax(-1), len(classes))
    return out


def sum_confusions(batches: Iterable[dict[str, np.ndarray]],
                   predict: Callable[[np.ndarray], dict[str, np.ndarray]],
                   classes: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """Confusion matrices of every head summed over `batches` ({"image", "domain", "label"});
    `predict` maps images to per-head probabilities."""
    totals = {name: np.zeros((len(c), len(c)), np.int64) for name, c in classes.items()}
    totals[DOMAIN_HEAD] = np.zeros((len(classes), len(classes)), np.int64)
    for batch in batches:
        counts = batch_confusions(predict(batch["image"]), batch["domain"], batch["label"], classes)
        for name in totals:
            totals[name] += counts[name]
    return totals
