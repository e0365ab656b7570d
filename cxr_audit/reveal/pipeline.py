"""``reveal``: rank the concepts and explanation clusters a model relies on for a subset of a class,
and write ``reveal.json`` plus an offline HTML report (see :mod:`cxr_audit.reveal`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from scipy.stats import norm

from cxr_audit.errors import BadInputError, UsageError
from cxr_audit.numerics.cav import SignalCAV
from cxr_audit.options import choice
from cxr_audit.report.figures import save_figure
from cxr_audit.reveal.alarm import flag_alarms
from cxr_audit.reveal.clusters import cluster_samples, profile_features
from cxr_audit.reveal.concepts import alarm_level, rank_concepts
from cxr_audit.reveal.embedding import EMBEDDINGS
from cxr_audit.reveal.location import outside_lung_share
from cxr_audit.reveal.prototypes import as_records, audit_prototypes
from cxr_audit.reveal.records import ConceptRecord
from cxr_audit.reveal.report import write_report
from cxr_audit.reveal.spray import prepare_heatmaps
from cxr_audit.runtime import now, versions, write_text_atomic
from cxr_audit.store.scan_file import ScanFile
from cxr_audit.store.schema import finding_index
from cxr_audit.store.virelay import CategoryAnalysis, ProjectData, write_analysis, write_project


def reveal(scan_path: str | Path, out_dir: str | Path, *, target: str = "pred", top: int = 10,
           max_k: int = 8, gallery: int = 8, references: bool = True, embedding: str = "tsne", device: str = "cpu",
           virelay_project: bool | None = None, on_progress: Callable[..., None] | None = None) -> dict:
    """Analyse a scan; returns the ``reveal.json`` content (also written to ``out_dir``).

    Concepts are ranked by suspicion over all scanned layers, those that raise an alarm first
    (:mod:`cxr_audit.reveal.concepts`);
    SpRAy clusters (per explained class) are ranked by how much their mean heatmap differs from
    the rest of the class, times how small they are. With ``references`` (needs the scanned model
    and data), the report shows each top concept's CRP conditional heatmaps and crops. With
    ``virelay_project`` (needs the scanned data; ``None``: up to :data:`VIRELAY_AUTO_MAX` samples),
    ``out_dir/virelay/project.yaml`` is a complete ViRelAy project (:mod:`cxr_audit.store.virelay`).
    Memory is bounded by the per-sample features, not the heatmaps: the scan is read a block of
    rows at a time and one layer at a time.
    """
    if top < 1 or max_k < 1 or gallery < 1:  # before any work
        raise UsageError("--top, --max-k and the gallery size must be >= 1")
    choice("--embedding", embedding, EMBEDDINGS)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    v = _read_scan(scan_path, target)
    step = _Steps(len(v.layers) + 3 * len(np.unique(v.classes[v.rows])) + 1, on_progress)
    concepts, n_tested = _rank_layers(v, top, step)
    concepts.sort(key=lambda c: -c.suspicion)
    concepts = _weigh_by_location(scan_path, concepts[:max(3 * top, 30)], v.index, v.rows, device, v.explained)[:top]
    level = alarm_level(n_tested)
    source_tests = flag_alarms(concepts, level)
    # alarmed concepts first, then by suspicion weighted by the evidence that the split is real:
    # on the phantom benchmark the high-suspicion concepts whose split is not bimodal were the
    # *complement* of the artifact (on for the class's stamp-free samples)
    for c in concepts:
        c.rank_score = c.suspicion * float(norm.cdf(c.bimodality_z))
    concepts.sort(key=lambda c: (not c.alarm, -c.rank_score))
    for rank, c in enumerate(concepts):
        c.id = rank
    _member_cav_scores(concepts, v.layers[0], v.layer(v.layers[0])[0], v.index[v.rows])
    # one concept layer: the middle scanned one, as annotate's default
    middle = v.layers[len(v.layers) // 2]
    acts, rel = v.layer(middle)
    spaces = {"heatmap": v.heat_features, f"relevance:{middle}": profile_features(rel),
              f"activation:{middle}": profile_features(acts)}
    del acts, rel
    clusters, per_class, clustered = cluster_samples(spaces, v.classes[v.rows], v.rows, v.index, max_k, embedding, step)
    _export_virelay(out / "reveal.virelay.h5", per_class, v.names)
    virelay = _virelay_project(out / "virelay", v, clustered, per_class, target, virelay_project)
    _scatter(out / "embedding.png", per_class, v.names, v.sources, v.labels, v.index)
    alarm = {"raised": any(c.alarm for c in concepts), "z_level": level, "tests": n_tested,
             "source_tests": source_tests, "source_linked": [c.id for c in concepts if c.source_linked]}
    result = {"scan": str(Path(scan_path).resolve()), "target": target, "explained_output": v.explained,
              "class_names": v.names, "sample_ids": [int(v.index[r]) for r in v.rows], "embedding": embedding,
              "embedding_fitted": {v.names[k]: [d.fitted, len(d.ids)] for k, d in per_class.items()},
              "alarm": alarm, "concepts": [c.to_json() for c in concepts],
              "clusters": [c.to_json() for c in clusters], "virelay": virelay,
              "prevalence": _prevalence(v.labels[v.rows], v.sources[v.rows], v.names),
              "prototypes": _prototypes(scan_path, device), "created": now(),
              "versions": versions()}
    write_text_atomic(out / "reveal.json", json.dumps(result, indent=1))
    write_report(out, scan_path, result, v.index, gallery, references, device)
    step("report", last=True)
    return result


class _Steps:
    """Counts reveal's steps for ``on_progress(done, total, status)`` (layers, space x class, report)."""

    def __init__(self, total: int, on_progress: Callable[..., None] | None):
        self.done, self.total, self.on_progress = 0, total, on_progress

    def __call__(self, status: str, last: bool = False) -> None:
        """One step done (``last``: all of them; classes too small to cluster are never stepped)."""
        self.done = self.total if last else min(self.done + 1, self.total)
        if self.on_progress:
            self.on_progress(self.done, self.total, status)


