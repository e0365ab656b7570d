"""``annotate``: turn a few examples (or a concept, or a column) into sample labels and pixel
masks for the whole dataset — the semi-automated annotation of Pahde et al. (2025,
arXiv:2501.13818) with signal CAVs (Pahde et al., 2023).

1. Fit a CAV on the scan's max-pooled activations at ``layer`` from positives (seeds, a concept's
   top samples, or the ``artifact`` column) against a random sample of other rows.
2. Score every sample (``activation_max · v``), threshold (Otsu on the scores by default), and
   optionally refine: refit on the labelled set and rescore.
3. Masks: fit a CAV at the (earlier) ``mask_layer`` on those labels and back-propagate
   ``ReLU(a) ⊙ v`` with LRP to the pixels — by default only the concept presence in excess of
   its per-position median over unlabelled samples; blur, threshold (70 % of the peak), dilate.
4. Quality, where ground truth exists: retrieval AUROC/AP on rows never used to fit the first
   CAV; mask IoU and pointing game against the manifest's ``artifact_mask``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy.ndimage import binary_dilation

from cxr_audit.annotate.masks import binarise, complete_saturated, concept_heatmaps, parse_threshold, presence_reference
from cxr_audit.annotate.outputs import write_mask_outputs
from cxr_audit.annotate.quality import iou, pointing_hit, retrieval_quality
from cxr_audit.data.dataset import CxrDataset, collate
from cxr_audit.data.manifest import load_manifest
from cxr_audit.errors import BadInputError, UsageError
from cxr_audit.explain import create_method
from cxr_audit.models.registry import file_sha256, load_frozen, preprocessing_of
from cxr_audit.numerics.cav import cav_factory, has_within_group_contrast
from cxr_audit.numerics.threshold import otsu_threshold
from cxr_audit.runtime import now, resolve_device, versions
from cxr_audit.store.annotation_file import write_annotation_file
from cxr_audit.store.h5 import StoredRows
from cxr_audit.store.scan_file import ScanFile
from cxr_audit.store.schema import finding_index


@dataclass
class AnnotationResult:
    path: Path
    layer: str
    threshold: float
    n_labelled: int
    quality: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)


def annotate(scan_path: str | Path, out: str | Path, *, seeds: list[int] | None = None,
             negatives: list[int] | None = None, from_column: str | None = None, concept: str | None = None,
             cluster: int | None = None, reveal_json: str | Path | None = None,
             layer: str | None = None, method: str = "signal", cav_options: dict | None = None, n_negatives: int = 50,
             threshold: str | float = "auto", refine: int = 0, masks: bool = True,
             masks_dir: str | Path | None = None, masking: MaskOptions | None = None,
             model: str | Path | None = None, data: str | Path | None = None, device: str = "auto",
             batch_size: int = 16, seed: int = 0, target: str | None = None,
             on_progress: Callable[..., None] | None = None) -> AnnotationResult:
    """Label artifact samples and paint their masks; writes ``out`` (HDF5) and, with
    ``masks_dir``, one PNG per labelled sample plus ``annotated.csv`` and ``contact_sheet.png``.

    Exactly one of ``seeds`` (manifest row ids, 2–5 positives suffice), ``concept``
    (``[LAYER:]CHANNEL``: its top-relevance samples are the positives), ``cluster`` (a SpRAy
    cluster id from ``reveal_json``: its members are the seeds) or ``from_column`` (``artifact``)
    selects the positives. ``target`` (``finding:NAME``, multi-label scans): the classes the
    masks' CAV is fitted within are that finding's positives and negatives (default: every
    combination of findings). ``masking``: how the masks are painted (default
    :class:`MaskOptions()`).
    """
    masking = masking or MaskOptions()
    masking.check()  # fail before any work
    new_cav = cav_factory(method, cav_options)
    seeds = _selected_seeds(seeds, negatives, concept, from_column, cluster, reveal_json)
    out = Path(out)
    if out.resolve() == Path(scan_path).resolve():
        raise UsageError(f"--out {out} is the scan itself: annotations go to a new file")
    rng = np.random.default_rng(seed)
    with ScanFile(scan_path) as opened:  # open throughout: activations are read a block of rows at a time
        scan = _read_scan(opened, layer, concept, masking.layer, target)
        pos = _positives(seeds, concept, from_column, scan.row_of, scan.artifact, scan.relevances, scan.layers,
                         scan.layer, scan.usable)
        labelling = _label_samples(scan, pos, negatives, from_column, new_cav, n_negatives, threshold, refine, rng)
        labels, quality = labelling.labels, labelling.quality
        result = AnnotationResult(out, scan.layer, labelling.threshold, int(labels.sum()), quality)
        mask_rows = np.flatnonzero(labels)[:masking.max_masks]
        mask_stack = None
        if masks and len(mask_rows):
            mask_stack, mask_quality = _paint_masks(scan, labels, mask_rows, new_cav, masking, model, data, device,
                                                    batch_size, rng, on_progress)
            quality.update(mask_quality)
    options = {"layer": scan.layer, "mask_layer": scan.mask_layer, "method": method,
               "cav_options": {k: str(v) for k, v in (cav_options or {}).items()}, "seeds": seeds,
               "negatives": negatives, "from_column": from_column, "concept": concept, "cluster": cluster,
               "n_negatives": n_negatives, "threshold": threshold, "refine": refine,
               "mask_threshold": masking.threshold, "mask_rule": masking.rule, "mask_reference": masking.reference,
               "mask_complete": masking.complete, "mask_cav": masking.cav, "blur": masking.blur,
               "dilate": masking.dilate, "seed": seed, "target": target}
    _save(result, scan, scan_path, options, labelling, labels, (mask_rows, mask_stack), masks_dir)
    return result


@dataclass(frozen=True)
class MaskOptions:
    """How :func:`annotate` paints masks; every default is declared here once (the CLI reads
    them). :meth:`check` names the valid choices.

    ``layer``: whose CAV paints (default: the earliest scanned layer); ``threshold``: ``peak:F``
    (above F of the blurred maximum; ``peak`` = ``peak:0.5``), ``otsu`` or ``quantile``
    (:mod:`cxr_audit.annotate.masks`); ``rule``: how first-layer relevance reaches pixels;
    ``reference``: ``clean`` paints the concept's presence in excess of its median over unlabelled
    samples; ``complete``: ``saturated`` adds the thin clipped structure a mask touches; ``cav``:
    ``within-class`` or ``across``; ``blur``: Gaussian sigma in pixels (default 1.5 per 64 px);
    ``dilate``: iterations; ``max_masks``: at most this many masks."""

    layer: str | None = None
    threshold: str = "peak:0.7"  # docs/annotate.md "Mask threshold": tighter masks, fewer tissue margins
    rule: str = "upsample"
    reference: str = "clean"
    complete: str = "saturated"
    cav: str = "within-class"
    blur: float | None = None
    dilate: int = 0
    max_masks: int = 1000

    def check(self) -> None:
        parse_threshold(self.threshold)
        for value, allowed, what in ((self.rule, MASK_RULES, "rule"), (self.reference, MASK_REFERENCES, "reference"),
                                     (self.complete, MASK_COMPLETIONS, "completion"), (self.cav, MASK_CAVS, "CAV")):
            if value not in allowed:
                raise UsageError(f"mask {what} must be one of {', '.join(allowed)}, got '{value}'")


@dataclass
class _ScanArrays:
    """What annotate reads from an open scan: per-sample columns in memory, ``(N, C)`` layers as
    :class:`StoredRows` (read in blocks, so memory does not grow with N x C)."""

    meta: dict
    layers: list[str]
    layer: str
    mask_layer: str
    index: np.ndarray
    paths: np.ndarray
    usable: np.ndarray
    acts: StoredRows
    mask_acts: StoredRows
    artifact: np.ndarray
    classes: np.ndarray
    relevances: StoredRows | None

    @cached_property
    def row_of(self) -> dict[int, int]:
        return {int(i): r for r, i in enumerate(self.index)}


def _read_scan(scan: ScanFile, layer: str | None, concept: str | None, mask_layer: str | None,
               target: str | None) -> _ScanArrays:
    meta = scan.meta
    layers = list(meta["layers"])
    # a concept names its layer; otherwise the earliest scanned layer, where small artifacts
    # (text, markers) are still resolved after max-pooling (benchmarks/annotate_quality.py)
    concept_layer = concept.rpartition(":")[0] if concept is not None else ""
    layer = layer or concept_layer or layers[0]
    mask_layer = mask_layer or layers[0]
    for name in (layer, mask_layer):
        if name not in layers:
            raise UsageError(f"layer '{name}' is not in the scan (scanned: {', '.join(layers)})")
    return _ScanArrays(meta, layers, layer, mask_layer, scan.index(),
                       scan.paths(),  # recorded with the labels: which images they belong to
                       scan.good_rows(), scan.activations(layer), scan.activations(mask_layer), scan.artifacts(),
                       _task_classes(scan.labels(), target, list(meta["class_names"])),
                       scan.relevances(layer) if concept is not None else None)


def _task_classes(labels: np.ndarray, target: str | None, class_names: list[str]) -> np.ndarray:
    """The class of each row the masks' CAV is fitted within: ``labels`` (``(N,)`` ids, or
    ``(N, K)`` multi-hot: one class per combination), or for ``finding:NAME`` that finding's 0/1."""
    if target is None:
        return labels
    k = finding_index(target, class_names)
    if k is None or labels.ndim != 2:
        raise UsageError(f"--target {target}: annotate takes finding:NAME, and only on a multi-label scan")
    return labels[:, k]


