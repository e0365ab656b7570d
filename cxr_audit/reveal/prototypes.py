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
* ``source_auroc``: the probability that an image of ``separating_source`` scores higher than an
  image of another source **of the same class** (pairs compared within each class only), for the
  source that separates best, and ``source_auroc_p`` (stratified Mann-Whitney, normal
  approximation). **Source-specific** when the AUROC is >= :data:`SOURCE_AUROC` and ``p`` passes
  Bonferroni over prototypes x sources: the prototype responds to the hospital among images of one
  label, as a stamp prototype does (Gautam et al., 2022: "source-specific" patches), which the
  nearest-image test misses when a class's top images mix sources. It reads every scanned image,
  not 16;
* ``flagged``: source-linked, source-specific or outside.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import binom, norm, rankdata

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
#: a medium effect (Cohen, 1988: d = 0.5 is an AUROC of Phi(0.5 / sqrt 2) = 0.64) on top of significance
SOURCE_AUROC = 0.64
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
    separating_source: str | None
    source_auroc: float | None
    source_auroc_p: float | None
    source_specific: bool
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
    separation = [best_separating_source(scores[:, j], sources, group) for j in range(len(records))]
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
        separating, auroc, auroc_p = separation[j]
        specific = auroc is not None and auroc >= SOURCE_AUROC and auroc_p < bonferroni / max(len(values), 1)
        audits.append(PrototypeAudit(j, record["class"], record, index[nearest[j]].tolist(), str(src[top]), share,
                                     p, bool(linked), within, bool(linked and within < bonferroni), out, enriched,
                                     separating, auroc, auroc_p, bool(specific), bool(linked or away or specific)))
    return audits


def best_separating_source(scores: np.ndarray, sources: np.ndarray,
                           group: np.ndarray) -> tuple[str | None, float | None, float | None]:
    """``(source, auroc, p)`` of the source whose images score highest against the other sources'
    within the same groups (:func:`within_group_auroc`, one source against the rest); ``None``s
    when no group holds two sources."""
    best = (None, None, None)
    for source in np.unique(sources):
        auroc, p = within_group_auroc(scores, sources == source, group)
        if auroc is not None and (best[1] is None or auroc > best[1]):
            best = (str(source), auroc, p)
    return best


def within_group_auroc(scores: np.ndarray, member: np.ndarray, group: np.ndarray) -> tuple[float | None, float | None]:
    """``(auroc, p)``: ``P(score of a member > score of a non-member)`` over the pairs within each
    group (``scores (N,)``, ``member (N,)`` bool, ``group (N,)`` ints; ties count one half), and the
    one-sided p of the stratified Mann-Whitney U (sum over groups; normal approximation, variance
    ``sum n1 n2 (n + 1) / 12``). ``(None, None)`` when no group has members and non-members."""
    u = pairs = variance = 0.0
    for g in np.unique(group):
        inside = group == g
        n1, n = int(member[inside].sum()), int(inside.sum())
        if n1 == 0 or n1 == n:
            continue
        ranks = rankdata(scores[inside])
        u += ranks[member[inside]].sum() - n1 * (n1 + 1) / 2
        pairs += n1 * (n - n1)
        variance += n1 * (n - n1) * (n + 1) / 12
    if not pairs:
        return None, None
    return float(u / pairs), float(norm.sf((u - pairs / 2) / np.sqrt(variance)))


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
