"""The reveal report: ``report.html`` (template ``report/templates/reveal.html``) and its PNG
galleries, in one folder that opens offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cxr_audit.report.figures import concept_reference, heatmap_grid, prototype_gallery
from cxr_audit.report.html import render
from cxr_audit.reveal.alarm import alarm_sentence
from cxr_audit.reveal.embedding import PLACE_NEIGHBOURS
from cxr_audit.reveal.prototypes import SOURCE_AUROC, SOURCE_SHARE

EMBEDDING_NAMES = {"tsne": "t-SNE", "umap": "UMAP"}


def write_report(out: Path, scan_path, result: dict, index, gallery: int, references: bool, device: str) -> None:
    """``report.html`` for ``result`` (what ``reveal.json`` holds) with galleries of the top three
    concepts, clusters and (prototype models) prototypes; ``index``: the scan's manifest ids."""
    row_of = {int(i): r for r, i in enumerate(index)}
    prototypes = result.get("prototypes") or []
    html = render("reveal.html", scan=str(scan_path), prevalence=result["prevalence"], alarm=alarm_sentence(result),
                  names=result["class_names"], concepts=result["concepts"],
                  concept_figures=_concept_figures(out, scan_path, result, row_of, gallery, references, device),
                  prototypes=[{**p, "projected_file": Path(str(p["projected"].get("path", ""))).name}
                              for p in prototypes],
                  prototype_png=_prototype_png(out, scan_path, prototypes, device), source_share=SOURCE_SHARE,
                  source_auroc=SOURCE_AUROC,
                  embedding=_embedding(out, result), clusters=result["clusters"][:max(3 * gallery, 30)],
                  cluster_figures=_cluster_figures(out, scan_path, result, row_of, gallery))
    (out / "report.html").write_text(html, encoding="utf-8")


def _concept_figures(out: Path, scan_path, result: dict, row_of: dict, gallery: int, references: bool,
                     device: str) -> list[dict]:
    figures = []
    for c in result["concepts"][:3]:
        order = np.argsort(-np.array(c["scores"]["activation_max"]))[:gallery]
        ids = [result["sample_ids"][o] for o in order]
        png = heatmap_grid(scan_path, [row_of[i] for i in ids], out / f"concept_{c['id']}.png", target=result["target"],
                           title=f"concept {c['id']} ({c['layer']}:{c['channel']}): top-activating samples")
        ref = None
        if references:
            ref = concept_reference(scan_path, c["layer"], c["channel"], ids, out / f"concept_{c['id']}_crp.png",
                                    title=f"concept {c['id']}: conditional heatmaps (this channel only) and crops",
                                    device=device, explained=result["explained_output"]).name
        figures.append({"id": c["id"], "png": png.name, "reference": ref})
    return figures


def _cluster_figures(out: Path, scan_path, result: dict, row_of: dict, gallery: int) -> list[dict]:
    names, figures = result["class_names"], []
    for c in result["clusters"][:3]:
        ids = c["members"][:gallery]
        png = heatmap_grid(scan_path, [row_of[i] for i in ids], out / f"cluster_{c['id']}.png", target=result["target"],
                           title=f"cluster {c['id']} ({c['space']}, {names[c['class_index']]}, {c['size']} samples)")
        figures.append({"id": c["id"], "png": png.name})
    return figures


def _prototype_png(out: Path, scan_path, prototypes: list[dict], device: str) -> str | None:
    if not prototypes:
        return None
    png = prototype_gallery(scan_path, prototypes[:20], out / "prototypes.png", device,
                            title="prototypes: projected image with its feature cell boxed, the cell enlarged, PRP map "
                                  "(a deep trunk sees the whole image from every cell: the PRP map shows where it looks)")
    return None if png is None else png.name


def _embedding(out: Path, result: dict) -> dict | None:
    """The embedding section's method name and sentence, when ``embedding.png`` was drawn."""
    if not (out / "embedding.png").exists():
        return None
    method = EMBEDDING_NAMES[result.get("embedding", "tsne")]
    return {"method": method, "sentence": embedding_sentence(result, method)}


def embedding_sentence(result: dict, method: str) -> str:
    """Which samples the 2-D embedding fitted and which it placed (:mod:`cxr_audit.reveal.embedding`)."""
    fitted = result.get("embedding_fitted", {})
    placed = {name: f for name, f in fitted.items() if f[0] < f[1]}
    if not placed:
        return f"{method} of every sample of each class."
    parts = ", ".join(f"{name}: {f[0]:,} of {f[1]:,}" for name, f in placed.items())
    return (f"{method} of a sample stratified by SpRAy cluster ({parts}); the other samples are placed at the "
            f"distance-weighted mean position of their {PLACE_NEIGHBOURS} nearest embedded samples.")