@dataclass
class ScanView:
    """What reveal reads from a scan: ``rows`` (finished, readable rows), per-row ``index``,
    ``classes`` (the explained class, or a finding's 0/1), ``sources``, ``labels``; for ``rows``
    only: ``heat_features (n, 256)`` (pooled heatmaps, :func:`prepare_heatmaps`), ``logits (n, K)``;
    :meth:`layer` reads one layer's ``(activation max, relevance)`` for ``rows`` when asked."""

    path: Path
    meta: dict
    rows: np.ndarray
    index: np.ndarray
    classes: np.ndarray
    sources: np.ndarray
    labels: np.ndarray
    heat_features: np.ndarray
    logits: np.ndarray
    layers: list[str]
    names: list[str]
    explained: int | None  # the finding a ``finding:NAME`` target explains
    target: str

    def layer(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(activation max (n, C), relevance (n, C))`` of ``name`` for ``rows``, read in blocks."""
        with ScanFile(self.path) as scan:
            return scan.activations(name).read(self.rows), scan.relevances(name).read(self.rows)

    def heatmaps(self) -> np.ndarray:
        """``(n, S, S)`` float32 heatmaps of ``rows`` (only the ViRelAy project needs them whole)."""
        with ScanFile(self.path) as scan:
            return scan.heatmaps(self.target).read(self.rows, lambda block: block.astype(np.float32))


def _read_scan(scan_path, target: str) -> ScanView:
    with ScanFile(scan_path) as scan:
        meta = scan.meta
        if target not in meta["targets"]:
            raise UsageError(f"{scan_path} has no heatmaps for target '{target}' (it has: "
                             f"{', '.join(meta['targets'])}); scan with --target {target}")
        rows, labels = scan.good_rows(), scan.labels()
        view = ScanView(Path(scan_path), meta, rows, scan.index(), scan.targets(target), scan.sources(), labels,
                        scan.heatmaps(target).read(rows, prepare_heatmaps), scan.logits(rows), list(meta["layers"]),
                        meta["class_names"], finding_index(target, meta["class_names"]), target)
    k = view.explained
    if k is not None:  # one finding: its positives and negatives are the two groups
        view.classes = (labels[:, k] > 0 if labels.ndim == 2 else labels == k).astype(np.int64)
        view.names = [f"no {view.names[k]}", view.names[k]]
        view.labels = view.classes
    return view


def _rank_layers(v: ScanView, top: int, step: Callable[[str], None]) -> tuple[list[ConceptRecord], int]:
    """Candidate concepts of every scanned layer and the number of concepts tested (for the
    alarm's Bonferroni level)."""
    concepts, n_tested = [], 0
    for layer in v.layers:
        acts, rel = v.layer(layer)
        findings = rank_concepts(layer, acts, rel, v.classes[v.rows], v.sources[v.rows], top=top)
        n_tested += len(findings)
        concepts.extend(ConceptRecord.from_finding(f, v.index[v.rows], _short_floats(acts[:, f.channel]))
                        for f in findings)
        step(f"concepts {layer}")
    return concepts, n_tested


def _member_cav_scores(concepts: list[ConceptRecord], layer: str, acts: np.ndarray, row_ids: np.ndarray) -> None:
    """Add ``scores["cav"]``: each sample's projection on a signal CAV (Pahde et al., 2023) fitted
    at ``layer`` (the earliest scanned one) on the concept's members against every other sample —
    what ``annotate`` would label from this concept. One channel's activation is a noisy detector;
    the direction its members share at an early layer separates the artifact samples better
    (phantom benchmark: docs/reveal.md)."""
    for c in concepts:
        members = np.isin(row_ids, c.members)
        if 0 < members.sum() < len(members):
            cav = SignalCAV().fit(acts, members.astype(int))
            c.scores["cav"] = _short_floats(cav.score(acts))
            c.cav_layer = layer


def _short_floats(values: np.ndarray) -> list[float]:
    """Per-sample scores for reveal.json at 6 significant digits: a score is a ranking, and full
    17-digit floats made the file of a 100,000-sample scan twice as large."""
    return [float(f"{v:.6g}") for v in np.asarray(values, np.float64)]




def _weigh_by_location(scan_path, concepts: list[ConceptRecord], index, rows, device, explained: int | None,
                       refs: int = 8) -> list[ConceptRecord]:
    """With lung masks, multiply each candidate's suspicion by the share of its conditional
    relevance outside the lungs (:mod:`cxr_audit.reveal.location`) and re-rank: a concept that
    splits a class by where the disease is (left/right lung, size) is real signal, one that
    splits it by a corner stamp is not. Without masks the ranking is left as it is."""
    picks = []
    for c in concepts:
        act = np.asarray(c.scores["activation_max"])
        members = set(c.members)
        ranked = [int(index[rows[j]]) for j in np.argsort(-act) if int(index[rows[j]]) in members]
        picks.append((c.layer, c.channel, ranked[:refs]))
    shares = outside_lung_share(scan_path, picks, device, explained)
    if shares is None:
        return concepts
    for c, share in zip(concepts, shares):
        c.outside_lungs = share
        c.suspicion_before_location = c.suspicion
        c.suspicion = c.suspicion * (share if np.isfinite(share) else 1.0)
    return sorted(concepts, key=lambda c: -c.suspicion)


VIRELAY_AUTO_MAX = 20000  # samples; past this the project (a thumbnail per image) is written only when asked


def _virelay_project(folder: Path, v: ScanView, clustered, per_class, target, wanted: bool | None) -> dict | None:
    """Write the ViRelAy project (:mod:`cxr_audit.store.virelay`); ``{"project": path}``, or
    ``{"skipped": reason}`` when the scanned images are not where the scan says or, unless
    ``wanted``, the scan is larger than :data:`VIRELAY_AUTO_MAX`; ``None`` when not ``wanted``."""
    if wanted is False:
        return None
    if wanted is None and len(v.rows) > VIRELAY_AUTO_MAX:
        return {"skipped": f"{len(v.rows)} samples > {VIRELAY_AUTO_MAX}: reading every image for the thumbnails "
                           f"takes long; pass --virelay to write it anyway"}
    meta, names, ids = v.meta, v.names, v.index[v.rows]
    images = _thumbnails(meta, ids, int(meta["heatmap_size"]))
    if images is None:
        return {"skipped": f"the scanned data {meta['data']} is not readable here"}
    analyses = {}
    for space, per in clustered.items():
        analyses[space] = {}
        for k, (members, result, cluster_ids) in per.items():
            embeddings = {"spectral": result.embedding}
            if space == "heatmap":
                embeddings[per_class[k].method] = per_class[k].xy
            analyses[space][names[k]] = CategoryAnalysis(members, embeddings, result.eigenvalues, cluster_ids)
    data = ProjectData(name=f"cxr-audit {Path(meta['data']).name}", model=str(meta["arch"]), class_names=names,
                       images=images, labels=v.labels[v.rows], heatmaps=v.heatmaps(), predictions=v.logits,
                       attribution_method=str(meta["method"]),
                       strategy="true_label" if target == "true" else "predicted_label", analyses=analyses)
    return {"project": str(write_project(folder, data))}


def _thumbnails(meta: dict, ids, size: int) -> np.ndarray | None:
    """``(N, size, size, 3)`` uint8 images of the scanned samples ``ids`` (manifest rows)."""
    from PIL import Image

    from cxr_audit.data.io import read_image
    from cxr_audit.data.manifest import load_manifest

    if not Path(meta["data"]).exists():
        return None
    try:
        manifest = load_manifest(meta["data"], class_names=meta["class_names"])
        out = np.zeros((len(ids), size, size, 3), np.uint8)
        for n, i in enumerate(ids):
            gray = Image.fromarray((read_image(manifest[int(i)].path) * 255).astype(np.uint8))
            out[n] = np.asarray(gray.resize((size, size), Image.BILINEAR))[..., None]
    except BadInputError:
        return None
    return out


def _export_virelay(path: Path, per_class: dict, names: list[str]) -> None:
    """Each class's heatmap embeddings and SpRAy clustering as one ViRelAy analysis database
    (manifest ids as the index)."""
    write_analysis(path, {names[k]: CategoryAnalysis(
        np.asarray(data.ids), {"spectral": data.spray.embedding, data.method: data.xy},
        data.spray.eigenvalues, data.spray.labels, cluster_name=f"spray-k{data.spray.k}")
        for k, data in per_class.items()})


def _scatter(path: Path, per_class: dict, names, sources, labels, index) -> None:
    """2-D embedding (t-SNE or UMAP) of each class's heatmaps, coloured by SpRAy cluster and by source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not per_class:
        return
    row_of = {int(i): r for r, i in enumerate(index)}
    fig, axes = plt.subplots(len(per_class), 2, figsize=(7, 3.2 * len(per_class)), squeeze=False)
    for ax_row, (k, data) in zip(axes, per_class.items()):
        xy = data.xy
        ax_row[0].scatter(xy[:, 0], xy[:, 1], c=data.spray.labels, cmap="tab10", s=8)
        ax_row[0].set_title(f"{names[k]}: SpRAy clusters", fontsize=8)
        src = np.array([sources[row_of[int(i)]] for i in data.ids])
        for s in sorted(set(src)):
            ax_row[1].scatter(xy[src == s, 0], xy[src == s, 1], s=8, label=s or "(none)")
        ax_row[1].set_title(f"{names[k]}: source", fontsize=8)
        ax_row[1].legend(fontsize=6)
        for ax in ax_row:
            ax.set_xticks([])
            ax.set_yticks([])
    save_figure(fig, path, dpi=100)


def _prevalence(labels, sources, names) -> dict:
    """Label prevalence per source (Gautam et al., 2022 warn when it differs across sources)."""
    if labels.ndim != 1 or len(set(sources)) < 2:
        return {}
    table = {str(s): {names[k]: float(np.mean(labels[sources == s] == k)) for k in range(len(names))}
             for s in sorted(set(sources))}
    spread = max(max(v[n] for v in table.values()) - min(v[n] for v in table.values()) for n in names)
    return {"per_source": table, "max_difference": float(spread), "warning": bool(spread > 0.2)}


def _prototypes(scan_path, device: str) -> list[dict] | None:
    """A prototype model's prototypes audited (:mod:`cxr_audit.reveal.prototypes`); ``None`` otherwise."""
    audits = audit_prototypes(scan_path, device)
    return None if audits is None else as_records(audits)
