"""What the training loop adds to its cross-entropy: a :class:`LossTerm`.

:func:`cxr_audit.training.engine.fit` calls :meth:`LossTerm.prepare` once, :meth:`LossTerm.forward`
for every batch (``loss = CE + lambda_ * penalty``) and :meth:`LossTerm.finish` at the end. The
plain term adds nothing; ProtoPNet's cluster/separation costs
(:mod:`cxr_audit.training.protopnet`) and every mitigation of ``unlearn``
(:class:`cxr_audit.unlearn.base.Mitigation`) are subclasses. It lives here, below the stages, so
``train`` and ``unlearn`` share the loop without ``train`` importing ``unlearn``.

Shapes: ``x (N, C, H, W)``, ``logits (N, K)``, the penalty a scalar.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class LossTerm:
    """Plain cross-entropy: no penalty, no hooks."""

    name = "none"
    #: the penalty differentiates a gradient (double backprop): attention must then use the
    #: plain-math kernel, the fused CPU/flash kernels have no second derivative
    double_backward: bool = False
    #: the loader must read the manifest's ``mask``/``artifact_mask`` PNGs into every batch
    loads_masks: bool = False

    def prepare(self, model: nn.Module, context, loader) -> None:
        """Once before the first step: calibrate on the initial model, install hooks. ``context``
        is whatever the caller passed to ``fit`` (``unlearn``'s :class:`~cxr_audit.unlearn.base.Context`)."""
        self.context = context

    def forward(self, model: nn.Module, batch: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(logits (N, K), penalty scalar or None)`` for one training batch."""
        return model(x), None

    def finish(self, model: nn.Module) -> dict:
        """Remove training hooks; return what the checkpoint must record to rebuild the model, or ``{}``."""
        return {}
