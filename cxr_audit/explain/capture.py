"""Capture layer outputs in the forward pass and their relevance in the backward pass.

Under an LRP composite the gradient that reaches a layer's output *is* that layer's relevance
(zennit's rules return relevance in place of the gradient); for gradient-based methods the
relevance is gradient x activation. A tensor hook on the output reads it, and can also rescale it
per channel, which is how CRP's conditional heatmaps are made (Achtibat et al., 2023,
"From attribution maps to human-understandable explanations through Concept Relevance
Propagation", Nature Machine Intelligence 5:1006).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn

from cxr_audit.errors import UsageError


def get_module(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        near = [n for n in modules if n and (n.startswith(name.split(".")[0]))][:8]
        raise UsageError(f"model has no layer '{name}'" + (f" (e.g. {', '.join(near)})" if near else ""))
    return modules[name]


class LayerCapture:
    """Holds, per layer name, the output tensor of the last forward and its backward gradient.

    ``channel_mask[layer]`` (shape ``(N, C)`` or ``(C,)``), when set before the backward pass,
    multiplies the gradient at that layer, i.e. keeps only the chosen concepts' relevance.
    """

    def __init__(self, layers: list[str]):
        self.layers = list(layers)
        self.outputs: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self.channel_mask: dict[str, torch.Tensor] = {}

    def _forward_hook(self, name: str):
        def hook(module, inputs, output):
            if isinstance(output, tuple):
                output = output[0]
            self.outputs[name] = output
            if output.requires_grad:
                output.register_hook(self._grad_hook(name))
        return hook

    def _grad_hook(self, name: str):
        def hook(grad):
            mask = self.channel_mask.get(name)
            if mask is not None:
                grad = grad * _broadcast_channels(mask, grad)
            self.grads[name] = grad
            return grad
        return hook

    @contextmanager
    def attached(self, model: nn.Module) -> Iterator["LayerCapture"]:
        """Register hooks (after any composite, so they see its wrapped outputs); remove on exit."""
        handles = [get_module(model, n).register_forward_hook(self._forward_hook(n)) for n in self.layers]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def reset(self) -> None:
        self.outputs.clear()
        self.grads.clear()
        self.channel_mask.clear()


def _broadcast_channels(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Shape a ``(C,)``/``(N, C)`` mask to multiply ``(N, C, H, W)`` or token ``(N, T, C)`` tensors."""
    mask = mask.to(like)
    if mask.dim() == 1:
        mask = mask.expand(like.shape[0], -1)
    if like.dim() == 4:
        return mask[:, :, None, None]
    if like.dim() == 3:
        return mask[:, None, :]
    return mask


def channel_stats(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Spatial (or token) max and mean per channel: ``(N, C, H, W)`` or ``(N, T, C)`` -> two ``(N, C)``."""
    out = output.detach().float()
    if out.dim() == 4:
        return out.amax(dim=(2, 3)), out.mean(dim=(2, 3))
    if out.dim() == 3:
        return out.amax(dim=1), out.mean(dim=1)
    return out, out


def sum_over_space(t: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` / ``(N, T, C)`` / ``(N, C)`` -> ``(N, C)``."""
    t = t.detach().float()
    if t.dim() == 4:
        return t.sum(dim=(2, 3))
    if t.dim() == 3:
        return t.sum(dim=1)
    return t
