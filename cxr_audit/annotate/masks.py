"""Pixel masks from a concept direction (Pahde et al., 2025, "Ensuring Medical AI Safety:
Interpretability-Driven Detection and Mitigation of Spurious Model Behavior and Associated Data",
arXiv:2501.13818): LRP from a layer down to the input with initial relevance ``ReLU(a) ⊙ v``
(``v`` broadcast over space), positive part, Gaussian blur, then a threshold per image.

Thresholds (``benchmarks/annotate_quality.py`` compares them): ``peak`` keeps pixels above half
the blurred map's maximum (``peak:F``: above the fraction F; `annotate`'s default is
``peak:0.7``, docs/annotate.md); ``otsu`` (Pahde et al.'s choice) maximises between-class
variance; ``quantile`` keeps the top 5 %. On our phantoms Otsu over-segments small artifacts
(text, markers: concept relevance is diffuse and the artifact is a few dozen pixels, mask IoU
0.17-0.38) where ``peak`` reaches 0.48-0.67; Otsu is better for large thin ones (frames).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import binary_dilation, binary_erosion, gaussian_filter, label

from cxr_audit.errors import UsageError
from cxr_audit.explain.core import layer_attribution
from cxr_audit.numerics.threshold import otsu_threshold


def concept_presence(act: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Where the concept is: ``Σ_c ReLU(a)_c v_c`` per position, ``(N, C, H, W)`` -> ``(N, H, W)``
    (tokens: ``(N, T, C)`` -> ``(N, T)``)."""
    return _start(act, direction).sum(1 if act.dim() == 4 else -1)


