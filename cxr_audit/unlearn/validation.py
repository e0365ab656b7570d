"""The validation objective every ``unlearn`` run is chosen and judged on.

Higher is better: the mean of the balanced accuracy on the validation split and on the same split
with the artifact inserted into every image of the other classes (pasted from annotated training
samples by their masks) when artifact masks exist; otherwise worst-group accuracy; otherwise
accuracy. Balanced, so that a model that escapes the penalty by predicting one class for
everything (what too large a λ does) scores no better than chance.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cxr_audit.data.attack import artifact_class, paste_attack, victims
from cxr_audit.data.dataset import load_batch
from cxr_audit.data.manifest import Manifest
from cxr_audit.training.balance import group_ids
from cxr_audit.training.pipeline import batched_logits
from cxr_audit.unlearn.base import Context, task_labels, task_logits


class Validation:
    """The validation split, read once and held in memory: the sweep's objective (:meth:`score`)
    and its clean bound (:meth:`clean`). See the module docstring for the objective."""

    def __init__(self, train_set: Manifest, val_set: Manifest, prep, dev, context: Context, batch_size: int,
                 seed: int):
        batch = load_batch(val_set, prep, with_masks=False)
        self.finding = context.finding  # multi-label: judged on this finding as a binary task
        self.images, self.labels = batch["image"], task_labels(batch["label"], self.finding)
        self.dev, self.batch_size = dev, batch_size
        clean = torch.tensor([not context.artifact.get(s.index, s.artifact or 0) for s in val_set.samples])
        self.clean_rows = clean if clean.any() else torch.ones_like(clean)
        self.inserted = None
        if any(s.artifact == 1 and s.artifact_mask is not None for s in train_set.samples):
            positive = self.finding if self.finding is not None else artifact_class(train_set, context.artifact)
            targets = victims(val_set, positive)
            if len(targets):
                attacked = paste_attack(targets, train_set, prep, seed=seed)
                self.inserted = self.images.clone()
                self.inserted[torch.from_numpy(attacked.rows_in(val_set))] = attacked.images
        self.groups, _ = group_ids(val_set, context.artifact) if self.finding is None else (np.zeros(len(val_set)), [])
        if self.inserted is not None:
            self.description = "mean balanced accuracy on validation and artifact-inserted validation"
        elif len(np.unique(self.groups)) >= 2:
            self.description = "worst-group validation accuracy"
        else:
            self.description = "validation accuracy"

    def _logits(self, model, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return task_logits(batched_logits(model, images, self.dev, self.batch_size), self.finding)

    def logits(self, model) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(validation logits (N, K), artifact-inserted validation logits (N, K) or None)``."""
        return self._logits(model, self.images), None if self.inserted is None else self._logits(model, self.inserted)

    def score(self, model) -> float:
        return self.score_logits(*self.logits(model))

    def score_logits(self, logits: torch.Tensor, inserted: torch.Tensor | None = None) -> float:
        """The objective from the logits of :attr:`images` and :attr:`inserted` (methods that
        change only the head score candidates from cached features this way)."""
        pred = logits.argmax(1)
        if self.inserted is not None:
            return (balanced_accuracy(pred, self.labels) + balanced_accuracy(inserted.argmax(1), self.labels)) / 2
        hit = (pred == self.labels).numpy()
        if len(np.unique(self.groups)) >= 2:
            return float(min(hit[self.groups == g].mean() for g in np.unique(self.groups)))
        return float(hit.mean())

    def clean(self, model) -> tuple[float, float]:
        """``(cross-entropy, balanced accuracy)`` on the validation samples without the artifact."""
        return self.clean_logits(self._logits(model, self.images))

    def clean_logits(self, logits: torch.Tensor) -> tuple[float, float]:
        logits, labels = logits[self.clean_rows], self.labels[self.clean_rows]
        return float(F.cross_entropy(logits, labels)), balanced_accuracy(logits.argmax(1), labels)

    def summary(self, model) -> dict[str, float]:
        """The figures ``unlearn`` reports before and after: the objective, balanced accuracy on
        the artifact-free validation samples and on the artifact-inserted validation split."""
        logits, inserted = self.logits(model)
        out = {"objective": self.score_logits(logits, inserted), "clean_balanced_accuracy": self.clean_logits(logits)[1]}
        if inserted is not None:
            out["inserted_balanced_accuracy"] = balanced_accuracy(inserted.argmax(1), self.labels)
        return out


def balanced_accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean recall over the classes present: a model that collapses to one class scores 1/K."""
    return float(np.mean([(pred[labels == c] == c).float().mean().item() for c in labels.unique()]))
