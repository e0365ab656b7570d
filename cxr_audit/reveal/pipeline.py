"""``reveal``: rank the concepts and explanation clusters a model relies on for a subset of a class,
and write ``reveal.json`` plus an offline HTML report (see :mod:`cxr_audit.reveal`)."""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from scipy.stats import norm

from cxr_audit.annotate.cav import SignalCAV
from cxr_audit.errors import BadInputError, UsageError
from cxr_audit.report.figures import concept_reference, heatmap_grid, prototype_gallery, save_figure
from cxr_audit.reveal.concepts import BLOCK_ROWS, alarm_level, rank_concepts
from cxr_audit.reveal.embedding import EMBEDDINGS, PLACE_NEIGHBOURS, embed
from cxr_audit.reveal.location import outside_lung_share
from cxr_audit.reveal.prototypes import SOURCE_SHARE, as_records, audit_prototypes
from cxr_audit.reveal.spray import prepare_heatmaps, spray
from cxr_audit.reveal.virelay import CategoryAnalysis, ProjectData, write_project
from cxr_audit.runtime import now, versions, write_text_atomic
from cxr_audit.store.scan_file import ScanFile
from cxr_audit.store.schema import finding_index


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
    ``out_dir/virelay/project.yaml`` is a complete ViRelAy project (:mod:`cxr_audit.reveal.virelay`).
    Memory is bounded by the per-sample features, not the heatmaps: the scan is read a block of
    rows at a time and one layer at a time.
    """
    if top < 1 or max_k < 1 or gallery < 1:  # before any work
        raise UsageError("--top, --max-k and the gallery size must be >= 1")
    if embedding not in EMBEDDINGS:
        raise UsageError(f"embedding must be one of {', '.join(EMBEDDINGS)}, got '{embedding}'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    v = _read_scan(scan_path, target)
    step = _Steps(len(v.layers) + 3 * len(np.unique(v.classes[v.rows])) + 1, on_progress)
    concepts, n_tested = _rank_layers(v, top, step)
    concepts.sort(key=lambda c: -c["suspicion"])
    concepts = _weigh_by_location(scan_path, concepts[:max(3 * top, 30)], v.index, v.rows, device, v.explained)[:top]
    level = alarm_level(n_tested)
    source_tests = flag_alarms(concepts, level)
    # alarmed concepts first, then by suspicion weighted by the evidence that the split is real:
    # on the phantom benchmark the high-suspicion concepts whose split is not bimodal were the
    # *complement* of the artifact (on for the class's stamp-free samples)
    for c in concepts:
        c["rank_score"] = c["suspicion"] * float(norm.cdf(c["bimodality_z"]))
    concepts.sort(key=lambda c: (not c["alarm"], -c["rank_score"]))
    for rank, c in enumerate(concepts):
        c["id"] = rank
    _member_cav_scores(concepts, v.layers[0], v.layer(v.layers[0])[0], v.index[v.rows])
    # one concept layer: the middle scanned one, as annotate's default
    middle = v.layers[len(v.layers) // 2]
    acts, rel = v.layer(middle)
    spaces = {"heatmap": v.heat_features, f"relevance:{middle}": profile_features(rel),
              f"activation:{middle}": profile_features(acts)}
    del acts, rel
    clusters, per_class, clustered = _clusters(spaces, v.classes[v.rows], v.rows, v.index, max_k, embedding, step)
    _export_virelay(out / "reveal.virelay.h5", per_class, v.names)
    virelay = _virelay_project(out / "virelay", v, clustered, per_class, target, virelay_project)
    _scatter(out / "embedding.png", per_class, v.names, v.sources, v.labels, v.index)
    alarm = {"raised": any(c["alarm"] for c in concepts), "z_level": level, "tests": n_tested,
             "source_tests": source_tests, "source_linked": [c["id"] for c in concepts if c["source_linked"]]}
    result = {"scan": str(Path(scan_path).resolve()), "target": target, "explained_output": v.explained,
              "class_names": v.names, "sample_ids": [int(v.index[r]) for r in v.rows], "embedding": embedding,
              "embedding_fitted": {v.names[k]: [d["fitted"], len(d["ids"])] for k, d in per_class.items()},
              "alarm": alarm, "concepts": concepts, "clusters": clusters, "virelay": virelay,
              "prevalence": _prevalence(v.labels[v.rows], v.sources[v.rows], v.names),
              "prototypes": _prototypes(scan_path, device), "created": now(),
              "versions": versions()}
    write_text_atomic(out / "reveal.json", json.dumps(result, indent=1))
    _report(out, scan_path, result, v.index, gallery, references, device)
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


def _rank_layers(v: ScanView, top: int, step: Callable[[str], None]) -> tuple[list[dict], int]:
    """Candidate concepts of every scanned layer as records (members as manifest ids) and the
    number of concepts tested (for the alarm's Bonferroni level)."""
    concepts, n_tested = [], 0
    for layer in v.layers:
        acts, rel = v.layer(layer)
        findings = rank_concepts(layer, acts, rel, v.classes[v.rows], v.sources[v.rows], top=top)
        n_tested += len(findings)
        for finding in findings:
            record = asdict(finding)
            record["members"] = [int(v.index[v.rows[m]]) for m in finding.members]
            record["scores"] = {"activation_max": _short_floats(acts[:, finding.channel])}
            concepts.append(record)
        step(f"concepts {layer}")
    return concepts, n_tested


def _member_cav_scores(concepts: list[dict], layer: str, acts: np.ndarray, row_ids: np.ndarray) -> None:
    """Add ``scores["cav"]``: each sample's projection on a signal CAV (Pahde et al., 2023) fitted
    at ``layer`` (the earliest scanned one) on the concept's members against every other sample —
    what ``annotate`` would label from this concept. One channel's activation is a noisy detector;
    the direction its members share at an early layer separates the artifact samples better
    (phantom benchmark: docs/reveal.md)."""
    for c in concepts:
        members = np.isin(row_ids, c["members"])
        if 0 < members.sum() < len(members):
            cav = SignalCAV().fit(acts, members.astype(int))
            c["scores"]["cav"] = _short_floats(cav.score(acts))
            c["cav_layer"] = layer


def _short_floats(values: np.ndarray) -> list[float]:
    """Per-sample scores for reveal.json at 6 significant digits: a score is a ranking, and full
    17-digit floats made the file of a 100,000-sample scan twice as large."""
    return [float(f"{v:.6g}") for v in np.asarray(values, np.float64)]


SOURCE_LINK_MIN_V = 0.3  # a moderate association (Cohen, 1988) on top of significance


def flag_alarms(concepts: list[dict], z_level: float, alpha: float = 0.05) -> int:
    """Set ``alarm``, ``label_linked`` and ``source_linked`` on each concept record; returns the
    number of source tests.

    A concept alarms when its relevance lies mostly outside the lungs (or no lung masks exist)
    and either its split of the class is bimodal beyond ``z_level`` *and* tied to the label (it is
    on less often in the other classes: chi-square p below the Bonferroni level; untestable with
    one class), or its members are tied to a source within the class (chi-square p below the
    Bonferroni level over the concepts that could be tested, and Cramér's V >= 0.3): a hospital's
    tag or marker shows as the second. The label condition keeps anatomy's own bimodal variation,
    present in every class alike, from alarming (a clean phantom control did, z 3.7)."""
    n_tests = sum(c.get("source_p_value") is not None for c in concepts)
    n_label_tests = max(1, sum(c.get("label_p_value") is not None for c in concepts))
    for c in concepts:
        p = c.get("source_p_value")
        c["source_linked"] = bool(p is not None and p < alpha / n_tests and c["source_cramers_v"] >= SOURCE_LINK_MIN_V)
        label_p = c.get("label_p_value")
        c["label_linked"] = bool(label_p is None or label_p < alpha / n_label_tests)
        bimodal = c["bimodality_z"] > z_level and c["label_linked"]
        c["alarm"] = bool((bimodal or c["source_linked"]) and c.get("outside_lungs", 1.0) > 0.5)
    return n_tests


def alarm_sentence(result: dict) -> str:
    """One plain sentence on whether and why ``reveal`` raised an alarm (report and CLI)."""
    alarm, concepts = result["alarm"], result["concepts"]
    if not alarm["raised"]:
        return (f"No alarm: no concept with its relevance mostly outside the lungs splits a class beyond the "
                f"Bonferroni 5 % level (bimodality z > {alarm['z_level']:.2f} over {alarm['tests']} tests) or is "
                f"tied to a source within a class ({alarm.get('source_tests', 0)} source tests).")
    split = [str(c["id"]) for c in concepts if c["alarm"] and c["bimodality_z"] > alarm["z_level"]]
    linked = [str(c["id"]) for c in concepts if c["alarm"] and c.get("source_linked")]
    reasons = []
    if split:
        reasons.append(f"concept(s) {', '.join(split)} split a class into two groups far beyond what one skewed "
                       f"group gives (bimodality z > {alarm['z_level']:.2f}, Bonferroni 5 % over {alarm['tests']} tests)")
    if linked:
        reasons.append(f"concept(s) {', '.join(linked)} are on for one source's images and off for another's within "
                       f"the same class (chi-square, Bonferroni 5 % over {alarm['source_tests']} tests, Cramér's V >= "
                       f"{SOURCE_LINK_MIN_V}): a site marker")
    return "Alarm: " + "; ".join(reasons) + "."


def _source_cell(c: dict) -> str:
    v = c.get("source_cramers_v")
    return "" if v is None else f"{v:.2f}" + (" (linked)" if c.get("source_linked") else "")


def _weigh_by_location(scan_path, concepts: list[dict], index, rows, device, explained: int | None,
                       refs: int = 8) -> list[dict]:
    """With lung masks, multiply each candidate's suspicion by the share of its conditional
    relevance outside the lungs (:mod:`cxr_audit.reveal.location`) and re-rank: a concept that
    splits a class by where the disease is (left/right lung, size) is real signal, one that
    splits it by a corner stamp is not. Without masks the ranking is left as it is."""
    picks = []
    for c in concepts:
        act = np.asarray(c["scores"]["activation_max"])
        members = set(c["members"])
        ranked = [int(index[rows[j]]) for j in np.argsort(-act) if int(index[rows[j]]) in members]
        picks.append((c["layer"], c["channel"], ranked[:refs]))
    shares = outside_lung_share(scan_path, picks, device, explained)
    if shares is None:
        return concepts
    for c, share in zip(concepts, shares):
        c["outside_lungs"] = share
        c["suspicion_before_location"] = c["suspicion"]
        c["suspicion"] = c["suspicion"] * (share if np.isfinite(share) else 1.0)
    return sorted(concepts, key=lambda c: -c["suspicion"])


def _clusters(spaces: dict[str, np.ndarray], classes, rows, index, max_k, embedding,
              step: Callable[[str], None] = lambda status: None) -> tuple[list[dict], dict, dict]:
    """Spectral clusters per explained class in each feature space (``heatmap``, and CRP
    ``relevance:<layer>`` / ``activation:<layer>`` profiles), all ranked together by
    ``distinctness × 4 p (1 - p)``: how different the cluster's mean normalised profile is from
    the rest of its class (half the L1 distance, in [0, 1]) times how much of a minority it is.
    Returns the clusters, the per-class SpRAy results of the heatmap space (embeddings), and
    ``{space: {class: (members, SprayResult, cluster id per member)}}`` for the ViRelAy project."""
    found, per_class, results = [], {}, {}
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
                per_class[int(k)] = {"ids": index[rows[members]], "spray": result, "method": embedding,
                                     "embedding": xy.xy, "fitted": xy.fitted}
            step(f"clusters {space} class {k}")
            for c in range(result.k):
                inside = members[result.labels == c]
                if len(inside) == len(members):
                    continue
                distinct = 0.5 * np.abs(features[result.labels == c].mean(0) - features[result.labels != c].mean(0)).sum()
                share = len(inside) / len(members)
                found.append({"space": space, "class_index": int(k), "size": int(len(inside)),
                              "share_of_class": float(share), "distinctness": float(distinct),
                              "suspicion": float(distinct * 4 * share * (1 - share)),
                              "members": [int(index[rows[m]]) for m in inside], "k_of_class": int(result.k),
                              "clustering": result.method, "spray_label": c})
    found.sort(key=lambda c: -c["suspicion"])
    ids = {space: {k: np.full(len(m), -1) for k, (m, _) in per.items()} for space, per in results.items()}
    for rank, c in enumerate(found):
        c["id"] = rank
        members, result = results[c["space"]][c["class_index"]]
        ids[c["space"]][c["class_index"]][result.labels == c.pop("spray_label")] = rank
    clustered = {space: {k: (m, r, ids[space][k]) for k, (m, r) in per.items()} for space, per in results.items()}
    return found, per_class, clustered


def profile_features(values: np.ndarray) -> np.ndarray:
    """``(N, C)`` channel relevances or activations -> positive part normalised to unit sum per
    sample, so that clusters reflect *which* concepts a sample uses, not how strongly; float32
    (computed in float64 a block of rows at a time: a 100,000 x 2,048 layer is 0.8 GB, not 1.6)."""
    out = np.empty(values.shape, np.float32)
    for start in range(0, len(values), BLOCK_ROWS):
        pos = np.clip(values[start:start + BLOCK_ROWS].astype(np.float64), 0, None)
        out[start:start + BLOCK_ROWS] = pos / np.maximum(pos.sum(1, keepdims=True), 1e-12)
    return out


VIRELAY_AUTO_MAX = 20000  # samples; past this the project (a thumbnail per image) is written only when asked


def _virelay_project(folder: Path, v: ScanView, clustered, per_class, target, wanted: bool | None) -> dict | None:
    """Write the ViRelAy project (:mod:`cxr_audit.reveal.virelay`); ``{"project": path}``, or
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
                embeddings[per_class[k]["method"]] = per_class[k]["embedding"]
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
    """Embeddings and clusterings in ViRelAy's analysis-database layout:
    ``/<category>/index``, ``/<category>/embedding/{spectral,tsne|umap}``, ``/<category>/cluster/<name>``."""
    import h5py

    with h5py.File(path, "w") as f:
        for k, data in per_class.items():
            g = f.create_group(names[k])
            g["index"] = np.asarray(data["ids"], dtype=np.uint32)
            spectral = g.create_dataset("embedding/spectral", data=data["spray"].embedding.astype(np.float32))
            spectral.attrs["eigenvalue"] = data["spray"].eigenvalues.astype(np.float32)
            g[f"embedding/{data['method']}"] = data["embedding"]
            g[f"cluster/spray-k{data['spray'].k}"] = data["spray"].labels.astype(np.uint32)


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
        xy = data["embedding"]
        ax_row[0].scatter(xy[:, 0], xy[:, 1], c=data["spray"].labels, cmap="tab10", s=8)
        ax_row[0].set_title(f"{names[k]}: SpRAy clusters", fontsize=8)
        src = np.array([sources[row_of[int(i)]] for i in data["ids"]])
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


def _embedding_sentence(result: dict, method: str) -> str:
    """Which samples the 2-D embedding fitted and which it placed (:mod:`cxr_audit.reveal.embedding`)."""
    fitted = result.get("embedding_fitted", {})
    placed = {name: f for name, f in fitted.items() if f[0] < f[1]}
    if not placed:
        return f"{method} of every sample of each class."
    parts = ", ".join(f"{name}: {f[0]:,} of {f[1]:,}" for name, f in placed.items())
    return (f"{method} of a sample stratified by SpRAy cluster ({parts}); the other samples are placed at the "
            f"distance-weighted mean position of their {PLACE_NEIGHBOURS} nearest embedded samples.")


def _prototypes(scan_path, device: str) -> list[dict] | None:
    """A prototype model's prototypes audited (:mod:`cxr_audit.reveal.prototypes`); ``None`` otherwise."""
    audits = audit_prototypes(scan_path, device)
    return None if audits is None else as_records(audits)


def _prototype_section(out: Path, scan_path, prototypes: list[dict] | None, device: str) -> list[str]:
    """The report's prototype table and gallery (flagged prototypes first)."""
    if not prototypes:
        return []
    flagged = [p for p in prototypes if p["flagged"]]
    parts = [f"<h2>Prototypes</h2><p>{len(flagged)} of {len(prototypes)} prototypes flagged: their nearest "
             f"patches come mostly from one source (share &ge; {SOURCE_SHARE:.0%}, binomial test, Bonferroni; "
             "'beyond class' when that source explains more than the prototype's class does) or "
             f"their PRP relevance lies mostly, and densely, outside the lungs.</p><table><tr><th>prototype</th><th>class</th><th>projected onto</th>"
             "<th>its source / label</th><th>nearest: top source (share)</th><th>p</th><th>p within class</th>"
             "<th>PRP outside lungs</th><th>flag</th></tr>"]
    for p in prototypes:
        proj, outside = p["projected"], p["outside_lungs"]
        where = "" if outside is None else f"{outside:.2f} (x{p['outside_enrichment']:.1f} denser)"
        parts.append(f"<tr><td>{p['prototype']}</td><td>{html.escape(p['class'])}</td>"
                     f"<td>#{proj.get('sample')} {html.escape(Path(str(proj.get('path', ''))).name)}</td>"
                     f"<td>{html.escape(str(proj.get('source')))} / {html.escape(str(proj.get('label')))}</td>"
                     f"<td>{html.escape(p['top_source'])} ({p['top_source_share']:.2f})</td><td>{p['source_p']:.1e}</td>"
                     f"<td>{p['source_p_within_class']:.1e}{' (beyond class)' if p['beyond_class'] else ''}</td>"
                     f"<td>{where}</td><td>{'yes' if p['flagged'] else ''}</td></tr>")
    parts.append("</table>")
    png = prototype_gallery(scan_path, prototypes[:20], out / "prototypes.png", device,
                            title="prototypes: projected training patch, enlarged, PRP map")
    if png is not None:
        parts.append(f"<img src='{png.name}'>")
    return parts


def _report(out: Path, scan_path, result: dict, index, gallery: int, references: bool, device: str) -> None:
    """One folder, opens offline: report.html + PNG galleries (top items only)."""
    row_of = {int(i): r for r, i in enumerate(index)}
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>cxr-audit reveal</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px}img{max-width:100%}</style></head><body>",
             f"<h1>Reveal: {html.escape(str(scan_path))}</h1>"]
    prev = result["prevalence"]
    if prev.get("warning"):
        parts.append(f"<p><b>Warning:</b> label prevalence differs across sources by up to "
                     f"{prev['max_difference']:.0%}: the model can learn the source instead of the disease.</p>")
    parts.append(f"<p>{html.escape(alarm_sentence(result))} The ranking below is for inspection either way.</p>")
    parts.append("<h2>Most suspicious concepts</h2><table><tr><th>id</th><th>layer:channel</th><th>class</th>"
                 "<th>suspicion</th><th>contrast</th><th>minority</th><th>importance</th><th>outside lungs</th>"
                 "<th>bimodality z</th><th>source V</th><th>alarm</th><th>members</th></tr>")
    names = result["class_names"]
    for c in result["concepts"]:
        parts.append(f"<tr><td>{c['id']}</td><td>{html.escape(c['layer'])}:{c['channel']}</td>"
                     f"<td>{html.escape(names[c['class_index']])}</td><td>{c['suspicion']:.3f}</td>"
                     f"<td>{c['contrast']:.2f}</td><td>{c['minority']:.2f}</td><td>{c['importance']:.2f}</td>"
                     f"<td>{c.get('outside_lungs', float('nan')):.2f}</td><td>{c['bimodality_z']:.1f}</td>"
                     f"<td>{_source_cell(c)}</td><td>{'yes' if c['alarm'] else ''}</td><td>{len(c['members'])}</td></tr>")
    parts.append("</table>")
    for c in result["concepts"][:3]:
        order = np.argsort(-np.array(c["scores"]["activation_max"]))[:gallery]
        ids = [result["sample_ids"][o] for o in order]
        png = heatmap_grid(scan_path, [row_of[i] for i in ids], out / f"concept_{c['id']}.png", target=result["target"],
                           title=f"concept {c['id']} ({c['layer']}:{c['channel']}): top-activating samples")
        parts.append(f"<h3>Concept {c['id']}</h3><img src='{png.name}'>")
        if references:
            ref = concept_reference(scan_path, c["layer"], c["channel"], ids, out / f"concept_{c['id']}_crp.png",
                                    title=f"concept {c['id']}: conditional heatmaps (this channel only) and crops",
                                    device=device, explained=result["explained_output"])
            parts.append(f"<img src='{ref.name}'>")
    parts += _prototype_section(out, scan_path, result.get("prototypes"), device)
    if (out / "embedding.png").exists():
        method = {"tsne": "t-SNE", "umap": "UMAP"}[result.get("embedding", "tsne")]
        parts.append(f"<h2>Heatmap embedding ({method})</h2><p>{html.escape(_embedding_sentence(result, method))}</p>"
                     "<img src='embedding.png'>")
    parts.append("<h2>Sample clusters (SpRAy on heatmaps; concept relevance and activation profiles)</h2>"
                 "<table><tr><th>id</th><th>space</th><th>class</th><th>size</th>"
                 "<th>share of class</th><th>distinctness</th><th>suspicion</th></tr>")
    for c in result["clusters"][:max(3 * gallery, 30)]:
        parts.append(f"<tr><td>{c['id']}</td><td>{html.escape(c['space'])}</td>"
                     f"<td>{html.escape(names[c['class_index']])}</td><td>{c['size']}</td>"
                     f"<td>{c['share_of_class']:.2f}</td><td>{c['distinctness']:.2f}</td><td>{c['suspicion']:.3f}</td></tr>")
    parts.append("</table>")
    for c in result["clusters"][:3]:
        ids = c["members"][:gallery]
        png = heatmap_grid(scan_path, [row_of[i] for i in ids], out / f"cluster_{c['id']}.png", target=result["target"],
                           title=f"cluster {c['id']} ({c['space']}, {names[c['class_index']]}, {c['size']} samples)")
        parts.append(f"<h3>Cluster {c['id']}</h3><img src='{png.name}'>")
    parts.append("</body></html>")
    (out / "report.html").write_text("\n".join(parts), encoding="utf-8")
