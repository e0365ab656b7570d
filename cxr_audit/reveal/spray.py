"""SpRAy: Spectral Relevance Analysis (Lapuschkin et al., 2019, "Unmasking Clever Hans predictors
and assessing what machines really learn", Nature Communications 10:1096).

Per class, heatmaps are downsampled and normalised, a k-nearest-neighbour affinity graph is
built, and spectral clustering groups samples whose explanations look alike; the number of
clusters is the largest eigengap of the graph Laplacian. A small, dense cluster with a distinct
heatmap is a candidate Clever-Hans strategy (e.g. all images where the model looks at a stamp).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class SprayResult:
    labels: np.ndarray  # (N,) cluster id per sample
    eigenvalues: np.ndarray  # (max_k + 1,) smallest Laplacian eigenvalues
    k: int
    embedding: np.ndarray  # (N, 2) spectral embedding (for plots)


def prepare_heatmaps(heatmaps: np.ndarray, size: int = 16) -> np.ndarray:
    """``(N, S, S)`` -> ``(N, size*size)``: positive part, sum-pooled, normalised to unit sum."""
    t = torch.from_numpy(np.clip(heatmaps.astype(np.float32), 0, None))[:, None]
    if t.shape[-1] != size:
        t = F.adaptive_avg_pool2d(t, size)
    flat = t.flatten(1).numpy()
    return flat / np.maximum(flat.sum(1, keepdims=True), 1e-12)


def spray(features: np.ndarray, max_k: int = 8, n_neighbors: int = 10, k: int | None = None,
          seed: int = 0) -> SprayResult:
    """Cluster ``features (N, D)`` spectrally; ``k`` from the eigengap unless given."""
    from scipy.sparse.csgraph import laplacian
    from sklearn.cluster import SpectralClustering
    from sklearn.metrics import pairwise_distances
    from sklearn.neighbors import kneighbors_graph

    n = len(features)
    if n < 4:
        return SprayResult(np.zeros(n, int), np.zeros(1), 1, np.zeros((n, 2)))
    # Gaussian affinity with a local scale (distance to the k-th neighbour, Zelnik-Manor &
    # Perona, 2004): dense, so the graph is connected, yet adapted to each cluster's spread
    nn = min(n_neighbors, n - 1)
    dist = kneighbors_graph(features, nn, mode="distance", include_self=False).toarray()
    scale = np.maximum(dist.max(1), 1e-12)
    sq = pairwise_distances(features, metric="sqeuclidean")  # (N, N), memory O(N^2) not O(N^2 D)
    affinity = np.exp(-sq / (scale[:, None] * scale[None, :]))
    np.fill_diagonal(affinity, 0.0)
    lap = laplacian(affinity, normed=True)
    values, vectors = np.linalg.eigh(lap)
    top = min(max_k, n - 1)
    gaps = np.diff(values[: top + 1])
    if k:
        chosen = k
    else:  # gaps[j] = lambda_{j+1} - lambda_j; the largest gap after j = 0 gives k = j + 1 >= 2
        chosen = int(np.argmax(gaps[1:]) + 2) if len(gaps) > 1 else 1
    chosen = max(1, min(chosen, top))
    if chosen == 1:
        labels = np.zeros(n, int)
    else:
        labels = SpectralClustering(chosen, affinity="precomputed", random_state=seed).fit_predict(affinity)
    embedding = vectors[:, 1:3] if vectors.shape[1] >= 3 else np.zeros((n, 2))
    return SprayResult(labels, values[: top + 1], chosen, embedding)
