"""Prototypical Relevance Propagation (PRP; Gautam, Höhne, Hansen, Jenssen & Kampffmeyer, 2023,
"This looks more like that: Enhancing self-explaining models by prototypical relevance
propagation", Pattern Recognition 136:109172, arXiv:2108.12204) for ProtoPNet
(:mod:`cxr_audit.models.protopnet`).

PRP explains one prototype's similarity score by LRP: the max-pool hands the score to the
winning position, the similarity function passes it on, and the squared-L2 distance layer hands
the relevance ``R_j`` of prototype ``j`` at a position to the ``D`` latent channels ``z_c`` there in
proportion to how *close* each channel is to the prototype:

    R_c = sum_j R_j * s_jc / sum_c' s_jc',   s_jc = 1 / ((z_c - p_jc)^2)^2 + eps

(the closeness weights of the authors' released implementation; relevance is conserved at every
position). Below that the add-on and the trunk follow the model's usual LRP composite. The same
rules make the logit-level ``lrp`` of a ProtoPNet its PRP explanation of the prediction.

ProtoPNet's own explanation, the prototype's similarity map upsampled to the image (Chen et al.,
2019), is :func:`prototype_explanations`' ``activation`` for comparison.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from zennit.core import Hook
from zennit.rules import Pass

#: keeps the closeness of an exactly matching channel finite (it then takes all the relevance)
CLOSENESS_EPS = 1e-12
#: prototypes whose (N, chunk, D, h, w) closeness weights are built at once
_CHUNK = 16


def prototype_relevance(z: torch.Tensor, prototypes: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """The PRP distance rule: ``z (N, D, h, w)``, ``prototypes (P, D, 1, 1)``, relevance of each
    prototype's distance map ``(N, P, h, w)`` -> relevance of ``z`` ``(N, D, h, w)``."""
    z = z.float()
    out = torch.zeros_like(z)
    for start in range(0, prototypes.shape[0], _CHUNK):
        p = prototypes[start:start + _CHUNK].float()[None, :, :, 0, 0, None, None]  # (1, c, D, 1, 1)
        closeness = 1.0 / ((z[:, None] - p).square().square() + CLOSENESS_EPS)  # (N, c, D, h, w)
        share = closeness / closeness.sum(2, keepdim=True)
        out += (share * relevance[:, start:start + _CHUNK, None].float()).sum(1)
    return out


class PrototypeDistanceRule(Hook):
    """zennit hook that applies :func:`prototype_relevance` to a ``PrototypeDistances`` module."""

    def forward(self, module, input, output):
        self.stored_tensors["input"] = input[0].detach()

    def backward(self, module, grad_input, grad_output):
        z = self.stored_tensors["input"]
        return (prototype_relevance(z, module.vectors.detach(), grad_output[0]).to(z.dtype),)

    def copy(self):
        return PrototypeDistanceRule()


def prp_rules() -> list:
    """``(module type, rule)`` pairs a composite puts before its defaults for a ProtoPNet."""
    from cxr_audit.models.protopnet import L2Similarity, PrototypeDistances

    return [(PrototypeDistances, PrototypeDistanceRule()), (L2Similarity, Pass())]


@dataclass
class PrototypeExplanations:
    """Per image the ``k`` prototypes of the predicted class with the highest similarity scores.

    ``index (N, k)`` prototype numbers, ``score (N, k)`` their similarity scores, ``prp (N, H, W)``
    per prototype as ``(N, k, H, W)`` input relevance summing to the score, ``activation (N, k, H, W)``
    the similarity map bilinearly upsampled to the image (ProtoPNet's own map)."""

    index: torch.Tensor
    score: torch.Tensor
    prp: torch.Tensor
    activation: torch.Tensor


def top_prototypes(model: nn.Module, scores: torch.Tensor, pred: torch.Tensor, k: int) -> torch.Tensor:
    """``(N, k)`` the predicted class's prototypes with the highest ``scores (N, P)``."""
    own = model.prototype_class.to(pred.device)[None, :] == pred[:, None]  # (N, P)
    k = min(k, int(own.sum(1).min()))
    return scores.masked_fill(~own, float("-inf")).topk(k, dim=1).indices


def prototype_explanations(method, capture, x: torch.Tensor, layer: str, k: int,
                           index: torch.Tensor | None = None) -> PrototypeExplanations:
    """PRP and upsampled-activation maps of the top-``k`` prototypes of each image's predicted class
    (or of the prototypes ``index (N, k)``).

    ``layer``: the similarity-map layer (``(N, P, h, w)`` output); must run inside ``method.rules()``
    and ``capture.attached(model)`` with ``layer`` captured. One forward, ``k`` backward passes."""
    capture.reset()
    x = method.prepare_input(x)
    logits = method.model(x)
    maps = capture.outputs[layer]  # (N, P, h, w)
    scores = maps.detach().flatten(2).amax(2).float()
    if index is None:
        index = top_prototypes(method.model, scores, logits.argmax(1), k)
    index = index.to(scores.device)
    flat = maps.detach().flatten(2)
    prp, activation = [], []
    for i in range(index.shape[1]):
        j = index[:, i]
        start = torch.zeros_like(flat)
        winner = flat[torch.arange(len(j)), j].argmax(1)
        start[torch.arange(len(j)), j, winner] = scores[torch.arange(len(j)), j].to(start.dtype)
        (grad,) = torch.autograd.grad(maps, method.gradient_leaf(x), retain_graph=i < index.shape[1] - 1,
                                      grad_outputs=method.start_gradient(maps.detach(), start.view_as(maps)))
        prp.append(method.input_heatmap(x, grad, capture).detach().float())
        own_map = maps.detach()[torch.arange(len(j)), j][:, None].float()
        activation.append(F.interpolate(own_map, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0])
    score = scores.gather(1, index)
    return PrototypeExplanations(index, score, torch.stack(prp, 1), torch.stack(activation, 1))


@contextmanager
def prototype_explainer(net: nn.Module, arch: str, prep, layer: str) -> Iterator[Callable[..., PrototypeExplanations]]:
    """Inside the block, ``explain(x, k=1, index=None)`` gives :func:`prototype_explanations` of ``x``
    on the frozen ``net`` (``layer``: its similarity maps); the LRP rules are on only during each
    call, so ``net`` forwards as itself in between."""
    from cxr_audit.explain.core import parameters_frozen
    from cxr_audit.explain.methods import create_method

    with parameters_frozen(net):
        method = create_method("lrp", net, arch, prep)
        capture = method.capture([layer])

        def explain(x: torch.Tensor, k: int = 1, index: torch.Tensor | None = None) -> PrototypeExplanations:
            with method.rules(), capture.attached(method.model):
                return prototype_explanations(method, capture, x, layer, k, index)

        yield explain
