"""Figures: images with their heatmaps overlaid (matplotlib, Agg backend, PNG out)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cxr_audit.data.dataset import Preprocessing
from cxr_audit.data.io import read_image
from cxr_audit.errors import BadInputError
from cxr_audit.store.scan_file import ScanFile


def show_heatmap(ax, heatmap: np.ndarray) -> None:
    """Draw a signed heatmap: red = for the explained class, blue = against, scaled to its max |R|."""
    vmax = float(np.abs(heatmap).max()) or 1.0
    ax.imshow(heatmap, cmap="bwr", vmin=-vmax, vmax=vmax)


def save_figure(fig, out_png: str | Path, title: str = "", dpi: int = 110) -> Path:
    """Title (optional), tight layout, write PNG (creating folders), close; returns the path."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=dpi)
    plt.close(fig)
    return out_png


def heatmap_grid(scan_path: str | Path, rows: list[int], out_png: str | Path, target: str = "pred",
                 title: str = "") -> Path:
    """Save a 2 x len(rows) grid: input image (top) and its LRP heatmap (bottom, red = for the
    explained class, blue = against), each heatmap scaled to its own max |R|."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(int(r) for r in rows)
    with ScanFile(scan_path) as scan:
        meta = scan.meta
        paths = scan.paths()[rows]
        heat = scan.heatmaps(target).read(np.array(rows, np.int64)).astype(np.float32)
        pred = scan.targets(target)[rows]
        index = scan.index()[rows]
    prep = Preprocessing(**meta["preprocessing"])
    names = meta["class_names"]
    fig, axes = plt.subplots(2, len(rows), figsize=(1.8 * len(rows), 3.8), squeeze=False)
    for j, (path, h) in enumerate(zip(paths, heat)):
        try:
            axes[0, j].imshow(prep.image_to_tensor(read_image(path))[0].numpy(), cmap="gray")
        except BadInputError:  # the data moved since the scan: the heatmap is still worth showing
            axes[0, j].text(0.5, 0.5, "image not found", ha="center", va="center", fontsize=7)
        axes[0, j].set_title(f"#{index[j]} → {names[pred[j]]}", fontsize=7)
        show_heatmap(axes[1, j], h)
        for ax in axes[:, j]:
            ax.axis("off")
    return save_figure(fig, out_png, title)


def concept_reference(scan_path: str | Path, layer: str, channel: int, ids: list[int], out_png: str | Path,
                      title: str = "", device: str = "cpu", explained: int | None = None) -> Path:
    """Reference images of one concept (relevance maximisation, Achtibat et al., 2023): for each
    sample id, the image, the CRP conditional heatmap (relevance flowing through ``channel`` of
    ``layer`` only) and a crop of the image around that heatmap's peak. Needs the scanned model
    and data (found through the scan's metadata). ``explained``: the output whose relevance is
    followed (default: the predicted class; a finding of a multi-label model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from cxr_audit.data.dataset import collate
    from cxr_audit.errors import BadInputError
    from cxr_audit.explain import conditional_heatmaps, create_method
    from cxr_audit.runtime import resolve_device

    dev = resolve_device(device)
    with ScanFile(scan_path) as scan:
        channels, scanned = scan.channels(layer), scan.reopen(dev)
    if scanned is None:
        raise BadInputError(f"concept reference images need the scanned model and data, which moved since {scan_path}")
    net, config, prep = scanned.net, scanned.config, scanned.prep
    batch = collate([scanned.dataset[i] for i in ids])
    attribution = create_method("lrp", net, config["arch"], prep)
    capture = attribution.capture([layer])
    mask = torch.zeros(channels)
    mask[channel] = 1.0
    with attribution.rules(), capture.attached(attribution.model):
        targets = None if explained is None else torch.full((len(ids),), explained)
        heat = conditional_heatmaps(attribution, capture, batch["image"].to(dev), layer, mask,
                                    targets=targets).cpu().numpy()
    images = batch["image"][:, 0].numpy()
    fig, axes = plt.subplots(3, len(ids), figsize=(1.7 * len(ids), 5.4), squeeze=False)
    side = prep.size // 3
    for j, (img, h) in enumerate(zip(images, heat)):
        axes[0, j].imshow(img, cmap="gray")
        axes[0, j].set_title(f"#{ids[j]}", fontsize=7)
        show_heatmap(axes[1, j], h)
        y, x = np.unravel_index(int(np.argmax(h)), h.shape)
        y0, x0 = int(np.clip(y - side // 2, 0, prep.size - side)), int(np.clip(x - side // 2, 0, prep.size - side))
        axes[2, j].imshow(img[y0:y0 + side, x0:x0 + side], cmap="gray")
        for ax in axes[:, j]:
            ax.axis("off")
    return save_figure(fig, out_png, title)


def prototype_gallery(scan_path: str | Path, audits: list[dict], out_png: str | Path, device: str = "cpu",
                      title: str = "") -> Path | None:
    """One row per prototype: the training image it was projected onto with the patch boxed, the
    patch enlarged, and the prototype's PRP map on that image (:mod:`cxr_audit.explain.prp`).
    ``audits``: :func:`cxr_audit.reveal.prototypes.as_records` rows. ``None`` when the projected
    images are not in the scanned data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from matplotlib.patches import Rectangle

    from cxr_audit.data.dataset import CxrDataset, collate
    from cxr_audit.explain.prp import prototype_explainer
    from cxr_audit.models.architectures import spec_of
    from cxr_audit.models.registry import preprocessing_of

    with ScanFile(scan_path) as scan:
        manifest = scan.manifest()
        known = set() if manifest is None else {s.index for s in manifest.samples}
        shown = [a for a in audits if a["projected"].get("sample") in known]
        opened = scan.open_model(torch.device(device)) if shown else None
    if opened is None:
        return None
    net, config = opened
    prep = preprocessing_of(config)
    batch = collate([CxrDataset(manifest, prep, with_masks=False)[a["projected"]["sample"]] for a in shown])
    layer = spec_of(config["arch"]).prototype_layer
    with prototype_explainer(net, config["arch"], prep, layer) as explain:
        prp = explain(batch["image"].to(device), index=torch.tensor([[a["prototype"]] for a in shown])).prp[:, 0]
    fig, axes = plt.subplots(len(shown), 3, figsize=(5.4, 1.8 * len(shown)), squeeze=False)
    for row, (a, img, heat) in enumerate(zip(shown, batch["image"][:, 0].numpy(), prp.cpu().numpy())):
        y0, x0, y1, x1 = a["projected"]["box"]
        axes[row, 0].imshow(img, cmap="gray")
        axes[row, 0].add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="red", linewidth=1))
        flag = " FLAGGED" if a["flagged"] else ""
        axes[row, 0].set_title(f"p{a['prototype']} {a['class']}{flag}", fontsize=7)
        pad = max(y1 - y0, x1 - x0) // 2
        axes[row, 1].imshow(img[max(0, y0 - pad):y1 + pad, max(0, x0 - pad):x1 + pad], cmap="gray")
        axes[row, 1].set_title(f"{a['projected'].get('source')} / {a['projected'].get('label')}", fontsize=7)
        show_heatmap(axes[row, 2], heat)
        axes[row, 2].set_title("PRP", fontsize=7)
        for ax in axes[row]:
            ax.axis("off")
    return save_figure(fig, out_png, title)
