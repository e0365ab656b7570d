"""Controlled artifacts: each inserts a shortcut into an image and returns its true mask.

An artifact is a small class with ``name`` and ``apply(image, rng) -> (image, mask)`` on
``(H, W)`` float images in [0, 1]; sizes are relative to the image so any resolution works.
Register new ones in :data:`ARTIFACTS`.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont


class Artifact:
    name = "artifact"

    def apply(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


def _corner_box(h: int, w: int, bh: int, bw: int, rng: np.random.Generator, band: float = 0.12):
    """Top-left (y, x) of a ``bh x bw`` box at a random position in a random corner band."""
    corner = rng.integers(4)
    my, mx = max(1, int(band * h) - bh), max(1, int(band * w) - bw)
    y = int(rng.integers(1, my + 1)) if corner < 2 else h - bh - int(rng.integers(1, my + 1))
    x = int(rng.integers(1, mx + 1)) if corner % 2 == 0 else w - bw - int(rng.integers(1, mx + 1))
    return max(0, y), max(0, x)


class TextStamp(Artifact):
    """A burned-in hospital tag / laterality marker: bright text in a corner band.
    The mask is the bounding box of the glyphs plus one pixel."""

    name = "text"

    def __init__(self, text: str = "L", rel_height: float = 0.2):
        self.text = text
        self.rel_height = rel_height

    def apply(self, image, rng):
        h, w = image.shape
        bh = max(8, int(self.rel_height * h))
        font = ImageFont.load_default(size=max(6, int(bh * 0.8)))
        left, top, right, bottom = font.getbbox(self.text)
        bw = min(w - 2, right - left + bh // 3)
        plate = Image.new("L", (bw, bh), 0)
        ImageDraw.Draw(plate).text(((bw - (right - left)) // 2 - left, (bh - (bottom - top)) // 2 - top),
                                   self.text, fill=255, font=font)
        y, x = _corner_box(h, w, bh, bw, rng)
        out = image.copy()
        glyphs = np.asarray(plate, np.float32) / 255.0
        out[y:y + bh, x:x + bw] = np.maximum(out[y:y + bh, x:x + bw], glyphs)
        ys, xs = np.nonzero(glyphs > 0.5)
        mask = np.zeros((h, w), bool)
        mask[max(0, y + ys.min() - 1):y + ys.max() + 2, max(0, x + xs.min() - 1):x + xs.max() + 2] = True
        return out, mask


class RoundMarker(Artifact):
    """A bright disc with a dark ring (ECG electrode / pacemaker-like) at a random chest position."""

    name = "marker"

    def __init__(self, rel_radius: float = 0.05):
        self.rel_radius = rel_radius

    def apply(self, image, rng):
        h, w = image.shape
        r = max(3.0, self.rel_radius * min(h, w))
        cy, cx = rng.uniform(0.2 * h, 0.8 * h), rng.uniform(0.2 * w, 0.8 * w)
        yy, xx = np.mgrid[0:h, 0:w]
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        out = image.copy()
        out[d <= r] = 1.0
        out[(d > 0.55 * r) & (d <= 0.75 * r)] = 0.35
        return out, d <= r


class Ruler(Artifact):
    """A measuring strip along the left or right edge: a bright line with tick marks."""

    name = "ruler"

    def __init__(self, rel_width: float = 0.05):
        self.rel_width = rel_width

    def apply(self, image, rng):
        h, w = image.shape
        sw = max(3, int(self.rel_width * w))
        x0 = int(rng.integers(1, max(2, w // 20))) if rng.random() < 0.5 else w - sw - int(rng.integers(1, max(2, w // 20)))
        y0, y1 = int(rng.uniform(0.1, 0.3) * h), int(rng.uniform(0.7, 0.9) * h)
        out = image.copy()
        out[y0:y1, x0:x0 + sw] = 0.1
        out[y0:y1, x0 + sw // 2] = 1.0
        step = max(2, h // 32)
        for y in range(y0, y1, step):
            out[y, x0:x0 + sw] = 1.0
        mask = np.zeros((h, w), bool)
        mask[y0:y1, x0:x0 + sw] = True
        return out, mask


class Frame(Artifact):
    """A bright collimation border around the image."""

    name = "frame"

    def __init__(self, rel_width: float = 0.04, value: float = 1.0):
        self.rel_width = rel_width
        self.value = value

    def apply(self, image, rng):
        h, w = image.shape
        b = max(2, int(self.rel_width * min(h, w)))
        mask = np.zeros((h, w), bool)
        mask[:b], mask[-b:], mask[:, :b], mask[:, -b:] = True, True, True, True
        out = image.copy()
        out[mask] = self.value
        return out, mask


class Pacemaker(Artifact):
    """A cardiac device: a solid bright can below a clavicle and a thin lead curving from it
    across the lung to the heart — thick and thin at once, and lying on the class evidence (the
    lung) where text, frames and rulers lie at the edges."""

    name = "pacemaker"

    def __init__(self, rel_size: float = 0.12, rel_lead: float = 0.012):
        self.rel_size, self.rel_lead = rel_size, rel_lead

    def apply(self, image, rng):
        from scipy.ndimage import binary_dilation

        h, w = image.shape
        side = min(h, w)
        half_h, half_w = max(2.0, 0.375 * self.rel_size * side), max(3.0, 0.5 * self.rel_size * side)
        left = rng.random() < 0.5
        cy = rng.uniform(0.12, 0.28) * h
        cx = rng.uniform(0.15, 0.30) * w if left else rng.uniform(0.70, 0.85) * w
        yy, xx = np.mgrid[0:h, 0:w]
        shape = np.abs((yy - cy) / half_h) ** 4 + np.abs((xx - cx) / half_w) ** 4  # a rounded rectangle
        can, battery = shape <= 1, shape <= 0.35
        end = np.array([rng.uniform(0.55, 0.68) * h, rng.uniform(0.45, 0.60) * w])  # the right ventricle
        bend = np.array([rng.uniform(0.30, 0.45) * h, (cx + end[1]) / 2 + rng.uniform(-0.1, 0.1) * w])
        t = np.linspace(0, 1, 4 * max(h, w))[:, None]
        points = (1 - t) ** 2 * np.array([cy, cx]) + 2 * (1 - t) * t * bend + t ** 2 * end  # quadratic Bézier
        lead = np.zeros((h, w), bool)
        lead[np.clip(points[:, 0].round().astype(int), 0, h - 1), np.clip(points[:, 1].round().astype(int), 0, w - 1)] = True
        thickness = int(round(self.rel_lead * side / 2))
        lead = binary_dilation(lead, iterations=thickness) if thickness else lead
        out = image.copy()
        out[can | lead] = 1.0
        out[battery] = 0.85  # the can's inner outline, as metal of another thickness shows
        return out, can | lead


class Brightness(Artifact):
    """A global exposure/contrast shift (scanner or processing difference); mask = whole image."""

    name = "brightness"

    def __init__(self, gain: float = 0.75, offset: float = 0.2):
        self.gain, self.offset = gain, offset

    def apply(self, image, rng):
        out = np.clip(self.gain * image + self.offset, 0, 1).astype(np.float32)
        return out, np.ones(image.shape, bool)


ARTIFACTS: dict[str, type[Artifact]] = {
    cls.name: cls for cls in (TextStamp, RoundMarker, Ruler, Frame, Pacemaker, Brightness)
}


def get_artifact(name: str, **kwargs) -> Artifact:
    from cxr_audit.options import choice

    return ARTIFACTS[choice("artifact", name, ARTIFACTS)](**kwargs)
