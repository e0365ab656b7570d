"""The classifier head of any model: the linear layer whose output is the logits.

Found by a probe forward pass, not by names, so it works for every registered architecture and
for user factories (``fc`` in ResNet, ``classifier`` in DenseNet, ``classifier.6`` in VGG,
``heads.head`` in ViT). Last-layer methods (DFR) read the head's input — the penultimate
features — and rewrite its weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from cxr_audit.errors import UsageError


def find_head(model: nn.Module, example: torch.Tensor) -> tuple[str, nn.Linear]:
    """``(name, module)`` of the ``nn.Linear`` whose output equals ``model(example)``.

    Raises :class:`UsageError` when the logits are not a linear layer's output (e.g. a model
    that applies an activation or a projection after its last linear layer)."""
    outputs: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out))
               for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for name, out in reversed(list(outputs.items())):
        if out.shape == logits.shape and torch.equal(out, logits):
            return name, model.get_submodule(name)
    raise UsageError("this model's output is not the output of a linear layer, so its last layer cannot be "
                     "retrained; use a method that fine-tunes (e.g. --method rrclarc)")


@torch.no_grad()
def penultimate_features(model: nn.Module, head: nn.Linear, images: torch.Tensor, device: torch.device,
                         batch_size: int = 64) -> torch.Tensor:
    """``(N, D)`` float32 inputs of ``head`` for ``images (N, C, H, W)``, model in eval mode."""
    store: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _m, inputs: store.append(inputs[0].detach().float().cpu()))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(images), batch_size):
            model(images[start:start + batch_size].to(device))
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(store) if store else torch.zeros(0, head.in_features)
