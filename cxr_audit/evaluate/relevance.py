"""Where relevance falls: the share inside a ground-truth artifact mask.

Artifact relevance share (as used by Reveal-to-Revise, Pahde et al., 2023, MICCAI) of a heatmap
``R`` and binary mask ``M``: ``sum(max(R, 0) * M) / sum(max(R, 0))`` (positive relevance only:
negative relevance is evidence *against* the class and would cancel out).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch.nn.functional as F

from cxr_audit.data.dataset import Preprocessing
from cxr_audit.data.io import read_mask
from cxr_audit.data.manifest import load_manifest
from cxr_audit.store.scan_file import ScanFile


def relevance_share(heatmaps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """``(N, S, S)`` heatmaps and same-shape masks (bool or fractional) -> ``(N,)`` positive share in mask."""
    pos = np.clip(heatmaps.astype(np.float64), 0, None)
    total = pos.sum(axis=(1, 2))
    inside = (pos * masks).sum(axis=(1, 2))
    return np.where(total > 0, inside / np.maximum(total, 1e-12), np.nan)


def scan_artifact_masks(scan_path: str | Path, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth artifact masks at heatmap resolution for scan rows that have one.

    Returns ``(rows, masks)`` with ``masks (len(rows), S, S)`` as area fractions in [0, 1].
    """
    with ScanFile(scan_path) as scan:
        meta, index = scan.meta, scan.index()
    manifest = load_manifest(meta["data"], class_names=meta["class_names"])
    prep = Preprocessing(**meta["preprocessing"])
    size = int(meta["heatmap_size"])
    rows = np.arange(len(index)) if rows is None else np.asarray(rows)
    keep, masks = [], []
    for r in rows:
        sample = manifest[int(index[r])]
        if sample.artifact_mask is None:
            continue
        m = prep.mask_to_tensor(read_mask(sample.artifact_mask))[None]
        masks.append(F.adaptive_avg_pool2d(m, size)[0, 0].numpy())
        keep.append(r)
    return np.array(keep, dtype=int), np.array(masks).reshape(-1, size, size)


def scan_artifact_share(scan_path: str | Path, target: str = "pred") -> dict:
    """Mean positive relevance share inside the artifact mask over the artifact samples of a scan,
    next to the mean mask area (the share a model that ignores the artifact would get)."""
    rows, masks = scan_artifact_masks(scan_path)  # rows ascending
    with ScanFile(scan_path) as scan:
        is_artifact = scan.artifacts()[rows] == 1
        rows, masks = rows[is_artifact], masks[is_artifact]
        if len(rows) == 0:
            return {"n": 0, "share": float("nan"), "mask_area": float("nan"), "per_sample": np.zeros(0), "rows": rows}
        heat = scan.heatmaps(target).read(rows).astype(np.float32)
    share = relevance_share(heat, masks)
    return {"n": int(len(rows)), "share": float(np.nanmean(share)), "mask_area": float(masks.mean()),
            "per_sample": share, "rows": rows}
