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

import functools
from typing import Callable

import numpy as np

from cxr_audit.errors import UsageError
from cxr_audit.options import choice, typed_options
from cxr_audit.store.h5 import StoredRows

#: rows an estimator CAV (SVM, ridge, logistic) is fitted on at most: past it, an evenly spaced
#: sample of every (label, group) stratum, so memory stays O(FIT_MAX x C). The signal CAV needs
#: only sums and always streams every row.
FIT_MAX = 20000


class CAV:
    name = "cav"
    #: the constructor's options that ``--option KEY=VALUE`` may set (:func:`make_cav`)
    option_types: dict[str, type] = {}

    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> "CAV":
        """Fit on in-memory activations ``X (N, C)``."""
        y, groups = _checked(y, groups)
        X = np.asarray(X, np.float64)
        if groups is not None:
            X = X - _group_means(X, groups)
        return self._set_direction(self._direction(X, y, groups))

    def fit_rows(self, source: StoredRows, rows: np.ndarray, y: np.ndarray,
                 groups: np.ndarray | None = None) -> "CAV":
        """Fit on ``source``'s increasing ``rows`` (``y``, ``groups`` aligned with ``rows``),
        read in blocks: at most :data:`FIT_MAX` of them (stratified) for this estimator."""
        rows = np.asarray(rows, np.int64)
        y, gid = _checked(y, groups)
        keep = _stratified_sample(y, gid, FIT_MAX)
        self.n_fit_ = len(keep)
        return self.fit(source.read(rows[keep]), y[keep], None if groups is None else gid[keep])

    def score(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X, np.float32) @ self.direction_

    def score_rows(self, source: StoredRows) -> np.ndarray:
        """``(N,)`` scores of every row of ``source``, a block at a time."""
        scores = np.empty(len(source), np.float32)
        for positions, block in source.blocks():
            scores[positions] = self.score(block)
        return scores

    def _set_direction(self, w: np.ndarray) -> "CAV":
        norm = np.linalg.norm(w)
        if not np.isfinite(norm) or norm == 0:
            raise UsageError("the CAV is degenerate (zero or non-finite direction); check the activations")
        self.direction_ = (w / norm).astype(np.float32)
        return self

    def _direction(self, X, y, groups):
        raise NotImplementedError


def _checked(y: np.ndarray, groups: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """``y`` as ints and ``groups`` as ids, refusing labels a CAV cannot contrast."""
    y = np.asarray(y).astype(int)
    if y.min() == y.max():
        raise UsageError("a CAV needs both concept (1) and non-concept (0) samples")
    if groups is None:
        return y, None
    groups = group_ids(groups)
    if not has_within_group_contrast(y, groups):
        raise UsageError("no class holds both concept and non-concept samples: a within-class CAV has "
                         "nothing to contrast (fit it across classes)")
    return y, groups


def _stratified_sample(y: np.ndarray, groups: np.ndarray | None, limit: int) -> np.ndarray:
    """Increasing positions of at most ~``limit`` rows, evenly spaced within every (label, group)
    stratum in proportion to its size (at least 2 per stratum); all rows when there are few."""
    if len(y) <= limit:
        return np.arange(len(y))
    strata = group_ids(np.column_stack([y, np.zeros_like(y) if groups is None else groups]))
    keep = []
    for s in np.unique(strata):
        members = np.flatnonzero(strata == s)
        k = min(len(members), max(2, round(limit * len(members) / len(y))))
        keep.append(members[np.linspace(0, len(members) - 1, k).round().astype(int)])
    return np.unique(np.concatenate(keep))


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
    after Haufe et al., 2014). Less distracted by correlated noise than a classifier's weights.

    Within groups, ``w = Σ_g Σ_{i∈g} (x_i − m_g)(y_i − ȳ_g) / N = Σ_g (S_xy,g − S_x,g S_y,g / n_g) / N``
    with per-group sums ``S``: fitted from block sums over every row, in O(groups × C) memory."""

    name = "signal"

    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None) -> "CAV":
        return self.fit_rows(StoredRows(X), np.arange(len(X)), y, groups)

    def fit_rows(self, source: StoredRows, rows: np.ndarray, y: np.ndarray,
                 groups: np.ndarray | None = None) -> "CAV":
        y, gid = _checked(y, groups)
        gid = np.zeros(len(y), np.int64) if gid is None else gid
        sum_x = np.zeros((gid.max() + 1, source.shape[1]))
        sum_xy = np.zeros_like(sum_x)
        for positions, block in source.blocks(np.asarray(rows, np.int64)):
            block = block.astype(np.float64)
            for g in np.unique(gid[positions]):
                at = gid[positions] == g
                sum_x[g] += block[at].sum(0)
                sum_xy[g] += y[positions][at] @ block[at]
        count = np.bincount(gid, minlength=len(sum_x)).astype(np.float64)
        sum_y = np.bincount(gid, weights=y, minlength=len(sum_x))
        self.n_fit_ = len(y)
        return self._set_direction((sum_xy - sum_x * (sum_y / count)[:, None]).sum(0) / len(y))


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
    option_types = {"C": float}

    def __init__(self, C: float = 1.0):
        self.C = C

    def _make(self):
        from sklearn.svm import LinearSVC

        return LinearSVC(C=self.C, class_weight="balanced", max_iter=20000)


class RidgeCAV(_SklearnCAV):
    """Ridge-regression CAV (least squares on the 0/1 label)."""

    name = "ridge"
    option_types = {"alpha": float}

    def __init__(self, alpha: float = 1.0):
        self.alpha = alpha

    def _make(self):
        from sklearn.linear_model import RidgeClassifier

        return RidgeClassifier(alpha=self.alpha, class_weight="balanced")


class LogisticCAV(_SklearnCAV):
    """Logistic-regression CAV."""

    name = "logistic"
    option_types = {"C": float}

    def __init__(self, C: float = 1.0):
        self.C = C

    def _make(self):
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=self.C, class_weight="balanced", max_iter=5000)


CAV_METHODS: dict[str, type[CAV]] = {cls.name: cls for cls in (SignalCAV, SVMCAV, RidgeCAV, LogisticCAV)}


def make_cav(name: str, **options) -> CAV:
    """A fresh estimator ``name`` with its ``options`` (strings from ``--option`` or typed values,
    checked against its ``option_types``)."""
    cls = CAV_METHODS[choice("CAV method", name, CAV_METHODS)]
    return cls(**typed_options(f"--method {name}", cls.option_types, options))


def cav_factory(name: str, options: dict | None = None) -> Callable[[], CAV]:
    """``make_cav`` bound to ``name`` and ``options``, checked now (before any work) rather than
    at the first fit."""
    make_cav(name, **(options or {}))
    return functools.partial(make_cav, name, **(options or {}))
