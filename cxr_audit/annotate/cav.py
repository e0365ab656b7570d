"""Concept activation vectors (CAVs): a direction in a layer's activation space for a concept.

Estimators follow scikit-learn: parameters in ``__init__``, ``fit(X, y)`` with ``X (N, C)``
activations and ``y (N,)`` 0/1 concept labels, then ``direction_ (C,)`` (unit norm) and
``score(X) -> (N,)`` projections. Register new ones in :data:`CAV_METHODS`.
"""

from __future__ import annotations

import numpy as np

from cxr_audit.errors import UsageError


class CAV:
    name = "cav"

    def fit(self, X: np.ndarray, y: np.ndarray) -> "CAV":
        X, y = np.asarray(X, np.float64), np.asarray(y).astype(int)
        if y.min() == y.max():
            raise UsageError("a CAV needs both concept (1) and non-concept (0) samples")
        w = self._direction(X, y)
        norm = np.linalg.norm(w)
        if not np.isfinite(norm) or norm == 0:
            raise UsageError("the CAV is degenerate (zero or non-finite direction); check the activations")
        self.direction_ = (w / norm).astype(np.float32)
        return self

    def score(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X, np.float32) @ self.direction_

    def _direction(self, X, y):
        raise NotImplementedError


class SignalCAV(CAV):
    """Pattern/signal CAV ``w ∝ cov(X, y)`` (Pahde et al., 2023, "Navigating Neural Space:
    Revisiting Concept Activation Vectors to Overcome Directional Divergence", arXiv:2202.03482;
    after Haufe et al., 2014). Less distracted by correlated noise than a classifier's weights."""

    name = "signal"

    def _direction(self, X, y):
        yc = y - y.mean()
        return (X - X.mean(0)).T @ yc / len(y)


class _SklearnCAV(CAV):
    def _make(self):
        raise NotImplementedError

    def _direction(self, X, y):
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler().fit(X)
        est = self._make().fit(scaler.transform(X), y)
        # back to the raw activation space the scores are computed in
        return np.ravel(est.coef_) / np.where(scaler.scale_ > 0, scaler.scale_, 1.0)


class SVMCAV(_SklearnCAV):
    """Linear SVM CAV (Kim et al., 2018, "Interpretability Beyond Feature Attribution: TCAV", ICML)."""

    name = "svm"

    def __init__(self, C: float = 1.0):
        self.C = C

    def _make(self):
        from sklearn.svm import LinearSVC

        return LinearSVC(C=self.C, class_weight="balanced", max_iter=20000)


class RidgeCAV(_SklearnCAV):
    """Ridge-regression CAV (least squares on the 0/1 label)."""

    name = "ridge"

    def __init__(self, alpha: float = 1.0):
        self.alpha = alpha

    def _make(self):
        from sklearn.linear_model import RidgeClassifier

        return RidgeClassifier(alpha=self.alpha, class_weight="balanced")


class LogisticCAV(_SklearnCAV):
    """Logistic-regression CAV."""

    name = "logistic"

    def __init__(self, C: float = 1.0):
        self.C = C

    def _make(self):
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=self.C, class_weight="balanced", max_iter=5000)


CAV_METHODS: dict[str, type[CAV]] = {cls.name: cls for cls in (SignalCAV, SVMCAV, RidgeCAV, LogisticCAV)}


def make_cav(name: str) -> CAV:
    if name not in CAV_METHODS:
        raise UsageError(f"unknown CAV method '{name}' (choose from: {', '.join(CAV_METHODS)})")
    return CAV_METHODS[name]()