@dataclass
class _Labelling:
    labels: np.ndarray
    scores: np.ndarray
    threshold: float
    direction: np.ndarray
    fit_rows: np.ndarray
    quality: dict


def _label_samples(scan: _ScanArrays, pos, negatives, from_column, new_cav, n_negatives, threshold, refine,
                   rng) -> _Labelling:
    """Steps 1-2 and the retrieval quality: CAV, scores, labels (see the module docstring)."""
    usable, acts, artifact = scan.usable, scan.acts, scan.artifact
    if from_column is not None:
        neg = np.intersect1d(np.flatnonzero(artifact == 0), usable)
    elif negatives:
        neg = _rows(negatives, scan.row_of, "negative")
    else:
        pool = np.setdiff1d(usable, pos)
        neg = rng.choice(pool, size=min(n_negatives, len(pool)), replace=False)
    if len(pos) < 2 or len(neg) < 2:
        raise UsageError(f"need at least 2 positive and 2 negative samples (got {len(pos)} and {len(neg)})")
    fit_rows = np.union1d(pos, neg)
    # only negatives a person named are forced to 0; random contrast rows may hold the concept too
    forced_neg = neg if negatives else np.zeros(0, int)
    cav = new_cav().fit_rows(acts, fit_rows, np.isin(fit_rows, pos).astype(int))
    scores = cav.score_rows(acts)
    held_out = np.setdiff1d(usable, fit_rows)
    thr = otsu_threshold(scores[usable]) if threshold == "auto" else float(threshold)
    labels = _label(scores, thr, pos, forced_neg, usable)
    for _ in range(refine):
        unl = np.setdiff1d(usable, np.flatnonzero(labels))
        refit_neg = rng.choice(unl, size=min(max(n_negatives, int(labels.sum())), len(unl)), replace=False)
        rows = np.union1d(np.flatnonzero(labels), refit_neg)
        cav = new_cav().fit_rows(acts, rows, labels[rows].astype(int))
        scores = cav.score_rows(acts)
        thr = otsu_threshold(scores[usable]) if threshold == "auto" else float(threshold)
        labels = _label(scores, thr, pos, forced_neg, usable)
    quality: dict = {}
    known = held_out[artifact[held_out] >= 0]
    if len(known):
        quality["retrieval_held_out"] = retrieval_quality(scores[known], artifact[known] == 1)
        quality["label_accuracy_held_out"] = float((labels[known] == (artifact[known] == 1)).mean())
    return _Labelling(labels, scores, thr, cav.direction_, fit_rows, quality)


