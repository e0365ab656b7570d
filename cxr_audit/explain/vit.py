"""Conservative LRP for torchvision Vision Transformers, applied per module instance.

Follows CP-LRP (Ali et al., 2022, "XAI for Transformers: Better Explanations through Conservative
Propagation", ICML) and AttnLRP (Achtibat et al., 2024, ICML): the non-linear parts that break
relevance conservation are made locally linear by detaching them, then gradient x input equals
LRP-0 through the remaining linear map:

* LayerNorm: the standard deviation is detached (``(x - mean) / std.detach()``);
* attention: the softmax attention weights are detached (values still carry relevance);
* GELU: identity rule, ``x * (gelu(x) / x).detach()``.

Swaps happen on the *instances* of one model inside a context manager and are undone on exit:
no class is patched globally, so CNN explanations in the same process are unaffected.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F


class DetachedStdLayerNorm(nn.Module):
    def __init__(self, ln: nn.LayerNorm):
        super().__init__()
        self.ln = ln

    def forward(self, x):
        centred = x - x.mean(dim=-1, keepdim=True)
        std = torch.sqrt(centred.pow(2).mean(dim=-1, keepdim=True) + self.ln.eps).detach()
        out = centred / std
        if self.ln.weight is not None:
            out = out * self.ln.weight + self.ln.bias
        return out


class IdentityRuleGELU(nn.Module):
    def __init__(self, act: nn.Module):
        super().__init__()
        self.act = act

    def forward(self, x):
        with torch.no_grad():
            y = self.act(x)
            gate = torch.where(x.abs() > 1e-6, y / x.where(x.abs() > 1e-6, torch.ones_like(x)),
                               torch.full_like(x, 0.5))
        return x * gate


class DetachedSoftmaxAttention(nn.Module):
    """Drop-in for a ``batch_first`` ``nn.MultiheadAttention`` used as self-attention."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.mha = mha

    def forward(self, query, key, value, need_weights=False, **kwargs):
        m = self.mha
        n, t, d = query.shape
        h = m.num_heads
        q, k, v = F.linear(query, m.in_proj_weight, m.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (z.reshape(n, t, h, d // h).transpose(1, 2) for z in (q, k, v))
        weights = torch.softmax(q @ k.transpose(-2, -1) / (d // h) ** 0.5, dim=-1).detach()
        out = (weights @ v).transpose(1, 2).reshape(n, t, d)
        return m.out_proj(out), None


def _swap(parent: nn.Module, name: str, new: nn.Module, undo: list) -> None:
    old = parent[int(name)] if name.isdigit() else getattr(parent, name)
    undo.append((parent, name, old))
    if name.isdigit():
        parent[int(name)] = new
    else:
        setattr(parent, name, new)


@contextmanager
def vit_lrp_rules(model: nn.Module) -> Iterator[nn.Module]:
    """Within the context, ``model`` (a torchvision ``VisionTransformer``) propagates CP-LRP."""
    undo: list = []
    try:
        for block in model.encoder.layers:
            _swap(block, "ln_1", DetachedStdLayerNorm(block.ln_1), undo)
            _swap(block, "ln_2", DetachedStdLayerNorm(block.ln_2), undo)
            _swap(block, "self_attention", DetachedSoftmaxAttention(block.self_attention), undo)
            for i, sub in enumerate(block.mlp):
                if isinstance(sub, nn.GELU):
                    _swap(block.mlp, str(i), IdentityRuleGELU(sub), undo)
        _swap(model.encoder, "ln", DetachedStdLayerNorm(model.encoder.ln), undo)
        yield model
    finally:
        for parent, name, old in reversed(undo):
            if name.isdigit():
                parent[int(name)] = old
            else:
                setattr(parent, name, old)