def _start(act: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    v = direction.to(act)
    v = v[None, :, None, None] if act.dim() == 4 else v[None, None, :]
    return act.clamp(min=0) * v


def presence_reference(method, capture, x: torch.Tensor, layer: str, direction: torch.Tensor) -> torch.Tensor:
    """Concept presence maps ``(N, H, W)`` of reference (concept-free) images, forward only.
    Must run inside ``method.rules()`` and ``capture.attached(method.model)``."""
    capture.reset()
    with torch.no_grad():
        method.model(method.prepare_input(x))
    return concept_presence(capture.outputs[layer].detach(), direction)


def start_relevance(act: torch.Tensor, direction: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    """Relevance a concept's backward pass starts from, same shape as ``act``.

    Without ``reference``: ``ReLU(a) ⊙ v`` everywhere (Pahde et al., 2025). With ``reference`` (a
    presence map ``(h, w)`` / ``(T,)``, e.g. the median over clean images) each position is scaled so
    that its relevance sums to the presence *in excess of* the reference, ``(s − s_ref)⁺`` with
    ``s = Σ_c ReLU(a)_c v_c``: a concept direction's channels fire on ordinary anatomy too, and
    only the excess is the artifact."""
    r = _start(act, direction)
    if reference is None:
        return r
    dim = 1 if act.dim() == 4 else -1
    s = r.sum(dim, keepdim=True)
    excess = (s - reference.to(act).unsqueeze(0).unsqueeze(dim)).clamp(min=0)
    return torch.where(s > 0, r * excess / s.clamp(min=1e-12), torch.zeros_like(r))


def concept_heatmaps(method, capture, x: torch.Tensor, layer: str, direction: torch.Tensor,
                     reference: torch.Tensor | None = None) -> torch.Tensor:
    """``(N, H, W)`` relevance of the concept ``direction (C,)`` at ``layer`` (started by
    :func:`start_relevance`), clamped at 0. Must run inside ``method.rules()`` and
    ``capture.attached(method.model)``."""
    return layer_attribution(method, capture, x, layer,
                             lambda act: start_relevance(act, direction, reference)).clamp(min=0)


MASK_THRESHOLDS = ("peak", "otsu", "quantile")


def parse_threshold(threshold: str) -> tuple[str, float]:
    """``"peak"`` -> ``("peak", 0.5)``, ``"peak:0.3"`` -> ``("peak", 0.3)``; ``"otsu"``/``"quantile"`` as is."""
    name, _, value = threshold.partition(":")
    if name not in MASK_THRESHOLDS or (value and name != "peak"):
        raise UsageError(f"mask threshold must be one of {', '.join(MASK_THRESHOLDS)} (or peak:FRACTION), "
                         f"got '{threshold}'")
    try:
        fraction = float(value) if value else 0.5
    except ValueError:
        raise UsageError(f"mask threshold 'peak:{value}' needs a number, e.g. peak:0.3") from None
    if not 0 < fraction < 1:
        raise UsageError(f"peak fraction must be in (0, 1), got {fraction}")
    return name, fraction


def binarise(heatmap: np.ndarray, blur_sigma: float, threshold: str = "peak", quantile: float = 0.95,
             dilate: int = 0) -> np.ndarray:
    """``(H, W)`` non-negative concept heatmap -> bool mask (blur, threshold, dilation).
    ``threshold``: ``peak[:FRACTION]`` (pixels above FRACTION, default 0.5, of the blurred
    maximum), ``otsu`` or ``quantile``."""
    threshold, peak_fraction = parse_threshold(threshold)
    smooth = gaussian_filter(heatmap.astype(np.float64), sigma=blur_sigma) if blur_sigma > 0 else heatmap
    if smooth.max() <= 0:
        return np.zeros(heatmap.shape, bool)
    if threshold == "peak":
        cut = peak_fraction * float(smooth.max())
    elif threshold == "otsu":
        cut = otsu_threshold(smooth)
    else:
        cut = float(np.quantile(smooth, quantile))
    mask = smooth > cut
    if dilate > 0:
        mask = binary_dilation(mask, iterations=dilate)
    return mask


def complete_saturated(image: np.ndarray, mask: np.ndarray, tolerance: float = 0.05, saturation: float = 0.02,
                       max_area: float = 0.25, max_core: float = 0.25) -> np.ndarray:
    """Extend ``mask (H, W)`` by the thin saturated structure it touches in ``image (H, W)``.

    Burned-in artifacts — text, markers, rulers, collimation frames — are usually clipped to the
    image's maximum or minimum, while a concept's relevance covers only the part the model reads
    (two sides of a frame, one end of a ruler). If the mask's brightest (darkest) pixel lies
    within ``saturation`` × range of the image's maximum (minimum), the 8-connected components
    of pixels within ``tolerance`` × range of it that the mask touches are added, if they are
    *thin*: at most ``max_core`` of a component survives an erosion by
    :func:`thin_radius` pixels (strokes, strips and rings do not; on the two-hospital set the
    clipped-white components that did were abdomen or mediastinum, the anatomy this must not
    add). Nothing is added when the thin components together exceed ``max_area`` of the image."""
    if not mask.any():
        return mask
    lo, hi = float(image.min()), float(image.max())
    span = hi - lo
    if span <= 0:
        return mask
    inside = image[mask]
    radius = thin_radius(image.shape)
    for value, saturated in ((inside.max(), inside.max() >= hi - saturation * span),
                             (inside.min(), inside.min() <= lo + saturation * span)):
        if not saturated:
            continue
        similar = np.abs(image - value) <= tolerance * span
        components, _ = label(similar, structure=np.ones((3, 3), int))
        touched = np.unique(components[mask & similar])
        structure = np.zeros_like(mask)
        for component in (components == k for k in touched[touched > 0]):
            if binary_erosion(component, iterations=radius).sum() <= max_core * component.sum():
                structure |= component
        if structure.mean() <= max_area:
            return mask | structure
    return mask


def thin_radius(shape: tuple[int, ...]) -> int:
    """Erosion radius in pixels that removes a burned-in stroke or strip: 2 % of the shorter
    side, rounded up (3 px at 128 px, 5 px at 224 px; a phantom frame is 4 % wide)."""
    return max(1, int(np.ceil(0.02 * min(shape[-2:]))))
