"""Classification metrics and the significance test, as pure NumPy functions.

``scores`` are probabilities: softmax rows for binary / multiclass tasks,
per-label sigmoids for multilabel tasks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

LABEL_KINDS = ("binary", "multiclass", "multilabel")


def accuracy(labels: np.ndarray, scores: np.ndarray, label_kind: str) -> float:
    """Top-1 accuracy; for multilabel, the mean per-label accuracy at threshold 0.5 (MedMNIST's ACC)."""
    if label_kind == "multilabel":
        return float(((scores > 0.5) == (labels > 0.5)).mean())
    return float((scores.argmax(axis=1) == labels).mean())


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank (scipy's ``rankdata``; kept in NumPy so that a
    node's evaluation process does not import SciPy)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    return (last - (counts - 1) / 2)[inverse.reshape(-1)]


def binary_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) identity; ties count one half. NaN if one class is absent."""
    positive = labels.astype(bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = average_ranks(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc(labels: np.ndarray, scores: np.ndarray, label_kind: str) -> float:
    """Binary AUC; one-vs-rest macro mean for multiclass; per-label mean for multilabel.

    Classes (or labels) absent from ``labels`` are skipped, as scikit-learn does.
    """
    if label_kind == "binary":
        return binary_auc(labels == 1, scores[:, 1])
    if label_kind == "multiclass":
        columns = [binary_auc(labels == c, scores[:, c]) for c in range(scores.shape[1])]
    elif label_kind == "multilabel":
        columns = [binary_auc(labels[:, j] > 0.5, scores[:, j]) for j in range(scores.shape[1])]
    else:
        raise ValueError(f"label kind '{label_kind}': unknown, choose one of {LABEL_KINDS}")
    finite = [value for value in columns if np.isfinite(value)]
    return float(np.mean(finite)) if finite else float("nan")


def paired_p_value(after: Sequence[float], before: Sequence[float]) -> float | None:
    """Two-sided paired t-test over tasks; None when it cannot be computed (< 2 tasks, no variance)."""
    if len(after) != len(before) or len(after) < 2:
        return None
    diffs = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    if np.allclose(diffs, diffs[0]):
        return None
    from scipy import stats  # the server needs it once per stage; nodes never do

    return float(stats.ttest_rel(after, before).pvalue)
