"""Right for the Right Reasons (Ross, Hughes & Doshi-Velez, 2017, IJCAI, arXiv:1703.03717)."""

from __future__ import annotations

import torch

from cxr_audit.unlearn.base import Mitigation, target_logits


class RRR(Mitigation):
    """Input-gradient penalty inside the artifact mask: ``‖M ⊙ ∂(Σ_k log p_k)/∂x‖²`` summed over
    pixels and averaged over the batch (double back-propagation). Samples without an artifact
    have an all-zero mask and contribute nothing.

    Options: ``output`` — what is differentiated (``logprob`` as in the paper, or ``random``,
    ``target``, ``max``).
    """

    name = "rrr"
    double_backward = True
    needs = ("artifact_mask",)
    default_lambdas = (1e1, 1e2, 1e3, 1e4)

    def forward(self, model, batch, x):
        mask = batch.get("artifact_mask")
        if mask is None or not bool(mask.any()):
            return model(x), None
        x = x.detach().requires_grad_(True)
        logits = model(x)
        out = target_logits(logits.float(), batch["label"].to(x.device), self.options.get("output", "logprob"))
        (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        penalty = (mask.to(grad) * grad).pow(2).sum() / len(x)
        return logits, penalty
