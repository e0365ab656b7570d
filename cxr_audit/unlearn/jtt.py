"""Just Train Twice (Liu, Haghgoo, Chen, Raghunathan, Koh, Sagawa, Liang & Finn, 2021, "Just Train
Twice: Improving Group Robustness without Training Group Information", ICML, arXiv:2107.09044).

The first model's training errors are mostly the minority groups — here the samples the
shortcut gets wrong (the disease image without the stamp). JTT trains again with that error set
upsampled. The user's checkpoint is the first model (the paper's identification model), and the
second run fine-tunes it instead of training from scratch. It needs no artifact annotation at
all, which is its use: a shortcut nobody has named yet.

The paper tunes the upweighting factor λ_up; the default here gives the error set the same total
sampling mass as the rest (λ_up = #correct / #errors), one closed-form choice instead of a sweep
of full trainings. Option ``upweight`` sets λ_up directly.
"""

from __future__ import annotations

import numpy as np
import torch

from cxr_audit.unlearn.base import Mitigation


class JTT(Mitigation):
    """Fine-tune with the input model's misclassified training samples upsampled. With no
    training error it samples uniformly, i.e. it is plain fine-tuning (``--method none``)."""

    name = "jtt"
    option_types = {"upweight": float}

    def training_groups(self, model, context):
        errors = training_errors(model, context.data)
        self.record = {"error_set": int(errors.sum()), "train_samples": len(errors)}
        return errors.astype(int)

    def sample_weights(self, groups: np.ndarray) -> np.ndarray | None:
        """λ_up for the error set and 1 for the rest when ``upweight`` is set; else equal mass."""
        if "upweight" not in self.options:
            return None
        return np.where(groups == 1, self.options["upweight"], 1.0)


@torch.no_grad()
def training_errors(model, data) -> np.ndarray:
    """``(N,)`` bool: which training samples ``model`` misclassifies (eval mode)."""
    from cxr_audit.training.pipeline import predict  # training imports the engine, which imports this package

    was_training = model.training
    try:
        logits, labels = predict(model, data.train_set, data.prep, data.device, data.batch_size)
    finally:
        model.train(was_training)
    return (logits.argmax(1) != labels).numpy()
