"""Counterfactual artifact augmentation: make the artifact independent of the class in the data
the model is fine-tuned on, by pasting it into images of the classes that lack it.

SPIRE (Plumb, Ribeiro & Talwalkar, 2022, "Finding and Fixing Spurious Patterns with
Explanations", TMLR, arXiv:2106.02112) fixes a spurious pattern found with explanations by
augmenting the training data until the pattern's co-occurrence with every label is the same;
A-ClArC (Anders et al., 2022) does the same in a layer's feature space. Here the pattern is the
annotated artifact, cut out of a random annotated sample by its mask (the pixels, as
Reveal-to-Revise's attack pastes them) and pasted into artifact-free training images.

Each artifact-free image of class ``c`` gets the artifact with probability
``q_c = (p* − p_c) / (1 − p_c)``, where ``p_c`` is the artifact's prevalence in class ``c`` and
``p*`` the level the classes meet at: after augmentation every class carries the artifact at
``p*``, so the artifact tells nothing about the class. At ``level=max`` (the largest prevalence)
the images of the artifact's own class stay as they were. At ``level=mean`` (the mean over the
classes) SPIRE's second counterfactual is used as well: the artifact is *removed* from images
of the classes above the level with probability ``r_c = (p_c − p*) / p_c``, its mask filled with
the same region of a random artifact-free training image, so the artifact's class also shows
its evidence without the artifact.
Every layer is fine-tuned (no strength to tune, no second derivative: the cost of plain
fine-tuning).
"""

from __future__ import annotations

import numpy as np
import torch

from cxr_audit.data.dataset import load_batch
from cxr_audit.data.manifest import Manifest
from cxr_audit.errors import UsageError
from cxr_audit.options import choice
from cxr_audit.unlearn.base import Context, Mitigation, task_labels

#: where the classes' artifact prevalences meet (see :func:`augmentation_rates`)
DEFAULT_LEVEL = "max"
#: refit the last layer (DFR) before fine-tuning
DEFAULT_HEAD_FIRST = False


def paste_probabilities(labels: np.ndarray, flags: np.ndarray, num_classes: int) -> np.ndarray:
    """``(K,)``: probability of pasting into an artifact-free image of each class so that every
    class ends with the largest class's artifact prevalence."""
    return augmentation_rates(labels, flags, num_classes, "max")[0]


def augmentation_rates(labels: np.ndarray, flags: np.ndarray, num_classes: int, level: str) -> tuple[np.ndarray, np.ndarray]:
    """``(paste (K,), remove (K,))``: per class, the probability of pasting the artifact into an
    artifact-free image and of removing it from an artifact image, so that every class ends
    with the same prevalence ``t``: the largest class prevalence (``level="max"``: paste only)
    or the mean over the classes present (``"mean"``: classes above it lose the artifact, classes
    below gain it). ``q_c = (t − p_c)/(1 − p_c)``, ``r_c = (p_c − t)/p_c``."""
    present = [c for c in range(num_classes) if (labels == c).any()]
    prevalence = np.array([flags[labels == c].mean() if c in present else 0.0 for c in range(num_classes)])
    target = prevalence.max() if level == "max" else prevalence[present].mean()
    paste = np.where(prevalence < target, (target - prevalence) / np.maximum(1 - prevalence, 1e-12), 0.0)
    remove = np.where(prevalence > target, (prevalence - target) / np.maximum(prevalence, 1e-12), 0.0)
    return paste, remove


