"""Faithfulness of prototype explanations: Average Drop and Average Increase (Chattopadhyay,
Sarkar, Howlader & Balasubramanian, 2018, "Grad-CAM++", WACV), as Gautam et al. (2023, PRP,
Pattern Recognition 136:109172) compare PRP with ProtoPNet's upsampled similarity maps.

For each image and each of its predicted class's top prototypes, the 50 % least relevant pixels
of the explanation are replaced by uniform noise over the input's intensity range and the
prototype's similarity score is measured again: ``Y`` before, ``O`` after.

    Average Drop     = 100 * mean(max(0, Y - O) / Y)   (lower: the kept pixels carry the score)
    Average Increase = 100 * mean(O > Y)               (higher is better)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cxr_audit.data.dataset import Preprocessing
from cxr_audit.explain.capture import LayerCapture
from cxr_audit.explain.prp import prototype_explainer

#: share of pixels kept (the most relevant ones); the rest become noise
KEEP = 0.5


def average_drop_increase(before: np.ndarray, after: np.ndarray) -> tuple[float, float]:
    """``(AD, AI)`` in percent from scores before/after masking (any equal shapes, ``before > 0``)."""
    before, after = np.asarray(before, float).ravel(), np.asarray(after, float).ravel()
    if not len(before):
        return float("nan"), float("nan")
    drop = np.maximum(0.0, before - after) / np.maximum(before, 1e-12)
    return float(100 * drop.mean()), float(100 * (after > before).mean())


def keep_most_relevant(images: torch.Tensor, maps: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
                       generator: torch.Generator, keep: float = KEEP) -> torch.Tensor:
    """``images (N, C, H, W)`` with all but the ``keep`` share of pixels with the highest ``maps
    (N, H, W)`` replaced by uniform noise in ``[low, high]`` (``(C,)`` per channel)."""
    n, c, h, w = images.shape
    flat = maps.reshape(n, -1).float()
    kept = max(1, int(round(keep * h * w)))
    order = flat.argsort(1, descending=True)
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order[:, :kept], True).view(n, 1, h, w)
    u = torch.rand(images.shape, generator=generator).to(images)
    noise = low.reshape(1, c, 1, 1).to(images) + u * (high - low).reshape(1, c, 1, 1).to(images)
    return torch.where(mask, images, noise)


@dataclass
class PrototypeFaithfulness:
    """Per image and top prototype ``(N, k)``: the score, and the scores with only the most
    relevant half of the PRP map / of the upsampled similarity map kept."""

    score: np.ndarray
    prp: np.ndarray
    activation: np.ndarray

    @classmethod
    def concat(cls, parts: list["PrototypeFaithfulness"]) -> "PrototypeFaithfulness":
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("score", "prp", "activation")))

    def metrics(self) -> dict[str, float]:
        ad_prp, ai_prp = average_drop_increase(self.score, self.prp)
        ad_act, ai_act = average_drop_increase(self.score, self.activation)
        return {"prp_average_drop": ad_prp, "prp_average_increase": ai_prp,
                "activation_average_drop": ad_act, "activation_average_increase": ai_act}


def prototype_faithfulness(net: torch.nn.Module, arch: str, prep: Preprocessing, layer: str, images: torch.Tensor,
                           dev: torch.device, generator: torch.Generator, k: int = 3,
                           batch_size: int = 32) -> PrototypeFaithfulness:
    """:class:`PrototypeFaithfulness` of ``images (N, C, H, W)`` for a prototype model whose
    similarity maps are ``layer``'s output."""
    low, high = prep.bounds()
    capture = LayerCapture([layer])
    parts = []
    with prototype_explainer(net, arch, prep, layer) as explain:
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(dev)
            pe = explain(x, k)
            parts.append((pe.score.cpu(), *(_masked_scores(net, capture, layer, x, maps, pe.index, low, high,
                                                            generator) for maps in (pe.prp, pe.activation))))
    score, prp, act = (torch.cat([p[i] for p in parts]).numpy() for i in range(3))
    return PrototypeFaithfulness(score, prp, act)


def _masked_scores(net, capture, layer: str, x: torch.Tensor, maps: torch.Tensor, index: torch.Tensor,
                   low, high, generator) -> torch.Tensor:
    """``(N, k)`` each top prototype's score with only the most relevant half of its map ``maps
    (N, k, H, W)`` kept."""
    return torch.stack([_scores(net, capture, keep_most_relevant(x, maps[:, j], low, high, generator), layer,
                                index[:, j]) for j in range(index.shape[1])], 1)


def _scores(net, capture, x: torch.Tensor, layer: str, index: torch.Tensor) -> torch.Tensor:
    """``(N,)`` the similarity score of prototype ``index[n]`` on ``x[n]``."""
    with torch.no_grad(), capture.attached(net):
        net(x)
        scores = capture.outputs[layer].flatten(2).amax(2).float()
    return scores.gather(1, index[:, None].to(scores.device))[:, 0].cpu()
