"""Figures: images with their heatmaps overlaid (matplotlib, Agg backend, PNG out)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cxr_audit.data.dataset import Preprocessing
from cxr_audit.data.io import read_image
from cxr_audit.store.h5 import open_scan, read_meta


def heatmap_grid(scan_path: str | Path, rows: list[int], out_png: str | Path, target: str = "pred",
                 title: str = "") -> Path:
    """Save a 2 x len(rows) grid: input image (top) and its LRP heatmap (bottom, red = for the
    explained class, blue = against), each heatmap scaled to its own max |R|."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(int(r) for r in rows)
    with open_scan(scan_path) as f:
        meta = read_meta(f)
        paths = [p.decode() if isinstance(p, bytes) else p for p in f["samples/path"][rows]]
        heat = f[f"heatmaps/{target}"][rows].astype(np.float32)
        pred = f[f"targets/{target}"][rows]
        index = f["samples/index"][rows]
    prep = Preprocessing(**meta["preprocessing"])
    names = meta["class_names"]
    fig, axes = plt.subplots(2, len(rows), figsize=(1.8 * len(rows), 3.8), squeeze=False)
    for j, (path, h) in enumerate(zip(paths, heat)):
        img = prep.image_to_tensor(read_image(path))[0].numpy()
        axes[0, j].imshow(img, cmap="gray")
        axes[0, j].set_title(f"#{index[j]} → {names[pred[j]]}", fontsize=7)
        vmax = float(np.abs(h).max()) or 1.0
        axes[1, j].imshow(h, cmap="bwr", vmin=-vmax, vmax=vmax)
        for ax in axes[:, j]:
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
