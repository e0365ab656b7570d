"""Thresholds of 1-D samples shared by reveal (alarm cut) and annotate (artifact labels, masks)."""

from __future__ import annotations

import numpy as np


def otsu_threshold(values: np.ndarray, bins: int = 128) -> float:
    """Otsu's threshold (Otsu, 1979) of a 1-D sample: maximises the between-class variance."""
    values = np.asarray(values, np.float64).ravel()
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return hi
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = (w0 * w1 * (mean0 - mean1) ** 2)[:-1]
    if len(between) == 0:
        return lo
    # any cut inside an empty gap is optimal: take the middle of the plateau of maxima
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    return float(edges[1:][int(round(best.mean()))])
