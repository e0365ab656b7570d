"""How good an annotation is, when ground truth exists."""

from __future__ import annotations

import numpy as np


def retrieval_quality(scores: np.ndarray, truth: np.ndarray) -> dict:
    """AUROC and average precision of ``scores`` for binary ``truth`` (NaN when one class is absent)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    truth = np.asarray(truth).astype(int)
    if truth.min() == truth.max():
        return {"auroc": float("nan"), "ap": float("nan"), "n": int(len(truth))}
    return {"auroc": float(roc_auc_score(truth, scores)), "ap": float(average_precision_score(truth, scores)),
            "n": int(len(truth)), "positives": int(truth.sum())}


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    union = np.logical_or(pred, truth).sum()
    return float(np.logical_and(pred, truth).sum() / union) if union else float("nan")


def pointing_hit(heatmap: np.ndarray, truth: np.ndarray) -> bool:
    """Pointing game (Zhang et al., 2018): is the heatmap's maximum inside the true region?"""
    return bool(truth.ravel()[int(np.argmax(heatmap))])
