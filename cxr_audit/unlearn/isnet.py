"""ISNet heatmap loss (Bassi, Dertkigil & Cavalli, 2024, "Improving deep neural network
generalization and robustness to background bias via layer-wise relevance propagation
optimization", Nature Communications 15, arXiv:2202.00232)."""

from __future__ import annotations

import math

import torch

from cxr_audit.unlearn.base import Mitigation


def input_relevance(model, x: torch.Tensor, y: torch.Tensor, create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits (N, K), |R| (N, H, W))`` with ``R`` the LRP-0 heatmap of the true-class logit.

    For ReLU networks LRP-0 equals gradient × input (Ancona et al., 2018, ICLR), which is
    differentiable with one double-backward, so we use it instead of Bassi et al.'s dedicated
    LRP-ε/z+ backward implementation.
    """
    x = x.detach().requires_grad_(True)
    logits = model(x)
    picked = logits.float().gather(1, y.view(-1, 1).long()).sum()
    (grad,) = torch.autograd.grad(picked, x, create_graph=create_graph)
    return logits, (grad * x).sum(1).abs()


def gwrp(values: torch.Tensor, decay: float) -> torch.Tensor:
    """Global weighted ranked pooling ``Σ_i d^i v_(i) / Σ_i d^i`` over the last axis sorted
    descending: ``(N, P) -> (N,)``."""
    ranked = values.sort(dim=1, descending=True).values
    weights = decay ** torch.arange(values.shape[1], device=values.device, dtype=values.dtype)
    return (ranked * weights).sum(1) / weights.sum()


class ISNet(Mitigation):
    """Background relevance minimisation with foreground (lung) masks.

    Per sample: ``|R|`` is divided by its mean over the foreground; the background is pooled
    with GWRP (decay chosen so weights fall to 1 % at the top-5 % rank) and squashed as
    ``-log(1 - s/(1+s)) = log(1+s)``; a band loss keeps the foreground mean relevance in
    ``[C1, C2]`` (auto-calibrated from the initial model as Bassi et al. do: C1 = half, C2 = twice
    its median, so relevance cannot collapse to zero everywhere). The engine's
    ``CE + λ·L_heat`` equals Bassi et al.'s ``(1-P)·CE + P·L_heat`` up to scale with ``λ = P/(1-P)``.
    """

    name = "isnet"
    double_backward = True
    needs = ("mask",)
    default_lambdas = (0.1, 1.0, 10.0)
    inert_without_artifact = False  # the band term keeps acting when nothing lies outside the lungs

    def prepare(self, model, context, loader):
        super().prepare(model, context, loader)
        device = next(model.parameters()).device
        means = []
        for b, batch in enumerate(loader):
            if b >= 5:
                break
            _, rel = input_relevance(model, batch["image"].to(device), batch["label"].to(device), False)
            fg = batch["mask"][:, 0].to(rel)
            means.append((rel * fg).sum((1, 2)) / fg.sum((1, 2)).clamp_min(1))
        median = float(torch.cat(means).median().detach()) if means else 1.0
        self.band = (0.5 * median, 2.0 * median)

    def forward(self, model, batch, x):
        logits, rel = input_relevance(model, x, batch["label"].to(x.device), True)
        fg = batch["mask"][:, 0].to(rel)
        fg_mean = (rel * fg).sum((1, 2)) / fg.sum((1, 2)).clamp_min(1)
        background = (rel / (fg_mean[:, None, None] + 1e-8)) * (1 - fg)
        pixels = background.flatten(1)
        decay = math.exp(math.log(0.01) / max(1.0, 0.05 * pixels.shape[1]))
        loss_bg = torch.log1p(gwrp(pixels, decay))
        c1, c2 = (max(c, 1e-12) for c in self.band)
        loss_band = (torch.relu(c1 - fg_mean) / c1).pow(2) + (torch.relu(fg_mean - c2) / c2).pow(2)
        return logits, (loss_bg + loss_band).mean()
