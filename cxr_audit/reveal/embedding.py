"""2-D embeddings of one class's explanations for the scatter plot and the ViRelAy export.

t-SNE (van der Maaten & Hinton, 2008) and UMAP (McInnes et al., 2018, arXiv:1802.03426) cost
O(N log N) at best and minutes past a few thousand points on two cores, and a plot of more points
shows nothing more. So at most :data:`FIT_MAX` samples are embedded, drawn stratified by SpRAy
cluster (every cluster keeps at least :data:`MIN_PER_STRATUM` points, so a small artifact cluster
is not lost), and every other sample is placed at the distance-weighted mean position of its
:data:`PLACE_NEIGHBOURS` nearest embedded samples in feature space.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

FIT_MAX = 2000
MIN_PER_STRATUM = 50
PLACE_NEIGHBOURS = 5


@dataclass
class Embedding:
    xy: np.ndarray  # (N, 2) float32
    fitted: int  # samples the method itself embedded; the rest were placed by nearest neighbours


def _tsne(features: np.ndarray) -> np.ndarray:
    """2-D t-SNE of ``(N, D)`` features; all-equal features (e.g. a class whose heatmaps are all
    zero) give zeros: sklearn's PCA initialisation turns them into NaN, which crashes the
    Barnes-Hut tree in native code instead of raising."""
    from sklearn.manifold import TSNE

    if len(features) < 4 or len(np.unique(features.round(12), axis=0)) < 4:
        return np.zeros((len(features), 2), np.float32)
    perplexity = max(2.0, min(30.0, (len(features) - 1) / 3))
    return TSNE(2, perplexity=perplexity, init="pca", random_state=0).fit_transform(features).astype(np.float32)


def _umap(features: np.ndarray) -> np.ndarray:
    """2-D UMAP of ``(N, D)`` features; degenerate inputs give zeros, as for t-SNE."""
    if len(features) < 6 or len(np.unique(features.round(12), axis=0)) < 6:
        return np.zeros((len(features), 2), np.float32)
    import umap  # slow to import (numba): only when asked for

    neighbours = int(min(15, len(features) - 1))
    return umap.UMAP(n_components=2, n_neighbors=neighbours, random_state=0, n_jobs=1).fit_transform(features).astype(np.float32)


EMBEDDINGS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"tsne": _tsne, "umap": _umap}


def stratified_sample(strata: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """Sorted row indices, about ``size`` of them, each stratum (``strata (N,)``) in proportion
    to its share but with at least ``MIN_PER_STRATUM`` rows (or all it has)."""
    rng = np.random.default_rng(seed)
    picks = []
    for s in np.unique(strata):
        rows = np.flatnonzero(strata == s)
        take = min(len(rows), max(MIN_PER_STRATUM, round(size * len(rows) / len(strata))))
        picks.append(rng.choice(rows, take, replace=False))
    return np.sort(np.concatenate(picks))


def embed(features: np.ndarray, method: str, strata: np.ndarray | None = None, fit_max: int | None = None,
          seed: int = 0) -> Embedding:
    """Embed ``features (N, D)`` with ``method`` (a key of :data:`EMBEDDINGS`), fitting at most
    about ``fit_max`` (default :data:`FIT_MAX`) samples (module docstring)."""
    n = len(features)
    fit_max = fit_max or FIT_MAX
    if n <= fit_max:
        return Embedding(EMBEDDINGS[method](features), n)
    fit = stratified_sample(np.zeros(n, int) if strata is None else strata, fit_max, seed)
    xy = np.empty((n, 2), np.float32)
    xy[fit] = EMBEDDINGS[method](features[fit])
    rest = np.setdiff1d(np.arange(n), fit)
    xy[rest] = place_by_neighbours(features[fit], xy[fit], features[rest])
    return Embedding(xy, len(fit))


def place_by_neighbours(reference: np.ndarray, reference_xy: np.ndarray, queries: np.ndarray,
                        neighbours: int = PLACE_NEIGHBOURS) -> np.ndarray:
    """``(M, 2)``: each query at the inverse-distance-weighted mean of its nearest references' positions."""
    from sklearn.neighbors import NearestNeighbors

    k = min(neighbours, len(reference))
    dist, idx = NearestNeighbors(n_neighbors=k).fit(reference).kneighbors(queries)
    w = 1 / np.maximum(dist, 1e-12)
    w /= w.sum(1, keepdims=True)
    return (reference_xy[idx] * w[..., None]).sum(1).astype(np.float32)
