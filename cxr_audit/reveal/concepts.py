"""Concept (channel) suspicion: which concepts the model uses for a *subset* of one class.

A concept a model uses for the real signal is on for (nearly) every sample of its class; a
shortcut concept is on for the samples that carry the artifact and off for the rest of the same
class. So, per class and channel, we split the distribution of the channel's max-pooled
activation over that class's samples in two (Otsu, 1979) and measure how far the low group is
from the high one, weighted by how much of the class's relevance the channel carries:

    suspicion(c, k) = contrast_k(c) * minority(c, k) * importance_k(c)
    contrast_k(c)   = 1 - mean(low group) / mean(high group)     (1: the concept is off for part of k)
    importance_k(c) = mean positive relevance of c on class k / max over all classes and channels

``minority`` = 4 p (1 - p) with p the fraction of the class above the split (1 for a 50/50
split, 0 when everything is on one side). The members of a concept are the class samples above
the split. ``eta`` (the split's between-group share of the variance above a normal
distribution's) is reported, and :func:`bimodality_z` tests the split against a unimodal null for
the alarm. The concept-space view of Pahde et al. (2025) is added as ``outlier``: local outlier
factor of the channel in the space of cosine similarities of relevance profiles.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cxr_audit.numerics.threshold import otsu_threshold


@dataclass
class ConceptStatistics:
    """What the ranking measures of one (layer, channel, class); shared by the finding and by
    ``reveal``'s record of it (:class:`cxr_audit.reveal.records.ConceptRecord`)."""

    layer: str
    channel: int
    class_index: int
    suspicion: float
    contrast: float
    eta: float
    minority: float
    importance: float
    outlier: float
    bimodality_z: float = 0.0
    source_association: dict = field(default_factory=dict)
    source_cramers_v: float | None = None  # membership vs source within the class (None: < 2 sources)
    source_p_value: float | None = None
    label_p_value: float | None = None  # membership vs class: is the split tied to the label?


@dataclass
class ConceptFinding(ConceptStatistics):
    member_rows: list[int] = field(default_factory=list)  # scan rows above the split (positions in the arrays)


GAUSSIAN_ETA = 2 / np.pi  # share of variance the best two-way split explains for a normal distribution


def _otsu_split(values: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, float]:
    """``(threshold, low group, high group, between-group variance / total variance)`` of the
    Otsu split of ``values (n,)``; the ratio is 0 when the values are constant or one group is empty."""
    var = values.var()
    if var <= 1e-12:
        return (float(values.max()) if len(values) else 0.0), values[:0], values[:0], 0.0
    cut = otsu_threshold(values)
    lo, hi = values[values <= cut], values[values > cut]
    if len(lo) == 0 or len(hi) == 0:
        return cut, lo, hi, 0.0
    return cut, lo, hi, len(lo) * len(hi) / len(values) ** 2 * (lo.mean() - hi.mean()) ** 2 / var


def split_quality(values: np.ndarray) -> tuple[float, float, float]:
    """``(eta, contrast, threshold)`` of the best two-way split of ``values`` (see module doc)."""
    cut, lo, hi, ratio = _otsu_split(np.asarray(values, np.float64))
    if ratio == 0.0:
        return 0.0, 0.0, cut
    eta = max(0.0, (ratio - GAUSSIAN_ETA) / (1 - GAUSSIAN_ETA))
    contrast = float(np.clip(1 - lo.mean() / hi.mean(), 0, 1)) if hi.mean() > 0 else 0.0
    return float(eta), contrast, cut


def critical_bandwidth(values: np.ndarray, bins: int = 512) -> float:
    """Smallest bandwidth at which the Gaussian kernel density estimate of ``values (n,)`` has a
    single mode (Silverman, 1981, J. R. Stat. Soc. B 43:97); computed on a ``bins`` histogram."""
    counts, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2

    def modes(h: float) -> int:
        density = np.exp(-0.5 * ((centres[:, None] - centres[None, :]) / h) ** 2) @ counts
        slope = np.sign(np.diff(density))
        slope = slope[slope != 0]
        return int(np.sum((slope[:-1] > 0) & (slope[1:] < 0)))

    lo, hi = (edges[1] - edges[0]) / 2, max(float(np.ptp(values)), 1e-12)
    while modes(hi) > 1:
        hi *= 2
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if modes(mid) > 1 else (lo, mid)
    return hi