def _paint_masks(scan: _ScanArrays, labels, mask_rows, new_cav, masking: MaskOptions, model, data, device,
                 batch_size, rng, on_progress) -> tuple[np.ndarray, dict]:
    """Step 3: ``(masks (M, H, W) bool, quality)`` for ``mask_rows``, from a CAV at the mask layer."""
    usable = scan.usable
    direction, scope = _mask_direction(new_cav, scan.mask_acts, usable, labels[usable], scan.classes[usable],
                                       masking.cav)
    reference_rows = None
    if masking.reference == "clean":
        clean = np.setdiff1d(usable, np.flatnonzero(labels))
        reference_rows = np.sort(rng.choice(clean, size=min(N_REFERENCE, len(clean)), replace=False))
    stack, quality = _masks(scan.meta, mask_rows, scan.index, scan.mask_layer, direction, model, data, device,
                            batch_size, masking.blur, masking.threshold, masking.dilate, on_progress,
                            first_rule=masking.rule, reference_rows=reference_rows,
                            complete=masking.complete == "saturated")
    return stack, {"mask_cav": scope, **quality}


def _selected_seeds(seeds, negatives, concept, from_column, cluster, reveal_json) -> list[int] | None:
    """The seed ids (a cluster's members for ``cluster``); checks that exactly one selection is given."""
    if sum(x is not None for x in (seeds, concept, from_column, cluster)) != 1:
        raise UsageError("give exactly one of --seeds, --concept, --cluster or --from-column")
    if cluster is not None:
        seeds = _cluster_members(cluster, reveal_json)
    both = sorted(set(seeds or []) & set(negatives or []))
    if both:
        raise UsageError(f"sample(s) {both} are both --seeds and --negatives")
    return seeds


