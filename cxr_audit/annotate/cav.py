"""Concept activation vectors (CAVs): a direction in a layer's activation space for a concept.

Estimators follow scikit-learn: parameters in ``__init__``, ``fit(X, y, groups=None)`` with
``X (N, C)`` activations, ``y (N,)`` 0/1 concept labels and optional ``groups (N,)`` ids, then
``direction_ (C,)`` (unit norm) and ``score(X) -> (N,)`` projections. Register new ones in
:data:`CAV_METHODS`.

With ``groups`` (the samples' classes) the CAV is fitted *within* groups: activations (and, for
the signal CAV, labels) are centred per group first, so only the contrast between concept and
non-concept samples of the same class shapes the direction. A shortcut artifact is by
definition correlated with a class; fitted across classes, its CAV also points along the class's
own evidence (the lesion), and masks painted with it cover the lesion too (measured in
``benchmarks/mitigation.py``). Groups where every sample has the same concept label carry no
contrast and add nothing to the signal CAV.
"""

from __future__ import annotations

import numpy as np

from cxr_audit.errors import UsageError


class CAV:
    name = "cav"

    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> "CAV":
        X, y = np.asarray(X, np.float64), np.asarray(y).astype(int)
        if y.min() == y.max():
            raise UsageError("a CAV needs both concept (1) and non-concept (0) samples")
        if groups is not None:
            groups = group_ids(groups)
            if not has_within_group_contrast(y, groups):
                raise UsageError("no class holds both concept and non-concept samples: a within-class CAV has "
                                 "nothing to contrast (fit it across classes)")
            X = X - _group_means(X, groups)
        w = self._direction(X, y, groups)
        norm = np.linalg.norm(w)
        if not np.isfinite(norm) or norm == 0:
            raise UsageError("the CAV is degenerate (zero or non-finite direction); check the activations")
        self.direction_ = (w / norm).astype(np.float32)
        return self

    def score(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X, np.float32) @ self.direction_

    def _direction(self, X, y, groups):
        raise NotImplementedError


def group_ids(groups: np.ndarray) -> np.ndarray:
    """``(N,)`` ints from group keys ``(N,)`` or ``(N, K)`` (multi-hot rows: one group per combination)."""
    return np.unique(np.asarray(groups), return_inverse=True, axis=0)[1].ravel()


def has_within_group_contrast(y: np.ndarray, groups: np.ndarray) -> bool:
    """Whether some group holds both concept (1) and non-concept (0) samples."""
    ids = group_ids(groups)
    y = np.asarray(y).astype(int)
    return any(np.ptp(y[ids == g]) > 0 for g in np.unique(ids))


def _group_means(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Each row's group mean, same shape as ``values`` ``(N,)`` or ``(N, C)``."""
    sums = np.zeros((groups.max() + 1,) + values.shape[1:])
    np.add.at(sums, groups, values)
    counts = np.bincount(groups).reshape((-1,) + (1,) * (values.ndim - 1))
    return (sums / counts)[groups]


class SignalCAV(CAV):
    """Pattern/signal CAV ``w ∝ cov(X, y)`` (Pahde et al., 2023, "Navigating Neural Space:
    Revisiting Concept Activation Vectors to Overcome Directional Divergence", arXiv:2202.03482;
    after Haufe et al., 2014). Less distracted by correlated noise than a classifier's weights."""

    name = "signal"

    def _direction(self, X, y, groups):
        yc = y - (y.mean() if groups is None else _group_means(y.astype(np.float64), groups))
        return (X - X.mean(0)).T @ yc / len(y)


class _SklearnCAV(CAV):
    def _make(self):
        raise NotImplementedError

    def _direction(self, X, y, groups):
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