class Augment(Mitigation):
    """Fine-tune with the annotated artifact pasted into artifact-free images (and, with
    ``level=mean``, cut out of artifact images) at the rates that equalise its prevalence across
    classes (see the module docstring). Options: ``donors`` — how many annotated artifact samples
    to cut artifacts from, and artifact-free samples to fill removed ones from (default 64);
    ``level`` — ``max`` (paste up to the largest class prevalence) or ``mean`` (meet at the mean).
    Multi-label models (``--target finding:NAME``): the finding's positives and negatives are the
    two classes."""

    name = "augment"
    needs = ("artifact_mask", "artifact_labels")
    multilabel = True
    option_types = {"donors": int, "level": str, "head_first": bool}

    def prepare(self, model, context: Context, loader):
        super().prepare(model, context, loader)
        if self.options.get("head_first", DEFAULT_HEAD_FIRST):
            # LP-FT (Kumar et al., 2022): a head that is wrong on the augmented data sends large
            # gradients into the features; refit it first (DFR on the same counterfactuals)
            from cxr_audit.unlearn.dfr import DFR

            head = DFR()
            head.prepare(model, context, loader)
            self.head_record = head.summary()
        data = context.data
        train = data.train_set
        flags = np.array([context.artifact.get(s.index, s.artifact or 0) for s in train.samples])
        if context.finding is None:
            labels, classes = np.array([s.label for s in train.samples]), list(train.class_names)
        else:  # multi-label: equalise the artifact between the finding's positives and negatives
            name = train.class_names[context.finding]
            labels, classes = np.array([int(context.finding in s.labels) for s in train.samples]), [f"not {name}", name]
        level = choice("augment level", self.options.get("level", DEFAULT_LEVEL), ("max", "mean"))
        paste, remove = augmentation_rates(labels, flags, len(classes), level)
        self.q, self.r = torch.from_numpy(paste).float(), torch.from_numpy(remove).float()
        rng = np.random.default_rng(data.seed)
        count = int(self.options.get("donors", 64))
        donors = _pick([s for s, f in zip(train.samples, flags) if f == 1 and s.artifact_mask is not None], count, rng)
        if not donors:
            raise UsageError("--method augment: no training sample labelled with the artifact has an artifact "
                             "mask to cut it from (artifact_mask column, or `cxr-audit annotate --masks DIR`)")
        batch = load_batch(Manifest(donors, train.class_names), data.prep)
        self.donor_images, self.donor_masks = batch["image"], batch["artifact_mask"]
        fills = _pick([s for s, f in zip(train.samples, flags) if f == 0], count, rng) if self.r.any() else []
        self.fill_images = load_batch(Manifest(fills, train.class_names), data.prep, with_masks=False)["image"] \
            if fills else None
        self.generator = torch.Generator().manual_seed(data.seed)
        self.record = {"level": level, "head_first": getattr(self, "head_record", None), "paste_probability": {classes[c]: float(p) for c, p in enumerate(self.q)},
                       "remove_probability": {classes[c]: float(p) for c, p in enumerate(self.r)},
                       "donors": len(donors), "fill_images": len(fills)}

    def forward(self, model, batch, x):
        flags = torch.tensor([self.context.artifact.get(int(i), 0) for i in batch["index"]])
        task = task_labels(batch["label"].cpu(), self.context.finding)
        paste = torch.rand(len(x), generator=self.generator) < self.q[task] * (flags == 0)
        if paste.any():
            pick = torch.randint(0, len(self.donor_images), (int(paste.sum()),), generator=self.generator)
            x = _blend(x, paste, self.donor_images[pick], self.donor_masks[pick])
        # drawn after the pastes, so that level=max keeps the random stream it always had
        remove = (torch.rand(len(x), generator=self.generator) < self.r[task] * (flags == 1)
                  if self.fill_images is not None else torch.zeros(len(x), dtype=torch.bool))
        if remove.any() and "artifact_mask" in batch:
            pick = torch.randint(0, len(self.fill_images), (int(remove.sum()),), generator=self.generator)
            x = _blend(x, remove, self.fill_images[pick], batch["artifact_mask"][remove])
        return model(x), None


def _pick(samples: list, count: int, rng: np.random.Generator) -> list:
    return [samples[i] for i in rng.permutation(len(samples))[:count]]


def _blend(x: torch.Tensor, rows: torch.Tensor, sources: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``x`` with the chosen ``rows (N,) bool`` replaced inside ``masks (n, 1, H, W)`` by
    ``sources (n, C, H, W)``, one per chosen row: an artifact pasted in, or an artifact covered by
    the same region of an artifact-free image."""
    out, chosen, mask = x.clone(), rows.to(x.device), masks.to(x)
    out[chosen] = x[chosen] * (1 - mask) + sources.to(x) * mask
    return out
