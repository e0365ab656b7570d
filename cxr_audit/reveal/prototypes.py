"""Audit a prototype model's prototypes (ProtoPNet; Chen et al., 2019), as Gautam et al. (2022,
ISBI; 2023, PRP) read them for source-specific cues: each prototype *is* a training patch (the
projection recorded in the checkpoint), and its nearest patches among the scanned images show
what it responds to.

Per prototype ``j`` with similarity scores ``s_j (N,)`` from the scan:

* ``nearest``: the :data:`NEAREST` scanned images with the highest ``s_j``; ``top_source`` and
  ``top_source_share`` among them; ``source_p``: binomial tail of that many from ``top_source``
  at its share of the scan. **Source-linked** when the share is >= :data:`SOURCE_SHARE` and
  ``source_p`` passes Bonferroni over the prototypes (and the scan has two or more sources);
* with lung masks, ``outside_lungs``: over the nearest images, the mean share of the prototype's
  positive PRP relevance (:mod:`cxr_audit.explain.prp`) outside the lungs, as
  :mod:`cxr_audit.reveal.location` measures concepts, and ``outside_enrichment``, how much denser
  it is there than inside (1: spread evenly, as a coarse or untrained map is). **Outside** when
  the share is >= :data:`OUTSIDE` and the enrichment >= :data:`ENRICHMENT`;
* ``flagged``: source-linked or outside.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import binom

from cxr_audit.data.dataset import collate
from cxr_audit.errors import UsageError
from cxr_audit.explain.prp import prototype_explainer
from cxr_audit.models.architectures import spec_of
from cxr_audit.reveal.location import outside_share
from cxr_audit.store.scan_file import Reopened, ScanFile

NEAREST = 16
SOURCE_SHARE = 0.8
OUTSIDE = 0.5
ENRICHMENT = 2.0
ALPHA = 0.05


@dataclass
class PrototypeAudit:
    """One prototype: its class, where it was projected (checkpoint record) and what the scan says."""

    prototype: int
    cls: str
    projected: dict
    nearest: list[int]  # manifest ids, most similar first
    top_source: str
    top_source_share: float
    source_p: float
    source_linked: bool
    source_p_within_class: float
    beyond_class: bool
    outside_lungs: float | None
    outside_enrichment: float | None
    flagged: bool


def audit_prototypes(scan_path: str | Path, device: str = "cpu") -> list[PrototypeAudit] | None:
    """The audit of every prototype of the scanned model, or ``None`` when it has no prototypes or
    its checkpoint (with the projection record) is not where the scan says."""
    with ScanFile(scan_path) as scan:
        meta = scan.meta
        layer = _prototype_layer(meta["arch"])
        if layer is None or not scan.has_layer(layer) or not Path(meta["checkpoint"]).is_file():
            return None
        rows = scan.good_rows()
        scores = scan.activations(layer).read(rows)  # (n, P)
        index, sources, labels = scan.index()[rows], scan.sources()[rows], scan.labels()[rows]
        scanned = scan.reopen(torch.device(device), lung_masks=True)
    records = torch.load(meta["checkpoint"], map_location="cpu", weights_only=True)["extra"].get("prototypes")
    if not records:
        return None
    nearest = np.argsort(-scores, axis=0, kind="stable")[:NEAREST].T  # (P, NEAREST) positions in rows
    outside = None if scanned is None else _outside_lungs(scanned, layer, [index[n].tolist() for n in nearest])
    values, counts = np.unique(sources, return_counts=True)
    base = dict(zip(values, counts / counts.sum()))
    group = np.unique(labels.reshape(len(labels), -1), axis=0, return_inverse=True)[1].ravel()  # label (combination)
    bonferroni = ALPHA / len(records)
    audits = []
    for j, record in enumerate(records):
        src, k = np.unique(sources[nearest[j]], return_counts=True)
        top = int(np.argmax(k))
        share = float(k[top] / len(nearest[j]))
        p = float(binom.sf(k[top] - 1, len(nearest[j]), base[src[top]]))
        within = poisson_binomial_sf(int(k[top]), class_shares(sources == src[top], group)[group[nearest[j]]])
        linked = len(values) > 1 and share >= SOURCE_SHARE and p < bonferroni
        out, enriched = (None, None) if outside is None else (outside[j][0], outside_enrichment(*outside[j]))
        away = out is not None and out >= OUTSIDE and enriched >= ENRICHMENT
        audits.append(PrototypeAudit(j, record["class"], record, index[nearest[j]].tolist(), str(src[top]), share,
                                     p, bool(linked), within, bool(linked and within < bonferroni), out, enriched,
                                     bool(linked or away)))
    return audits


def class_shares(member: np.ndarray, group: np.ndarray) -> np.ndarray:
    """``(G,)`` the share of ``member (N,)`` (bool) within each of the groups ``group (N,)`` (0..G-1)."""
    return np.bincount(group, weights=member.astype(float)) / np.bincount(group)


def poisson_binomial_sf(k: int, probs: np.ndarray) -> float:
    """``P(X >= k)`` for ``X`` the number of successes of independent trials with success
    probabilities ``probs (n,)`` (exact, by dynamic programming over the trials)."""
    dist = np.zeros(len(probs) + 1)
    dist[0] = 1.0
    for q in probs:
        dist[1:] = dist[1:] * (1 - q) + dist[:-1] * q
        dist[0] *= 1 - q
    return float(min(1.0, dist[k:].sum()))


def _prototype_layer(arch: str) -> str | None:
    """The architecture's similarity-map layer; ``None`` for other or unregistered architectures
    (a scan of a user's factory model is audited like any other, without prototypes)."""
    try:
        return spec_of(arch).prototype_layer
    except UsageError:
        return None


def _outside_lungs(scanned: Reopened, layer: str, nearest: list[list[int]]) -> list[tuple[float, float]]:
    """Per prototype ``(share, area)``: the mean share of its positive PRP relevance outside the lungs over its nearest
    images (resolution-independent, unlike the coarse feature cell)."""
    dev = next(scanned.net.parameters()).device
    shares = []
    with prototype_explainer(scanned.net, scanned.config["arch"], scanned.prep, layer) as explain:
        for j, ids in enumerate(nearest):
            batch = collate([scanned.dataset[i] for i in ids])
            prp = explain(batch["image"].to(dev), index=torch.full((len(ids), 1), j)).prp[:, 0].cpu().numpy()
            lungs = batch["mask"][:, 0].numpy()
            shares.append((outside_share(prp, lungs), float(1 - lungs.mean())))
    return shares


def outside_enrichment(share: float, area: float) -> float:
    """How much denser relevance is outside the lungs than inside: ``(share / area) / ((1 - share) /
    (1 - area))`` for ``share`` of the relevance on ``area`` of the pixels; 1 for a uniform map."""
    inside = max(1 - share, 1e-6) / max(1 - area, 1e-6)
    return (share / max(area, 1e-6)) / inside


def as_records(audits: list[PrototypeAudit]) -> list[dict]:
    """JSON-ready dicts (``class`` for ``cls``), flagged prototypes first."""
    out = []
    for a in sorted(audits, key=lambda a: (not a.flagged, a.prototype)):
        record = asdict(a)
        record["class"] = record.pop("cls")
        out.append(record)
    return out
