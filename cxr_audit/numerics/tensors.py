"""Layout helpers for activations and gradients of convolutional ``(N, C, H, W)`` and
transformer ``(N, T, C)`` layers."""

from __future__ import annotations

import torch


def spatial_mean(t: torch.Tensor) -> torch.Tensor:
    """``(N, C)`` from ``(N, C, H, W)`` (mean over space) or ``(N, T, C)`` (mean over tokens)."""
    if t.dim() == 4:
        return t.mean(dim=(2, 3))
    if t.dim() == 3:
        return t.mean(dim=1)
    return t


def pooled_max(a: torch.Tensor) -> torch.Tensor:
    """``(N, C)``: spatial max of ``(N, C, H, W)``, token max of ``(N, T, C)``; ``(N, C)`` as is."""
    if a.dim() == 4:
        return a.amax(dim=(2, 3))
    if a.dim() == 3:
        return a.amax(dim=1)
    return a