def bimodality_z(values: np.ndarray, draws: int = 200, seed: int = 0, max_n: int = 5000) -> float:
    """z-score of the best two-way split of ``values (n,)`` (Otsu's between-group variance ratio)
    against a unimodal null built from the data itself: smoothed-bootstrap draws from its kernel
    density at the critical bandwidth, the smoothest estimate that is still unimodal (Silverman,
    1981; variance-corrected as in Efron & Tibshirani, 1993, ch. 16). The null keeps the data's
    skew and tails, so a skewed or heavy-tailed single group scores near 0 and two separated
    groups score high. At most ``max_n`` values (a seeded subsample) are used."""
    values = np.asarray(values, np.float64)
    if len(values) < 8 or values.var() <= 1e-12:
        return 0.0
    rng = np.random.default_rng(seed)
    if len(values) > max_n:
        values = rng.choice(values, max_n, replace=False)
    x = (values - values.mean()) / values.std()
    h = critical_bandwidth(x)
    observed = _otsu_split(x)[3]
    null = (x[rng.integers(0, len(x), (draws, len(x)))] + h * rng.standard_normal((draws, len(x)))) / np.sqrt(1 + h * h)
    ratios = np.array([_otsu_split(row)[3] for row in null])
    return float((observed - ratios.mean()) / max(ratios.std(), 1e-6))


def alarm_level(n_tests: int, alpha: float = 0.05) -> float:
    """One-sided Bonferroni critical z for ``n_tests`` tests at family-wise level ``alpha``."""
    from scipy.stats import norm

    return float(norm.isf(alpha / max(n_tests, 1)))


BLOCK_ROWS = 8192  # samples per block in the per-channel sums: memory O(block x C), not O(N x C)


def concept_outliers(relevance: np.ndarray, n_neighbors: int = 20) -> np.ndarray:
    """LOF score per channel (higher = more outlying) from cosine similarity of relevance profiles
    (a channel's profile: its relevance over the samples, ``relevance (N, C)``). The cosine
    distances come from the ``C x C`` Gram matrix summed over blocks of samples, so memory does not
    grow with N."""
    from sklearn.neighbors import LocalOutlierFactor

    c = relevance.shape[1]
    if c <= 3:
        return np.zeros(c)
    gram = np.zeros((c, c))
    for start in range(0, len(relevance), BLOCK_ROWS):
        block = relevance[start:start + BLOCK_ROWS].astype(np.float64)
        gram += block.T @ block
    norms = np.maximum(np.sqrt(np.clip(np.diag(gram), 0, None)), 1e-12)
    distance = np.clip(1 - gram / norms[:, None] / norms[None, :], 0, 2)
    np.fill_diagonal(distance, 0)
    lof = LocalOutlierFactor(n_neighbors=min(n_neighbors, c - 1), metric="precomputed")
    lof.fit(distance)
    return -lof.negative_outlier_factor_


