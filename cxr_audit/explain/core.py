"""One forward and one modified backward per batch: heatmap, pooled activations and channel
relevances together.

Shapes: ``x (N, C, H, W)``; heatmaps ``(N, H, W)``; per-layer activations/relevances ``(N, C)``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from cxr_audit.explain.capture import LayerCapture, channel_stats
from cxr_audit.explain.methods import AttributionMethod


@contextmanager
def parameters_frozen(model: torch.nn.Module) -> Iterator[None]:
    """No parameter of ``model`` requires grad inside the block (explanations need no weight
    gradients); each one's previous setting is restored after it."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


@dataclass
class BatchExplanation:
    logits: torch.Tensor  # (N, K)
    heatmaps: dict[str, torch.Tensor]  # target name -> (N, H, W)
    targets: dict[str, torch.Tensor]  # target name -> (N,)
    act_max: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> (N, C)
    act_mean: dict[str, torch.Tensor] = field(default_factory=dict)
    relevances: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> (N, C), first target


def initial_relevance(logits: torch.Tensor, targets: torch.Tensor, init: str = "logit") -> torch.Tensor:
    """Output relevance ``(N, K)``: the target logit (default) or a one-hot of the target."""
    onehot = torch.zeros_like(logits).scatter_(1, targets[:, None].long(), 1.0)
    if init == "logit":
        return onehot * logits.detach()
    if init == "onehot":
        return onehot
    raise ValueError(f"init must be 'logit' or 'onehot', got {init!r}")


def explain_batch(method: AttributionMethod, capture: LayerCapture, x: torch.Tensor,
                  targets: dict[str, torch.Tensor | None], init: str = "logit") -> BatchExplanation:
    """Explain ``x`` for each named target (``None`` = predicted class).

    Must run inside ``method.rules()`` and ``capture.attached(model)``. Layer relevances are
    recorded for the first target.
    """
    capture.reset()
    x = method.prepare_input(x)
    logits = method.model(x)
    if isinstance(logits, tuple):
        logits = logits[0]
    logits = logits.float()
    leaf = method.gradient_leaf(x)
    result = BatchExplanation(logits=logits.detach(), heatmaps={}, targets={})
    for layer in capture.layers:
        result.act_max[layer], result.act_mean[layer] = channel_stats(capture.outputs[layer])
    names = list(targets)
    for i, name in enumerate(names):
        tgt = targets[name] if targets[name] is not None else logits.argmax(1)
        tgt = tgt.to(logits.device)
        start = method.start_gradient(logits.detach(), initial_relevance(logits, tgt, init))
        (x_grad,) = torch.autograd.grad(logits, leaf, grad_outputs=start, retain_graph=i < len(names) - 1)
        result.heatmaps[name] = method.input_heatmap(x, x_grad, capture).detach().float()
        result.targets[name] = tgt.detach()
        if i == 0:
            for layer in capture.layers:
                if layer in capture.grads:
                    result.relevances[layer] = method.layer_relevance(capture.outputs[layer], capture.grads[layer])
    return result


def conditional_heatmaps(method: AttributionMethod, capture: LayerCapture, x: torch.Tensor, layer: str,
                         channel_mask: torch.Tensor, targets: torch.Tensor | None = None,
                         init: str = "logit") -> torch.Tensor:
    """CRP conditional heatmaps ``(N, H, W)``: relevance flowing only through the channels of
    ``layer`` selected by ``channel_mask`` (``(C,)`` or ``(N, C)``, 0/1 or weights).
    Must run inside ``method.rules()`` and ``capture.attached(model)`` with ``layer`` captured."""
    capture.reset()
    capture.channel_mask[layer] = channel_mask
    x = method.prepare_input(x)
    logits = method.model(x).float()
    tgt = logits.argmax(1) if targets is None else targets.to(logits.device)
    start = method.start_gradient(logits.detach(), initial_relevance(logits, tgt, init))
    (x_grad,) = torch.autograd.grad(logits, method.gradient_leaf(x), grad_outputs=start)
    heat = method.input_heatmap(x, x_grad, capture).detach()
    capture.channel_mask.pop(layer, None)
    return heat


def layer_attribution(method: AttributionMethod, capture: LayerCapture, x: torch.Tensor, layer: str,
                      start_relevance: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Heatmap ``(N, H, W)`` of a backward pass that *starts* at ``layer`` with relevance
    ``start_relevance(activation)`` (same shape as the activation), e.g. ``ReLU(a) * v`` for the
    pixel masks of a concept direction (Pahde et al., 2025). Must run inside both contexts."""
    capture.reset()
    x = method.prepare_input(x)
    method.model(x)
    act = capture.outputs[layer]
    start = start_relevance(act.detach()).to(act)
    (x_grad,) = torch.autograd.grad(act, method.gradient_leaf(x),
                                    grad_outputs=method.start_gradient(act.detach(), start))
    return method.input_heatmap(x, x_grad, capture).detach()
