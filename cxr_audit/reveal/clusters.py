"""Sample clusters of ``reveal``: SpRAy (Lapuschkin et al., 2019, "Unmasking Clever Hans predictors
and assessing what machines really learn", Nature Communications) per explained class on the
heatmaps and on CRP concept-relevance / activation profiles, ranked together by how distinct and
how much of a minority each cluster is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from cxr_audit.reveal.concepts import BLOCK_ROWS
from cxr_audit.reveal.embedding import embed
from cxr_audit.reveal.records import ClusterRecord
from cxr_audit.reveal.spray import SprayResult, spray


@dataclass
class ClassEmbedding:
    """The heatmap space of one explained class: its samples (``ids``, manifest ids), their SpRAy
    clustering, the 2-D embedding ``xy (n, 2)`` by ``method`` and how many of them it ``fitted``
    (the others were placed, :mod:`cxr_audit.reveal.embedding`)."""

    ids: np.ndarray
    spray: SprayResult
    method: str
    xy: np.ndarray
    fitted: int


def cluster_samples(spaces: dict[str, np.ndarray], classes, rows, index, max_k, embedding,
                    step: Callable[[str], None] = lambda status: None,
                    ) -> tuple[list[ClusterRecord], dict[int, ClassEmbedding], dict]:
    """Spectral clusters per explained class in each feature space (``heatmap``, and CRP
    ``relevance:<layer>`` / ``activation:<layer>`` profiles), all ranked together by
    ``distinctness × 4 p (1 - p)``: how different the cluster's mean normalised profile is from
    the rest of its class (half the L1 distance, in [0, 1]) times how much of a minority it is.
    Returns the clusters, the heatmap space of each class (:class:`ClassEmbedding`), and
    ``{space: {class: (members, SprayResult, cluster id per member)}}`` for the ViRelAy project."""
    found: list[tuple[ClusterRecord, int]] = []  # with the SpRAy label of the cluster
    per_class, results = {}, {}
    for space, all_features in spaces.items():
        for k in np.unique(classes):
            members = np.flatnonzero(classes == k)
            if len(members) < 6:
                continue
            features = all_features[members]
            result = spray(features, max_k=max_k)
            results.setdefault(space, {})[int(k)] = (members, result)
            if space == "heatmap":
                xy = embed(features, embedding, strata=result.labels)
                per_class[int(k)] = ClassEmbedding(index[rows[members]], result, embedding, xy.xy, xy.fitted)
            step(f"clusters {space} class {k}")
            for c in range(result.k):
                inside = members[result.labels == c]
                if len(inside) == len(members):
                    continue
                distinct = 0.5 * np.abs(features[result.labels == c].mean(0) - features[result.labels != c].mean(0)).sum()
                share = len(inside) / len(members)
                found.append((ClusterRecord(space, int(k), int(len(inside)), float(share), float(distinct),
                                            float(distinct * 4 * share * (1 - share)),
                                            [int(index[rows[m]]) for m in inside], int(result.k), result.method), c))
    found.sort(key=lambda pair: -pair[0].suspicion)
    ids = {space: {k: np.full(len(m), -1) for k, (m, _) in per.items()} for space, per in results.items()}
    for rank, (cluster, label) in enumerate(found):
        cluster.id = rank
        members, result = results[cluster.space][cluster.class_index]
        ids[cluster.space][cluster.class_index][result.labels == label] = rank
    clustered = {space: {k: (m, r, ids[space][k]) for k, (m, r) in per.items()} for space, per in results.items()}
    return [cluster for cluster, _ in found], per_class, clustered


def profile_features(values: np.ndarray) -> np.ndarray:
    """``(N, C)`` channel relevances or activations -> positive part normalised to unit sum per
    sample, so that clusters reflect *which* concepts a sample uses, not how strongly; float32
    (computed in float64 a block of rows at a time: a 100,000 x 2,048 layer is 0.8 GB, not 1.6)."""
    out = np.empty(values.shape, np.float32)
    for start in range(0, len(values), BLOCK_ROWS):
        pos = np.clip(values[start:start + BLOCK_ROWS].astype(np.float64), 0, None)
        out[start:start + BLOCK_ROWS] = pos / np.maximum(pos.sum(1, keepdims=True), 1e-12)
    return out
