"""Where a concept looks: the share of its CRP conditional relevance outside the lungs.

The evidence for a chest X-ray finding lies in the lungs; text stamps, markers, rulers, frames
and exposure borders lie outside. For a concept (channel ``c`` of ``layer``) and its top member
images, with lung mask ``L`` and conditional heatmap ``R_c`` (relevance flowing through ``c``
only; Achtibat et al., 2023, "From attribution maps to human-understandable explanations through
Concept Relevance Propagation", Nature Machine Intelligence):

    outside(c) = mean over members of  sum(max(R_c, 0) * (1 - L)) / sum(max(R_c, 0))
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cxr_audit.data.dataset import collate
from cxr_audit.explain import conditional_heatmaps, create_method
from cxr_audit.runtime import resolve_device
from cxr_audit.store.scan_file import ScanFile


def outside_lung_share(scan_path: str | Path, concepts: list[tuple[str, int, list[int]]],
                       device: str = "cpu", explained: int | None = None) -> list[float] | None:
    """``concepts``: ``(layer, channel, member manifest ids)``; returns one share per concept in
    [0, 1], or ``None`` when the scanned data has no lung masks (``mask`` column) or the model
    or data are not where the scan says. ``explained``: the output followed (default: predicted)."""
    dev = resolve_device(device)
    with ScanFile(scan_path) as scan:
        channels = {layer: scan.channels(layer) for layer in scan.meta["layers"]}
        scanned = scan.reopen(dev, lung_masks=True)
    if scanned is None:
        return None
    dataset = scanned.dataset
    attribution = create_method("lrp", scanned.net, scanned.config["arch"], scanned.prep)
    shares = []
    for layer, channel, ids in concepts:
        if not ids:
            shares.append(float("nan"))
            continue
        batch = collate([dataset[i] for i in ids])
        select = torch.zeros(channels[layer])
        select[channel] = 1.0
        capture = attribution.capture([layer])
        with attribution.rules(), capture.attached(attribution.model):
            targets = None if explained is None else torch.full((len(ids),), explained)
            heat = conditional_heatmaps(attribution, capture, batch["image"].to(dev), layer, select,
                                        targets=targets).cpu().numpy()
        shares.append(outside_share(heat, batch["mask"][:, 0].numpy()))
    return shares


def outside_share(relevance: np.ndarray, lungs: np.ndarray) -> float:
    """Mean over images of ``sum(max(R, 0) * (1 - L)) / sum(max(R, 0))`` for relevance ``R`` and lung
    masks ``L`` (``(n, H, W)`` each); images without positive relevance are left out (NaN if all)."""
    pos = np.clip(relevance, 0, None)
    total = pos.sum(axis=(1, 2))
    share = (pos * (1.0 - lungs)).sum(axis=(1, 2)) / np.maximum(total, 1e-12)
    return float(share[total > 0].mean()) if (total > 0).any() else float("nan")
