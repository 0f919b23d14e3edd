"""Metrics from confusion matrices agree with scikit-learn's own, summed over shards too."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from mdfer.metrics import batch_confusions, confusion, head_metrics, summarize


def test_head_metrics_match_sklearn_including_absent_classes():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 5, 300)  # class 5 of 6 never appears, class 4 is never predicted
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, 4, 300))
    classes = list("abcdef")
    # summed over three shards, as the workers do
    matrix = sum(confusion(y_true[i::3], y_pred[i::3], 6) for i in range(3))
    got = head_metrics(matrix, classes)
    labels = list(range(6))
    assert np.isclose(got["accuracy"], accuracy_score(y_true, y_pred))
    assert np.isclose(got["macro_f1"], f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    for i, c in enumerate(classes):
        assert np.isclose(got["per_class"][c]["precision"], precision[i])
        assert np.isclose(got["per_class"][c]["recall"], recall[i])
        assert np.isclose(got["per_class"][c]["f1"], f1[i])
        assert got["per_class"][c]["support"] == support[i]


def test_each_head_is_scored_on_its_own_samples_only():
    classes = {"fer": ["x", "y"], "fane": ["p", "q", "r"]}
    domain = np.array([0, 0, 0, 1, 1])
    label = np.array([0, 1, 1, 2, 0])
    probs = {"fer": np.array([[.9, .1], [.2, .8], [.7, .3], [.5, .5], [.5, .5]]),
             "fane": np.array([[1, 0, 0]] * 3 + [[0, 0, 1], [0, 1, 0]], float),
             "domain": np.array([[.9, .1], [.9, .1], [.1, .9], [.1, .9], [.1, .9]])}
    counts = batch_confusions(probs, domain, label, classes)
    assert counts["fer"].sum() == 3 and counts["fane"].sum() == 2
    result = summarize(counts, classes)
    assert np.isclose(result["heads"]["fer"]["accuracy"], 2 / 3)
    assert np.isclose(result["heads"]["fane"]["accuracy"], 1 / 2)
    assert np.isclose(result["domain_accuracy"], 4 / 5)
    assert np.isclose(result["macro_f1"], np.mean([result["heads"]["fer"]["macro_f1"],
                                                   result["heads"]["fane"]["macro_f1"]]))
    # a batch without any sample of a dataset is fine
    empty = batch_confusions({k: v[:3] for k, v in probs.items()}, domain[:3], label[:3], classes)
    assert empty["fane"].sum() == 0
