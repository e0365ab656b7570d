"""What ``annotate --masks DIR`` writes besides the annotations file: one PNG per mask at the
original image size, ``annotated.csv`` (the manifest with ``artifact`` and ``artifact_mask``
columns, readable by every command) and ``contact_sheet.png``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from cxr_audit.data.io import read_image
from cxr_audit.data.manifest import load_manifest


def write_mask_outputs(masks_dir, meta, index, labels, mask_rows, masks, scores) -> dict:
    """PNG per mask at the original image size, an annotated manifest and a contact sheet."""
    manifest = load_manifest(meta["data"], class_names=meta["class_names"])
    masks_dir.mkdir(parents=True, exist_ok=True)
    mask_path = {}
    for r, m in zip(mask_rows, masks):
        sample = manifest[int(index[r])]
        width, height = Image.open(sample.path).size if sample.path.suffix.lower() not in (".dcm", ".dicom") \
            else read_image(sample.path).shape[::-1]
        png = masks_dir / f"{int(index[r]):06d}.png"
        Image.fromarray(m.astype(np.uint8) * 255).resize((width, height), Image.NEAREST).save(png)
        mask_path[int(index[r])] = png
    label_of = {int(i): int(l) for i, l in zip(index, labels) if l >= 0}  # unknown rows: no artifact value
    annotated = [replace(s, artifact=label_of.get(s.index), artifact_mask=mask_path.get(s.index))
                 for s in manifest.samples]
    replace(manifest, samples=annotated).write(masks_dir / "annotated.csv")
    sheet = _contact_sheet(masks_dir / "contact_sheet.png", manifest, index, mask_rows, masks, scores, meta)
    return {"masks": masks_dir, "manifest": masks_dir / "annotated.csv", "contact_sheet": sheet}


def _contact_sheet(path, manifest, index, mask_rows, masks, scores, meta, n: int = 16) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cxr_audit.data.dataset import Preprocessing
    from cxr_audit.report.figures import save_figure

    prep = Preprocessing(**meta["preprocessing"])
    order = np.argsort(-scores[mask_rows])[:n]
    cols = min(8, len(order))
    fig, axes = plt.subplots((len(order) + cols - 1) // cols, cols, figsize=(1.6 * cols, 2.1 * ((len(order) + cols - 1) // cols)),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, k in zip(axes.ravel(), order):
        r = mask_rows[k]
        img = prep.image_to_tensor(read_image(manifest[int(index[r])].path))[0].numpy()
        ax.imshow(img, cmap="gray")
        ax.imshow(np.ma.masked_where(~masks[k], masks[k]), cmap="autumn", alpha=0.45)
        ax.set_title(f"#{index[r]}  {scores[r]:.2f}", fontsize=7)
    return save_figure(fig, path, "annotated samples (highest CAV score) with their masks", dpi=100)
