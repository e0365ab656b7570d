"""SpRAy: Spectral Relevance Analysis (Lapuschkin et al., 2019, "Unmasking Clever Hans predictors
and assessing what machines really learn", Nature Communications 10:1096).

Per class, heatmaps are downsampled and normalised, a k-nearest-neighbour affinity graph is
built, and spectral clustering groups samples whose explanations look alike; the number of
clusters is the largest eigengap of the graph Laplacian. A small, dense cluster with a distinct
heatmap is a candidate Clever-Hans strategy (e.g. all images where the model looks at a stamp).

Up to :data:`EXACT_MAX` samples the affinity is dense and the Laplacian is diagonalised fully
(O(N²) memory, O(N³) time: 2 s at 2,000 samples, 11 s at 4,000 on two cores). Past that, the
graph is the landmark-based one of Chen & Cai (2011, "Large scale spectral clustering with
landmark-based representation", AAAI): each sample is tied to its few nearest of ``p`` k-means
landmarks, ``W = Ẑ Ẑᵀ``, whose eigenvectors are the left singular vectors of the ``N × p`` matrix
``Ẑ``: O(N p D) time and O(N p) memory, linear in N.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

EXACT_MAX = 2000  # samples; the dense method's cost grows as N³ past this (docs/reveal.md)


@dataclass
class SprayResult:
    labels: np.ndarray  # (N,) cluster id per sample
    eigenvalues: np.ndarray  # (max_k + 1,) smallest Laplacian eigenvalues
    k: int
    embedding: np.ndarray  # (N, 2) spectral embedding (for plots)
    method: str = "exact"  # "exact" (dense affinity) or "landmark" (Chen & Cai, 2011)


def prepare_heatmaps(heatmaps: np.ndarray, size: int = 16) -> np.ndarray:
    """``(N, S, S)`` -> ``(N, size*size)``: positive part, sum-pooled, normalised to unit sum."""
    t = torch.from_numpy(np.clip(heatmaps.astype(np.float32), 0, None))[:, None]
    if t.shape[-1] != size:
        t = F.adaptive_avg_pool2d(t, size)
    flat = t.flatten(1).numpy()
    return flat / np.maximum(flat.sum(1, keepdims=True), 1e-12)


def spray(features: np.ndarray, max_k: int = 8, n_neighbors: int = 10, k: int | None = None,
          seed: int = 0, exact_max: int | None = None) -> SprayResult:
    """Cluster ``features (N, D)`` spectrally; ``k`` from the eigengap unless given. Exact up to
    ``exact_max`` samples (default :data:`EXACT_MAX`), landmark-based past it (module docstring)."""
    n = len(features)
    if n < 4:
        return SprayResult(np.zeros(n, int), np.zeros(1), 1, np.zeros((n, 2)))
    if n > (EXACT_MAX if exact_max is None else exact_max):
        return _landmark_spray(np.asarray(features, np.float32), max_k, k, seed)
    return _exact_spray(features, max_k, n_neighbors, k, seed)


def _choose_k(values: np.ndarray, top: int, k: int | None) -> int:
    """The eigengap rule: ``values`` ascending Laplacian eigenvalues (at least ``top + 1``)."""
    gaps = np.diff(values[: top + 1])
    if k:
        chosen = k
    else:  # gaps[j] = lambda_{j+1} - lambda_j; the largest gap after j = 0 gives k = j + 1 >= 2
        chosen = int(np.argmax(gaps[1:]) + 2) if len(gaps) > 1 else 1
    return max(1, min(chosen, top))


def _exact_spray(features: np.ndarray, max_k: int, n_neighbors: int, k: int | None, seed: int) -> SprayResult:
    from scipy.sparse.csgraph import laplacian
    from sklearn.cluster import SpectralClustering
    from sklearn.metrics import pairwise_distances
    from sklearn.neighbors import kneighbors_graph

    n = len(features)
    # Gaussian affinity with a local scale (distance to the k-th neighbour, Zelnik-Manor &
    # Perona, 2004): dense, so the graph is connected, yet adapted to each cluster's spread
    nn = min(n_neighbors, n - 1)
    dist = kneighbors_graph(features, nn, mode="distance", include_self=False).toarray()
    scale = np.maximum(dist.max(1), 1e-12)
    sq = pairwise_distances(features, metric="sqeuclidean")  # (N, N), memory O(N^2) not O(N^2 D)
    affinity = np.exp(-sq / (scale[:, None] * scale[None, :]))
    np.fill_diagonal(affinity, 0.0)
    values, vectors = np.linalg.eigh(laplacian(affinity, normed=True))
    top = min(max_k, n - 1)
    chosen = _choose_k(values, top, k)
    if chosen == 1:
        labels = np.zeros(n, int)
    else:
        labels = SpectralClustering(chosen, affinity="precomputed", random_state=seed).fit_predict(affinity)
    embedding = vectors[:, 1:3] if vectors.shape[1] >= 3 else np.zeros((n, 2))
    return SprayResult(labels, values[: top + 1], chosen, embedding)


LANDMARKS = 1000  # Chen & Cai (2011) used 500-1000 for up to 8 million samples
NEAREST_LANDMARKS = 5


def _landmark_spray(features: np.ndarray, max_k: int, k: int | None, seed: int,
                    landmarks: int = LANDMARKS, nearest: int = NEAREST_LANDMARKS) -> SprayResult:
    """Landmark-based spectral clustering (Chen & Cai, 2011) of ``features (N, D)``.

    ``Z (N, p)``: each row's Gaussian weights on its ``nearest`` landmarks (local scale: the
    distance to the farthest of them), normalised to sum 1; ``Ẑ = Z diag(colsum)^-1/2``. Then
    ``W = Ẑ Ẑᵀ`` has unit degrees, its normalised Laplacian is ``I - W`` with eigenvalues
    ``1 - σ²`` (σ: singular values of Ẑ), and its eigenvectors are ``U = Ẑ V / σ`` from the
    ``p × p`` eigenproblem of ``ẐᵀẐ``. Labels: k-means on the first ``k`` columns of ``U``.
    """
    from scipy.sparse import diags
    from sklearn.cluster import KMeans

    n = len(features)
    rng = np.random.default_rng(seed)
    centres = _kmeans_landmarks(features, min(landmarks, n // 2), rng, seed)
    z = landmark_weights(features, centres, min(nearest, len(centres)))
    colsum = np.asarray(z.sum(0)).ravel()
    z = z[:, colsum > 0] @ diags(1 / np.sqrt(colsum[colsum > 0]))
    sigma2, v = np.linalg.eigh((z.T @ z).toarray().astype(np.float64))
    order = np.argsort(-sigma2)[: max_k + 1]
    sigma2, v = np.clip(sigma2[order], 0, 1), v[:, order]
    values = 1 - sigma2  # ascending Laplacian eigenvalues
    u = np.asarray(z @ v) / np.sqrt(np.maximum(sigma2, 1e-12))
    top = min(max_k, len(values) - 1)
    chosen = _choose_k(values, top, k)
    labels = np.zeros(n, int) if chosen == 1 else \
        KMeans(chosen, n_init=10, random_state=seed).fit_predict(u[:, :chosen])
    embedding = u[:, 1:3] if u.shape[1] >= 3 else np.zeros((n, 2))
    return SprayResult(labels, values[: top + 1], chosen, embedding.astype(np.float32), "landmark")


def _kmeans_landmarks(features: np.ndarray, p: int, rng: np.random.Generator, seed: int) -> np.ndarray:
    """``(p, D)`` k-means centres of a seeded subsample of at most ``20 p`` rows (Chen & Cai's LSC-K)."""
    from sklearn.cluster import KMeans

    sample = features[rng.choice(len(features), min(len(features), 20 * p), replace=False)]
    return KMeans(p, init="random", n_init=1, max_iter=20, random_state=seed).fit(sample).cluster_centers_.astype(np.float32)


def landmark_weights(features: np.ndarray, centres: np.ndarray, nearest: int, chunk: int = 4096):
    """Sparse ``(N, p)`` CSR: each row's Gaussian weights on its ``nearest`` centres (scale: the
    distance to the farthest of them), summing to 1; built ``chunk`` rows at a time."""
    from scipy.sparse import csr_matrix

    n, p = len(features), len(centres)
    cols = np.empty((n, nearest), np.int64)
    weights = np.empty((n, nearest), np.float64)
    c2 = (centres.astype(np.float64) ** 2).sum(1)
    for start in range(0, n, chunk):
        x = features[start:start + chunk].astype(np.float64)
        sq = np.maximum((x ** 2).sum(1)[:, None] - 2 * x @ centres.T.astype(np.float64) + c2[None], 0)
        idx = np.argpartition(sq, nearest - 1, axis=1)[:, :nearest]
        d2 = np.take_along_axis(sq, idx, 1)
        w = np.exp(-d2 / np.maximum(d2.max(1, keepdims=True), 1e-24))
        cols[start:start + chunk], weights[start:start + chunk] = idx, w / w.sum(1, keepdims=True)
    return csr_matrix((weights.ravel(), cols.ravel(), np.arange(0, n * nearest + 1, nearest)), shape=(n, p))
