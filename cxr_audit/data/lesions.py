"""A learnable label with ground truth on real chest X-rays: synthetic lesions in the lung field.

Real radiographs carry real anatomy (ribs, vessels, heart borders, exposure, the hospitals' own
cues), which is what a mitigation must keep while it removes a shortcut; but their real labels
come without ground truth of *where* the evidence is. Here half the images get a soft round
opacity (a "lesion") of random size, contrast and position inside an approximate lung field —
a label the model can only learn from the lungs, independent of the hospital. An artifact
injected afterwards (:mod:`cxr_audit.data.inject`) at a chosen prevalence in the lesion class is
then the only shortcut with a known answer.

The lung field is approximated by two ellipses at the standard positions of a frontal chest
film (no lung masks ship with the images); the ellipses are written as the ``mask`` column.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from cxr_audit.data.io import read_image, write_png
from cxr_audit.data.manifest import load_manifest, write_manifest
from cxr_audit.errors import UsageError

CLASS_NAMES = ("clear", "lesion")


def lung_field(h: int, w: int) -> np.ndarray:
    """``(h, w)`` bool: two ellipses where the lungs lie on a frontal chest film."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy, xx = yy / h, xx / w
    left = ((xx - 0.31) / 0.15) ** 2 + ((yy - 0.47) / 0.27) ** 2 <= 1
    right = ((xx - 0.69) / 0.15) ** 2 + ((yy - 0.47) / 0.27) ** 2 <= 1
    return left | right


def add_lesion(image: np.ndarray, rng: np.random.Generator, contrast: tuple[float, float] = (0.30, 0.50),
               radius: tuple[float, float] = (0.05, 0.10)) -> np.ndarray:
    """``image (H, W)`` in [0, 1] with one Gaussian opacity centred in the lung field; its
    relative radius and peak brightness are drawn uniformly from ``radius`` and ``contrast``."""
    h, w = image.shape
    ys, xs = np.nonzero(lung_field(h, w))
    k = rng.integers(len(ys))
    r = rng.uniform(*radius) * min(h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    blob = np.exp(-((yy - ys[k]) ** 2 + (xx - xs[k]) ** 2) / (2 * r ** 2))
    return np.clip(image + rng.uniform(*contrast) * blob, 0, 1).astype(np.float32)


def make_lesion_set(data: str | Path, out_dir: str | Path, size: int = 128, fraction: float = 0.5, seed: int = 0,
                    contrast: tuple[float, float] = (0.30, 0.50),
                    on_progress: Callable[[int, int], None] | None = None) -> Path:
    """Write ``out_dir/manifest.csv``: every image of ``data`` resized to ``size``², a lesion in
    ``fraction`` of each split × source cell (label ``lesion``, else ``clear``), splits, sources
    and patients kept from ``data``, the lung-field ellipses as ``mask``. Returns the manifest."""
    if not 0 < fraction < 1:
        raise UsageError(f"the lesion fraction must be in (0, 1), got {fraction}")
    manifest = load_manifest(data)
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    field = lung_field(size, size)
    write_png(out / "lung_field.png", field)
    cells: dict[tuple[str, str], list[int]] = {}
    for i, s in enumerate(manifest.samples):
        cells.setdefault((s.split, s.source), []).append(i)
    sick = set()
    for rows in cells.values():
        sick.update(rng.permutation(rows)[:int(round(fraction * len(rows)))].tolist())
    out_rows = []
    for i, s in enumerate(manifest.samples):
        gray = read_image(s.path)
        gray = np.asarray(Image.fromarray((gray * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR),
                          np.float32) / 255.0
        if i in sick:
            gray = add_lesion(gray, rng, contrast)
        name = f"images/{i:05d}.png"
        write_png(out / name, gray)
        out_rows.append({"path": name, "label": CLASS_NAMES[i in sick], "source": s.source, "split": s.split,
                         "patient": s.extra.get("patient", ""), "mask": "lung_field.png"})
        if on_progress:
            on_progress(i + 1, len(manifest))
    write_manifest(out / "manifest.csv", out_rows)
    return out / "manifest.csv"