def _cluster_members(cluster: int, reveal_json: str | Path | None) -> list[int]:
    if reveal_json is None or not Path(reveal_json).is_file():
        raise UsageError("--cluster needs --reveal pointing at the reveal.json written by `cxr-audit reveal`")
    clusters = {c["id"]: c for c in json.loads(Path(reveal_json).read_text()).get("clusters", [])}
    if cluster not in clusters:
        raise UsageError(f"cluster {cluster} is not in {reveal_json} (ids: {sorted(clusters)})")
    return clusters[cluster]["members"]


def _rows(ids, row_of, what) -> np.ndarray:
    missing = [i for i in ids if int(i) not in row_of]
    if missing:
        raise UsageError(f"{what} sample id(s) {missing} are not in the scan")
    return np.array(sorted({row_of[int(i)] for i in ids}), dtype=int)


def _positives(seeds, concept, from_column, row_of, artifact, relevances, layers, layer, usable) -> np.ndarray:
    if seeds is not None:
        return _rows(seeds, row_of, "seed")
    if from_column is not None:
        if from_column != "artifact":
            raise UsageError("--from-column supports 'artifact' (the manifest's 0/1 artifact column)")
        if (artifact[usable] < 0).all():
            raise UsageError("the scanned manifest has no 'artifact' column")
        return np.intersect1d(np.flatnonzero(artifact == 1), usable)
    name, _, channel = concept.rpartition(":")
    if name and name != layer:
        raise UsageError(f"--concept {concept}: pass --layer {name} to use a concept of that layer")
    try:
        c = int(channel)
    except ValueError:
        raise UsageError(f"--concept must be [LAYER:]CHANNEL, got '{concept}'") from None
    if not 0 <= c < relevances.shape[1]:
        raise UsageError(f"--concept channel {c} out of range (layer {layer} has {relevances.shape[1]})")
    k = max(5, len(usable) // 50)
    return usable[np.argsort(-relevances.read(usable, lambda block: block[:, c]))[:k]]


def _label(scores, thr, pos, neg, usable) -> np.ndarray:
    labels = np.zeros(len(scores), bool)
    labels[usable] = scores[usable] > thr
    labels[pos] = True
    labels[neg] = False
    return labels


MASK_RULES = ("upsample", "intensity", "zbox", "flat")
#: "clean": masks start from the concept presence in excess of its per-position median over
#: unlabelled samples (``presence_reference``); "none": from the raw presence (Pahde et al., 2025)
MASK_REFERENCES = ("clean", "none")
#: "saturated" (default): add the thin clipped-white/black structure a mask touches
#: (``complete_saturated``); "none": the relevance masks as painted
MASK_COMPLETIONS = ("saturated", "none")
N_REFERENCE = 64
#: "within-class": the mask CAV contrasts labelled and unlabelled samples of the same class (see
#: :mod:`cxr_audit.numerics.cav`); "across": over all samples, as Pahde et al. (2025)
MASK_CAVS = ("within-class", "across")


def _mask_direction(new_cav, acts: StoredRows, rows: np.ndarray, labels: np.ndarray, classes: np.ndarray,
                    scope: str) -> tuple[np.ndarray, str]:
    """``(C,)`` direction the masks are painted with (fitted on ``acts``' ``rows``; ``labels`` and
    ``classes`` aligned with them), and the scope actually used: within-class falls back to
    across classes when no class holds both labelled and unlabelled samples."""
    if scope == "within-class" and has_within_group_contrast(labels, classes):
        return new_cav().fit_rows(acts, rows, labels.astype(int), groups=classes).direction_, scope
    return new_cav().fit_rows(acts, rows, labels.astype(int)).direction_, "across"


def _masks(meta, rows, index, layer, direction, model, data, device, batch_size, blur, mask_threshold, dilate,
           on_progress, first_rule="upsample", reference_rows=None, complete=True):
    ckpt = Path(model or meta["checkpoint"])
    data = Path(data or meta["data"])
    if not ckpt.is_file():
        raise BadInputError(f"masks need the scanned model; {ckpt} is missing (pass --model)")
    if not data.exists():
        raise BadInputError(f"masks need the scanned data; {data} is missing (pass --data)")
    if meta.get("checkpoint_sha256") and file_sha256(ckpt) != meta["checkpoint_sha256"]:
        raise UsageError(f"--model {ckpt} is not the model the scan was made with ({meta['checkpoint']}): the CAV "
                         "comes from that model's activations, so masks painted with another would be wrong")
    dev = resolve_device(device)
    net, config = load_frozen(ckpt, dev)
    prep = preprocessing_of(config)
    manifest = load_manifest(data, class_names=config["class_names"])
    attribution = create_method("lrp", net, config["arch"], prep)
    if hasattr(attribution, "first_rule"):  # LRP on VGG/ResNet; other architectures keep their input rule
        attribution.first_rule = first_rule
    capture = attribution.capture([layer])
    dataset = CxrDataset(manifest, prep)
    sigma = blur if blur is not None else 1.5 * prep.size / 64
    v = torch.from_numpy(direction)
    masks = np.zeros((len(rows), prep.size, prep.size), bool)
    ious, hits = [], []
    with attribution.rules(), capture.attached(attribution.model):
        reference = None
        if reference_rows is not None and len(reference_rows):
            chunks = [reference_rows[i:i + batch_size] for i in range(0, len(reference_rows), batch_size)]
            presence = [presence_reference(attribution, capture, _batch(dataset, index, c)["image"].to(dev), layer, v)
                        for c in chunks]
            reference = torch.cat(presence).median(dim=0).values
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            batch = _batch(dataset, index, chunk)
            heat = concept_heatmaps(attribution, capture, batch["image"].to(dev), layer, v, reference).cpu().numpy()
            for j, h in enumerate(heat):
                mask = binarise(h, sigma, mask_threshold)
                if complete:
                    mask = complete_saturated(batch["image"][j].mean(0).numpy(), mask)
                masks[start + j] = binary_dilation(mask, iterations=dilate) if dilate > 0 else mask
                if "artifact_mask" in batch and batch.get("artifact") is not None and int(batch["artifact"][j]) == 1:
                    truth = batch["artifact_mask"][j, 0].numpy() > 0.5
                    ious.append(iou(masks[start + j], truth))
                    hits.append(pointing_hit(h, truth))
            if on_progress:
                on_progress(min(start + batch_size, len(rows)), len(rows), "masks")
    quality = {}
    if ious:
        quality["mask_iou"] = float(np.nanmean(ious))
        quality["pointing_game"] = float(np.mean(hits))
        quality["masks_with_truth"] = len(ious)
    return masks, quality


def _batch(dataset, index, rows) -> dict:
    """The collated dataset items of scan ``rows`` (mapped to manifest ids through ``index``)."""
    return collate([dataset[int(index[r])] for r in rows])


def _save(result: AnnotationResult, scan: _ScanArrays, scan_path, options: dict, labelling: _Labelling,
          labels: np.ndarray, masks: tuple, masks_dir) -> None:
    """The annotations file, and with ``masks_dir`` the mask PNGs, annotated manifest and contact
    sheet (:mod:`cxr_audit.annotate.outputs`); their paths go to ``result.files``."""
    mask_rows, mask_stack = masks
    # rows the scan skipped (--skip-bad) or never finished are unknown (-1), not "no artifact"
    stored = np.full(len(labels), -1, np.int8)
    stored[scan.usable] = labels[scan.usable]
    _write_h5(result.path, scan.meta, scan_path, options, (scan.index, scan.paths), labelling.scores, stored,
              labelling.threshold, labelling.direction, labelling.fit_rows, mask_rows, mask_stack, result.quality)
    if masks_dir is not None and mask_stack is not None:
        result.files.update(write_mask_outputs(Path(masks_dir), scan.meta, scan.index, stored, mask_rows, mask_stack,
                                               labelling.scores))
    result.files["annotations"] = result.path


def _write_h5(out, meta, scan_path, options, samples, scores, labels, thr, direction, fit_rows, mask_rows, masks,
              quality) -> None:
    """``samples``: the scan's ``(index, path)`` arrays, stored so readers can match labels to images."""
    record = {"scan": str(Path(scan_path).resolve()), "checkpoint": meta["checkpoint"], "data": meta["data"],
              "arch": meta["arch"], "layer": options["layer"], "method": options["method"], "threshold": thr,
              "options": options, "quality": quality, "created": now(), "versions": versions()}
    write_annotation_file(out, record, *samples, scores, labels, fit_rows, direction, masks, mask_rows)
