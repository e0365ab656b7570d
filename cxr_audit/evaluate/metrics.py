"""Plain NumPy metrics for ``evaluate`` and ``gate``; every function is ``arrays in -> numbers out``."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(pred) == np.asarray(labels)).mean()) if len(labels) else float("nan")


def auroc(probs: np.ndarray, labels: np.ndarray) -> float:
    """``probs (N, K)`` softmax outputs: AUROC of class 1 for K = 2, macro one-vs-rest otherwise;
    NaN when a class is missing from ``labels``."""
    labels = np.asarray(labels)
    if len(np.unique(labels)) < probs.shape[1] or probs.shape[1] < 2:
        return float("nan")
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    return float(roc_auc_score(labels, probs, multi_class="ovr"))


def group_accuracy(pred: np.ndarray, labels: np.ndarray, groups: list[str]) -> dict[str, float]:
    """Accuracy per group name (e.g. ``"H1|covid"``)."""
    groups = np.asarray(groups)
    return {g: accuracy(pred[groups == g], labels[groups == g]) for g in sorted(set(groups.tolist()))}


def activation_precision(heatmaps: np.ndarray, masks: np.ndarray, top: float = 0.05) -> np.ndarray:
    """Share of each heatmap's top-``top`` pixels (by positive relevance) inside the mask
    (Activation Precision, Barnett et al., 2021, "A case-based interpretable deep learning model
    for classification of mass lesions in digital mammography", Nature Machine Intelligence).
    ``heatmaps``/``masks`` ``(N, H, W)`` -> ``(N,)``."""
    flat = np.clip(heatmaps.reshape(len(heatmaps), -1), 0, None)
    inside = masks.reshape(len(masks), -1) > 0.5
    k = max(1, int(round(top * flat.shape[1])))
    top_idx = np.argpartition(-flat, k - 1, axis=1)[:, :k]
    return np.take_along_axis(inside, top_idx, axis=1).mean(1)


def balanced_two_source(sources: np.ndarray, first: str, second: str, rng: np.random.Generator) -> np.ndarray:
    """Row indices of a Test-50-50 set: equally many samples from each source (Gautam et al., 2022)."""
    a, b = np.flatnonzero(sources == first), np.flatnonzero(sources == second)
    n = min(len(a), len(b))
    return np.sort(np.concatenate([rng.choice(a, n, replace=False), rng.choice(b, n, replace=False)]))
