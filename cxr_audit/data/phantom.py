"""Synthetic chest-X-ray-like phantoms with a learnable disease signal and lung masks.

Not anatomy, but enough structure for shortcut experiments: a body outline, two lungs with
rib shadows, a heart and spine, film noise; the ``disease`` class has soft opacities inside
the lungs. A small CNN learns the opacity; with an injected artifact it can learn the artifact
instead, which is what tests, benchmarks and the demo need.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from scipy.ndimage import gaussian_filter

from cxr_audit.data.io import write_png
from cxr_audit.data.manifest import write_manifest

CLASS_NAMES = ("healthy", "disease")


@dataclass
class Phantom:
    image: np.ndarray  # (S, S) float32 in [0, 1]
    lung_mask: np.ndarray  # (S, S) bool
    label: int


def make_phantom(size: int, diseased: bool, rng: np.random.Generator, disease_strength: float = 0.15) -> Phantom:
    """One phantom of ``size x size`` pixels; ``diseased`` adds 1–3 lung opacities of peak
    brightness ``disease_strength`` (lower = harder to learn, so shortcuts win more easily)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size  # normalised coordinates
    cx = 0.5 + rng.normal(0, 0.02)
    cy = 0.52 + rng.normal(0, 0.02)
    scale = rng.uniform(0.92, 1.05)

    def ellipse(x0, y0, rx, ry):
        return ((xx - x0) / (rx * scale)) ** 2 + ((yy - y0) / (ry * scale)) ** 2 <= 1.0

    img = np.full((size, size), 0.06, np.float32)
    body = ellipse(cx, cy + 0.05, 0.44, 0.52)
    img[body] = 0.50
    lung_l = ellipse(cx - 0.17, cy - 0.03, 0.13, 0.28)
    lung_r = ellipse(cx + 0.17, cy - 0.03, 0.13, 0.28)
    lungs = lung_l | lung_r
    img[lungs] = 0.22
    # rib shadows: periodic bands over the lungs, slightly curved
    phase = rng.uniform(0, 2 * np.pi)
    ribs = 0.5 + 0.5 * np.sin(2 * np.pi * (yy + 0.35 * (xx - cx) ** 2) * 11 + phase)
    img = np.where(lungs, img + 0.10 * ribs ** 4, img)
    heart = ellipse(cx + 0.06, cy + 0.12, 0.13, 0.12)
    img[heart & body] = 0.58
    spine = (np.abs(xx - cx) < 0.035 * scale) & body
    img[spine] = np.maximum(img[spine], 0.62)
    lung_mask = lungs & ~heart
    if diseased:
        for _ in range(rng.integers(1, 4)):
            ys, xs = np.nonzero(lung_mask)
            k = rng.integers(len(ys))
            r = rng.uniform(0.04, 0.08)
            blob = np.exp(-(((xx - xs[k] / size) ** 2 + (yy - ys[k] / size) ** 2) / (2 * r ** 2)))
            img = img + disease_strength * blob * lung_mask
    texture = gaussian_filter(rng.normal(0, 1, (size, size)), sigma=size / 40)
    img = img + 0.03 * texture / (texture.std() + 1e-8) + rng.normal(0, 0.015, (size, size))
    img = gaussian_filter(img, sigma=0.6)
    return Phantom(np.clip(img, 0, 1).astype(np.float32), lung_mask, int(diseased))


def generate_phantoms(out_dir: str | Path, n: int = 400, size: int = 128, seed: int = 0,
                      sources: int = 1, disease_strength: float = 0.15,
                      split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
                      on_progress: Callable[[int, int], None] | None = None) -> Path:
    """Write ``n`` phantoms (balanced classes), lung masks and ``manifest.csv`` under ``out_dir``.

    Columns: ``path,label,source,split,mask``; sources are ``site0..``; returns the manifest path.
    """
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    splits = _assign_splits(n, split_fractions, rng)
    rows = []
    for i in range(n):
        label = i % 2
        ph = make_phantom(size, bool(label), rng, disease_strength)
        name = f"phantom_{i:05d}.png"
        write_png(out / "images" / name, ph.image)
        write_png(out / "masks" / name, ph.lung_mask)
        rows.append({"path": f"images/{name}", "label": CLASS_NAMES[label],
                     "source": f"site{(i // 2) % sources}", "split": splits[i], "mask": f"masks/{name}"})
        if on_progress:
            on_progress(i + 1, n)
    write_manifest(out / "manifest.csv", rows)
    return out / "manifest.csv"


def _assign_splits(n: int, fractions: tuple[float, float, float], rng: np.random.Generator) -> list[str]:
    order = rng.permutation(n)
    n_train, n_val = int(round(fractions[0] * n)), int(round(fractions[1] * n))
    splits = [""] * n
    for rank, i in enumerate(order):
        splits[i] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    return splits
