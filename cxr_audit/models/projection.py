"""Shift a layer's activations along a concept direction (ClArC, Anders et al., 2022,
"Finding and removing Clever Hans", Information Fusion 77).

For activation ``a (N, C, H, W)`` (or tokens ``(N, T, C)``) and unit direction ``v (C,)``:
``a' = a + ((r - v·maxpool(a)) / v·v) v`` at every position, with ``r`` a reference value.
P-ClArC uses the clean-sample mean as ``r`` at inference (the projection is saved in the
checkpoint and re-installed by :func:`cxr_audit.models.registry.load_checkpoint`); A-ClArC uses
the artifact-sample mean on clean samples while fine-tuning.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from cxr_audit.numerics.tensors import pooled_max


def _broadcast(v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``(N, C)`` or ``(C,)`` shaped like the channel axis of ``a``."""
    if a.dim() == 4:
        return v[..., None, None]
    if a.dim() == 3:
        return v.unsqueeze(-2)
    return v


def shift_along(a: torch.Tensor, v: torch.Tensor, reference: float, select: torch.Tensor | None = None) -> torch.Tensor:
    """ClArC shift of ``a`` so that ``v·maxpool(a)`` becomes ``reference``; rows where ``select``
    ``(N,)`` is False are left unchanged."""
    v = v.to(a)
    delta = (reference - pooled_max(a) @ v) / (v @ v)  # (N,)
    if select is not None:
        delta = delta * select.to(a)
    return a + _broadcast(delta[:, None] * v, a)


class ConceptProjection:
    """A forward hook that applies :func:`shift_along` to every sample (P-ClArC), or only to the
    samples whose ``v·maxpool(a)`` exceeds ``threshold`` (reactive P-ClArC): the others — where
    the artifact is not detected — pass unchanged."""

    def __init__(self, direction: torch.Tensor, reference: float, threshold: float | None = None):
        self.direction = torch.as_tensor(direction, dtype=torch.float32)
        self.reference = float(reference)
        self.threshold = None if threshold is None else float(threshold)

    def __call__(self, _module, _inputs, output):
        select = None
        if self.threshold is not None:
            select = pooled_max(output) @ self.direction.to(output) > self.threshold
        return shift_along(output, self.direction, self.reference, select)


def install_projection(model: nn.Module, layer: str, direction, reference: float, threshold: float | None = None):
    """Register a :class:`ConceptProjection` on ``model.<layer>``; returns the hook handle."""
    hook = ConceptProjection(torch.as_tensor(direction), reference, threshold)
    return model.get_submodule(layer).register_forward_hook(hook)