def positive_mean(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``(C,)`` mean of ``max(values[rows], 0)`` over ``rows``, a block of rows at a time."""
    total = np.zeros(values.shape[1])
    for start in range(0, len(rows), BLOCK_ROWS):
        total += np.clip(values[rows[start:start + BLOCK_ROWS]], 0, None).sum(0, dtype=np.float64)
    return total / max(len(rows), 1)


def rank_concepts(layer: str, activations: np.ndarray, relevance: np.ndarray, classes: np.ndarray,
                  sources: np.ndarray | None = None, top: int = 20) -> list[ConceptFinding]:
    """Rank the channels of one layer by suspicion (see module docstring); ``activations`` and
    ``relevance`` are ``(N, C)``, ``classes (N,)`` the explained class of each row."""
    outlier = concept_outliers(relevance)
    # importance is relative to the most relevant (class, channel) pair, so that a class whose
    # channels carry only noise-level relevance cannot produce high scores
    pos_rel_of = {k: positive_mean(relevance, np.flatnonzero(classes == k)) for k in np.unique(classes)}
    global_max = max(v.max() for v in pos_rel_of.values())
    findings: list[ConceptFinding] = []
    for k in np.unique(classes):
        rows = np.flatnonzero(classes == k)
        if len(rows) < 8:
            continue
        pos_rel = pos_rel_of[k]
        importance = pos_rel / max(global_max, 1e-12)
        for c in np.argsort(-importance)[: max(top * 3, 30)]:
            eta, contrast, cut = split_quality(activations[rows, c])
            above = rows[activations[rows, c] > cut]
            p = len(above) / len(rows)
            minority = 4 * p * (1 - p)
            findings.append(ConceptFinding(layer, int(c), int(k), float(contrast * minority * importance[c]),
                                           contrast, eta, minority, float(importance[c]), float(outlier[c]),
                                           member_rows=above.tolist(),
                                           source_association=_source_association(above, rows, sources)))
    findings.sort(key=lambda f: -f.suspicion)
    findings = findings[:top]
    for f in findings:  # the tests are costlier than the score: only for the findings kept
        f.bimodality_z = bimodality_z(activations[classes == f.class_index, f.channel], seed=f.channel)
        f.label_p_value = label_link(activations[:, f.channel], np.asarray(f.member_rows, int), classes, f.class_index)
        link = source_link(np.asarray(f.member_rows, int), np.flatnonzero(classes == f.class_index), sources)
        if link is not None:
            f.source_cramers_v, f.source_p_value = link
    return findings


def label_link(values: np.ndarray, members: np.ndarray, classes: np.ndarray, k: int) -> float | None:
    """One-sided chi-square p-value (Pearson, 1900) that the concept is on as often outside class
    ``k`` as inside it: rows of class ``k`` above the split (``members``) vs rows of the other classes at
    or above the weakest member's activation. A shortcut is tied to the label; a concept that
    splits every class alike (anatomy's own variation) is not. ``None`` with a single class or
    no members."""
    from scipy.stats import chi2_contingency

    inside = classes == k
    if inside.all() or len(members) == 0:
        return None
    on = values >= values[members].min()
    table = np.array([[np.sum(on & inside), np.sum(~on & inside)], [np.sum(on & ~inside), np.sum(~on & ~inside)]])
    if (table.sum(0) == 0).any():
        return None
    if table[0, 0] / table[0].sum() <= table[1, 0] / table[1].sum():
        return 1.0  # one-sided: a marker *for* class k is on more often inside it than outside
    return float(chi2_contingency(table, correction=False)[1])


def source_link(members: np.ndarray, rows: np.ndarray, sources: np.ndarray | None) -> tuple[float, float] | None:
    """``(Cramér's V, chi-square p-value)`` of concept membership vs source among a class's
    ``rows``: a concept that is on for one hospital's images and off for the other's *within the
    same class* is a site marker (Cramér, 1946). ``None`` with fewer than two sources or when
    every row (or none) is a member."""
    from scipy.stats import chi2_contingency

    if sources is None:
        return None
    src = sources[rows]
    names = sorted(set(src))
    member = np.isin(rows, members)
    if len(names) < 2 or member.all() or not member.any():
        return None
    table = np.array([[np.sum(member & (src == s)), np.sum(~member & (src == s))] for s in names])
    chi2, p, _, _ = chi2_contingency(table, correction=False)
    return float(np.sqrt(chi2 / len(rows))), float(p)  # V for an r x 2 table: min(r, 2) - 1 = 1


def _source_association(members: np.ndarray, rows: np.ndarray, sources: np.ndarray | None) -> dict:
    """Share of each source among a concept's members vs among the whole class."""
    if sources is None or len(set(sources[rows])) < 2:
        return {}
    out = {}
    for s in sorted(set(sources[rows])):
        out[str(s)] = {"members": float(np.mean(sources[members] == s)) if len(members) else 0.0,
                       "class": float(np.mean(sources[rows] == s))}
    return out
