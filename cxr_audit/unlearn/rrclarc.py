"""Right Reason Class Artifact Compensation (Dreyer, Pahde, Anders, Samek & Lapuschkin, 2024,
"From Hope to Safety: Unlearning Biases of Deep Models via Gradient Penalization in Latent
Space", AAAI, arXiv:2308.09437)."""

from __future__ import annotations

import torch

from cxr_audit.numerics.tensors import spatial_mean
from cxr_audit.unlearn.base import Mitigation, require_grad_output, target_logits


class RRClArC(Mitigation):
    """Latent gradient penalty along the CAV ``v`` at ``layer``: ``mean_n (⟨∂ŷ_n/∂a_n, v⟩)²``.

    ``ŷ`` (option ``output``) is ``Σ_k s_k f_k`` with random signs redrawn every step (default,
    as Dreyer et al.), the target logit or the max logit. The projection is taken at every
    spatial position and averaged (``per_position=False`` averages the gradient over space
    first, as one can read the paper; a small artifact in a corner then barely moves that mean).
    By default everything up to and including the CAV layer is frozen: fine-tuning all layers
    lets the network re-encode the artifact in other directions (measured, DESIGN.md).
    """

    name = "rrclarc"
    double_backward = True
    needs = ("cav",)
    default_lambdas = (1e3, 1e4, 1e5, 1e6, 1e7)
    option_types = {"per_position": bool}
    freeze_by_default = True

    def prepare(self, model, context, loader):
        super().prepare(model, context, loader)
        self._store: dict = {}
        self._handle = require_grad_output(model.get_submodule(context.layer), self._store)
        self._generator = torch.Generator().manual_seed(int(self.options.get("seed", 0)))

    def forward(self, model, batch, x):
        logits = model(x)
        act = self._store.pop("act")
        out = target_logits(logits.float(), batch["label"].to(x.device), self.options.get("output", "random"),
                            self._generator)
        (grad,) = torch.autograd.grad(out.sum(), act, create_graph=True)
        v = self.context.cav.to(grad)
        if self.options.get("per_position", True):
            channel_axis = 1 if grad.dim() == 4 else -1
            along = torch.tensordot(grad.movedim(channel_axis, -1), v, dims=1)
            return logits, along.pow(2).mean()
        return logits, (spatial_mean(grad) @ v).pow(2).mean()

    def finish(self, model):
        self._handle.remove()
        return {}
