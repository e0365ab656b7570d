"""Explanation-based learning from exemplary explanations (eXBL; Hagos, Curran & Mac Namee,
2023, "Learning Robust Models Using Exemplary Explanations")."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cxr_audit.errors import UsageError
from cxr_audit.unlearn.base import Mitigation, require_grad_output


class EXBL(Mitigation):
    """GradCAM triplet loss ``max(d(x⊙c(x), x⊙E_good) − d(x⊙c(x), x⊙E_bad) + margin, 0)``.

    ``c(x)`` is the Grad-CAM of the true class at ``cam_layer`` (built with ``create_graph`` so
    the loss trains the network), scaled to [0, 1] and upsampled; ``E_good`` and ``E_bad`` are
    one good and one bad exemplary explanation, ``(H, W)`` maps in [0, 1]: by default the mean
    foreground (lung) mask and the mean artifact mask of the training set, or PNGs the user
    drew (options ``good``/``bad``). ``d`` is the mean squared distance.
    """

    name = "exbl"
    double_backward = True
    needs = ("artifact_mask",)
    default_lambdas = (0.1, 1.0, 10.0)
    option_types = {"margin": float, "good": str, "bad": str}

    def prepare(self, model, context, loader):
        super().prepare(model, context, loader)
        layer = self.options.get("cam_layer") or context.options.get("cam_layer")
        if layer is None:
            raise UsageError("--method exbl needs --cam-layer for this architecture")
        self._store: dict = {}
        self._handle = require_grad_output(model.get_submodule(layer), self._store)
        good, bad = self.options.get("good"), self.options.get("bad")
        if good is None or bad is None:
            sums = {"mask": 0.0, "artifact_mask": 0.0}
            counts = {"mask": 0, "artifact_mask": 0}
            for b, batch in enumerate(loader):
                if b >= 20:
                    break
                for key in sums:
                    if key in batch:
                        chosen = batch[key].flatten(1).amax(1) > 0
                        sums[key] = sums[key] + batch[key][chosen, 0].sum(0)
                        counts[key] += int(chosen.sum())
            if good is None:
                good = sums["mask"] / counts["mask"] if counts["mask"] else 1 - sums["artifact_mask"] / max(counts["artifact_mask"], 1)
            if bad is None:
                if not counts["artifact_mask"]:
                    raise UsageError("--method exbl found no artifact masks to build the bad exemplary explanation")
                bad = sums["artifact_mask"] / counts["artifact_mask"]
        self.good, self.bad = torch.as_tensor(good).float(), torch.as_tensor(bad).float()
        self.margin = float(self.options.get("margin", 1.0))

    def forward(self, model, batch, x):
        logits = model(x)
        act = self._store.pop("act")
        picked = logits.float().gather(1, batch["label"].to(x.device).view(-1, 1).long()).sum()
        (grad,) = torch.autograd.grad(picked, act, create_graph=True)
        cam = F.relu((grad.mean((2, 3), keepdim=True) * act).sum(1, keepdim=True))
        cam = cam / cam.flatten(1).amax(1).clamp_min(1e-8)[:, None, None, None]
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
        anchor = x * cam
        good, bad = (x * e.to(x)[None, None] for e in (self.good, self.bad))
        d_good = (anchor - good).pow(2).flatten(1).mean(1)
        d_bad = (anchor - bad).pow(2).flatten(1).mean(1)
        return logits, torch.relu(d_good - d_bad + self.margin).mean()

    def finish(self, model):
        self._handle.remove()
        return {}
