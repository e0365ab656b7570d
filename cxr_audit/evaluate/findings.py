"""Per-finding metrics for multi-label models (one sigmoid output per finding, e.g. 14 CXR findings).

A shortcut in multi-label data is tied to one finding, so every figure is per finding:
``findings[NAME] = {"auroc", "accuracy", "prevalence"}`` on the clean test, and with an inserted
artifact that points to finding ``T``: the artifact is drawn on every test image negative for ``T``
and each finding's AUROC and accuracy (at 0.5) are measured again on the test set with those
images replaced (``artifact_inserted_auroc``, ``artifact_inserted_auroc_drop``, and the same for
accuracy). A model that uses the artifact for ``T`` loses AUROC on ``T`` only. Macro figures are
NaN-aware means over the findings.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def finding_auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """AUROC of one finding; NaN when the test set holds only one of positives/negatives."""
    positive = np.asarray(positive).astype(bool)
    if positive.all() or not positive.any():
        return float("nan")
    return float(roc_auc_score(positive, scores))


def per_finding(probs: np.ndarray, labels: np.ndarray, names: list[str]) -> dict[str, dict[str, float]]:
    """``probs``/``labels`` ``(N, K)`` (sigmoid outputs, multi-hot) -> metrics per finding name."""
    out = {}
    for k, name in enumerate(names):
        positive = labels[:, k] > 0.5
        out[name] = {"auroc": finding_auroc(probs[:, k], positive),
                     "accuracy": float(((probs[:, k] > 0.5) == positive).mean()) if len(positive) else float("nan"),
                     "prevalence": float(positive.mean()) if len(positive) else float("nan")}
    return out


def with_inserted(findings: dict[str, dict], probs: np.ndarray, inserted_probs: np.ndarray, rows: np.ndarray,
                  labels: np.ndarray, names: list[str]) -> None:
    """Add the artifact-inserted figures to ``findings`` in place; ``inserted_probs (len(rows), K)``
    are the model's outputs for the test rows ``rows`` with the artifact drawn in."""
    attacked = probs.copy()
    attacked[rows] = inserted_probs
    for name, figures in per_finding(attacked, labels, names).items():
        findings[name]["artifact_inserted_auroc"] = figures["auroc"]
        findings[name]["artifact_inserted_auroc_drop"] = findings[name]["auroc"] - figures["auroc"]
        findings[name]["artifact_inserted_accuracy"] = figures["accuracy"]
        findings[name]["artifact_inserted_drop"] = findings[name]["accuracy"] - figures["accuracy"]


def macro(findings: dict[str, dict], key: str) -> float:
    values = [f[key] for f in findings.values() if key in f and not np.isnan(f[key])]
    return float(np.mean(values)) if values else float("nan")
