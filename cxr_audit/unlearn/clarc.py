"""Class Artifact Compensation by activation shifts (Anders, Weber, Neumann, Samek, Müller &
Lapuschkin, 2022, "Finding and removing Clever Hans: using explanation methods to debug and
improve deep models", Information Fusion 77, arXiv:1912.11425)."""

from __future__ import annotations

import numpy as np
import torch

from cxr_audit.models.projection import shift_along
from cxr_audit.numerics.tensors import pooled_max
from cxr_audit.unlearn.base import Mitigation


@torch.no_grad()
def concept_scores(model, layer: str, cav: torch.Tensor, loader, max_batches: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``(scores (N,), manifest rows (N,))``: ``v·maxpool(a)`` at ``layer`` of the samples of
    ``loader`` (the first ``max_batches`` batches; model in eval mode)."""
    store: dict = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores, rows = [], []
    try:
        for b, batch in enumerate(loader):
            if max_batches is not None and b >= max_batches:
                break
            model(batch["image"].to(device))
            scores.append((pooled_max(store["a"]).float() @ cav.to(device)).cpu().numpy())
            rows.append(batch["index"].numpy())
    finally:
        handle.remove()
        model.train(was_training)
    return np.concatenate(scores), np.concatenate(rows)


def concept_references(model, layer: str, cav: torch.Tensor, loader, artifact: dict[int, int],
                       max_batches: int = 50) -> dict[str, float]:
    """Mean ``v·maxpool(a)`` over clean and over artifact samples of ``loader`` (model in eval mode)."""
    scores, rows = concept_scores(model, layer, cav, loader, max_batches)
    flags = np.array([artifact.get(int(i), 0) for i in rows])
    clean = scores[flags == 0].mean() if (flags == 0).any() else float(np.median(scores))
    art = scores[flags == 1].mean() if (flags == 1).any() else float(scores.max())
    return {"clean": float(clean), "artifact": float(art)}


class PClArC(Mitigation):
    """Projective ClArC: no training; at inference every sample's activation at ``layer`` is
    shifted so ``v·maxpool(a)`` equals the clean-sample mean. The projection is saved in the
    checkpoint and re-installed when it loads (any command can use the result)."""

    name = "pclarc"
    needs = ("cav",)
    trains = False
    edit_description = "computing the projection"

    def prepare(self, model, context, loader):
        super().prepare(model, context, loader)
        self.references = concept_references(model, context.layer, context.cav, loader, context.artifact)

    def finish(self, model):
        return {"projection": {"layer": self.context.layer, "direction": self.context.cav.tolist(),
                               "reference": self.references["clean"]}}


class ReactivePClArC(PClArC):
    """Reactive P-ClArC (Bareeva, Dreyer, Pahde, Samek & Lapuschkin, 2024, "Reactive Model
    Correction: Mitigating Harm to Task-Relevant Features via Conditional Bias Suppression",
    CVPR Workshops, arXiv:2404.09601): the projection acts only on samples in which the artifact
    is detected — ``v·maxpool(a)`` above the midpoint between the clean-sample and artifact-sample
    means — so images without the artifact keep every feature, including the class evidence
    that lies along the CAV (what makes plain P-ClArC cost clean accuracy). It acts at the deepest
    scanned layer by default, as the ClArC papers do (the last convolutional block); see
    docs/unlearn.md for the layer comparison."""

    name = "rpclarc"
    default_layer = "last"  # measured: at the earliest layer it removed nothing, at the last 88-100 %

    def finish(self, model):
        out = super().finish(model)
        out["projection"]["threshold"] = (self.references["clean"] + self.references["artifact"]) / 2
        return out


class AClArC(Mitigation):
    """Augmentive ClArC: while fine-tuning, clean samples get the artifact direction added at
    ``layer`` (shifted to the artifact-sample mean), so the artifact stops predicting the class.
    Layers up to ``layer`` are frozen by default (the shift is defined in their feature space)."""

    name = "aclarc"
    needs = ("cav", "artifact_labels")
    freeze_by_default = True

    def prepare(self, model, context, loader):
        super().prepare(model, context, loader)
        self.references = concept_references(model, context.layer, context.cav, loader, context.artifact)
        self._clean: torch.Tensor | None = None
        self._handle = model.get_submodule(context.layer).register_forward_hook(self._hook)

    def _hook(self, _module, _inputs, output):
        if self._clean is None:
            return output
        return shift_along(output, self.context.cav, self.references["artifact"], self._clean)

    def forward(self, model, batch, x):
        self._clean = torch.tensor([self.context.artifact.get(int(i), 0) == 0 for i in batch["index"]],
                                   device=x.device)
        try:
            return model(x), None
        finally:
            self._clean = None

    def finish(self, model):
        self._handle.remove()
        return {}
