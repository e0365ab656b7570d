"""Deep Feature Reweighting (Kirichenko, Izmailov & Wilson, 2023, "Last Layer Re-Training is
Sufficient for Robustness to Spurious Correlations", ICLR, arXiv:2204.02937).

The backbone of a model trained with a shortcut still encodes the core features; only the last
layer weighs the shortcut. DFR keeps the backbone and refits the last layer — an L1-regularised
logistic regression on the penultimate features — on data where the groups (class × artifact)
are balanced, so the artifact no longer predicts the class.

Balancing needs every group. With a shortcut the missing one is usually "another class *with*
the artifact" (the stamp appears only on disease images), and no reweighting can create it. So
the reweighting set is completed with counterfactuals: every training image without the
artifact is added once more with an artifact pasted in, cut by its mask out of a random
annotated artifact sample (the pixels, as Reveal-to-Revise's attack does). Without artifact
masks the counterfactual is made in feature space instead: the clean features plus the mean
difference between artifact and clean samples of the artifact's class.

Departures from the paper, and why: the reweighting set is the training split plus its
counterfactuals (DFR^Tr; the paper's DFR^Val needs a validation split with every group, which
these data rarely have); groups are equalised by sample weights over all samples instead of
averaging fits on balanced subsamples (the same expectation with less variance when the
smallest group has tens of samples); the regularisation C is chosen on ``unlearn``'s own
validation objective (artifact-inserted validation accuracy) instead of worst-group accuracy.

Multi-label models (``--target finding:NAME``): the groups are (has the finding) × artifact, and
only that finding's row of the head is refitted, as the binary logistic regression its
sigmoid output already is; the other findings' rows stay as they are.

Shapes: features ``(N, D)``, head weight ``(K, D)``, bias ``(K,)``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from cxr_audit.data.attack import artifact_class, paste_attack
from cxr_audit.data.dataset import CxrDataset, collate
from cxr_audit.data.manifest import Manifest
from cxr_audit.errors import UsageError
from cxr_audit.models.head import find_head, penultimate_features
from cxr_audit.training.balance import balanced_weights
from cxr_audit.unlearn.base import Context, Mitigation, task_labels, task_logits
from cxr_audit.unlearn.choice import choose


class DFR(Mitigation):
    """Refit the last linear layer on group-balanced penultimate features (with counterfactual
    artifact samples); the backbone is untouched. Option ``C``: fix the inverse L1 strength
    instead of choosing it from :attr:`C_GRID` on the validation objective."""

    name = "dfr"
    needs = ("artifact_labels",)
    trains = False
    multilabel = True
    C_GRID = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)  # the paper's grid
    option_types = {"C": float}
    strength_name = "C"
    edit_description = "refitting the last layer on group-balanced features"

    def prepare(self, model, context, loader):
        super().prepare(model, context, loader)
        data = context.data
        device = next(model.parameters()).device
        name, head = find_head(model, next(iter(loader))["image"][:2].to(device))
        features, labels, groups, how = reweighting_set(model, head, data.train_set, data.prep, context,
                                                        data.batch_size, data.seed)
        self.sweep, fits = [], {}
        validation, finding = data.validation, context.finding
        grid = [float(self.options["C"])] if "C" in self.options else list(self.C_GRID)
        val = None if validation is None else _validation_features(model, head, validation, device, data.batch_size)
        base = None if val is None else validation.clean_logits(task_logits(
            val[0] @ head.weight.detach().cpu().T + head.bias.detach().cpu(), finding))[1]
        for c in grid:
            if finding is None:
                weight, bias = fit_head(features, labels, groups, c, data.seed, head.out_features)
            else:
                weight, bias = fit_finding_row(features, labels, groups, c, data.seed, head, finding)
            fits[c] = (weight, bias)
            row = {"lambda": c}
            if val is not None:
                logits = [None if f is None else task_logits(f @ weight.T + bias, finding) for f in val]
                row.update(objective=validation.score_logits(*logits), clean_val_accuracy=validation.clean_logits(logits[0])[1],
                           start_clean_val_accuracy=base)
            self.sweep.append(row)
        self.chosen = grid[0] if len(grid) == 1 or val is None else choose(self.sweep)
        weight, bias = fits[self.chosen]
        with torch.no_grad():
            head.weight.copy_(weight.to(head.weight))
            if head.bias is not None:
                head.bias.copy_(bias.to(head.bias))
        self.record = {"head": name, "C": self.chosen, "counterfactual": how,
                       "groups": {f"{g}": int(n) for g, n in zip(*np.unique(groups, return_counts=True))}}


def reweighting_set(model: nn.Module, head: nn.Linear, train_set: Manifest, prep, context: Context, batch_size: int,
                    seed: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray, str]:
    """``(features (M, D), labels (M,), groups (M,) = 2·label + artifact, how)``: the training
    split plus one counterfactual with the artifact per artifact-free sample; ``how`` is
    ``"paste"`` (pixels, needs artifact masks) or ``"feature shift"``. Labels are the task's
    (:func:`task_labels`: has ``context.finding`` or not, for multi-label models)."""
    device = next(model.parameters()).device
    loader = DataLoader(CxrDataset(train_set, prep, with_masks=False), batch_size=batch_size, collate_fn=collate)
    feats, labels, index = [], [], []
    for batch in loader:
        feats.append(penultimate_features(model, head, batch["image"], device, batch_size))
        labels.append(task_labels(batch["label"], context.finding).numpy())
        index.append(batch["index"].numpy())
    feats, labels, index = torch.cat(feats), np.concatenate(labels), np.concatenate(index)
    flags = np.array([context.artifact.get(int(i), 0) for i in index])
    clean = np.flatnonzero(flags == 0)
    if context.has_artifact_masks:
        how = "paste"
        counter = []
        targets = [train_set.samples[i] for i in clean]
        for start in range(0, len(targets), 256):  # bounded memory: paste and embed in chunks
            chunk = Manifest(targets[start:start + 256], train_set.class_names)
            pasted = paste_attack(chunk, train_set, prep, seed=seed + start)
            counter.append(penultimate_features(model, head, pasted.images, device, batch_size))
        counter = torch.cat(counter)
    else:
        how = "feature shift"
        target = artifact_class(train_set, context.artifact) if context.finding is None else 1
        art, ref = (flags == 1) & (labels == target), (flags == 0) & (labels == target)
        if not art.any() or not ref.any():
            raise UsageError("--method dfr without artifact masks needs artifact and artifact-free samples of the "
                             "artifact's class; add masks (`cxr-audit annotate --masks DIR`)")
        counter = feats[clean] + (feats[art].mean(0) - feats[ref].mean(0))
    features = torch.cat([feats, counter])
    labels = np.concatenate([labels, labels[clean]])
    groups = 2 * labels + np.concatenate([flags, np.ones(len(clean), int)])
    return features, labels, groups, how


def fit_head(features: torch.Tensor, labels: np.ndarray, groups: np.ndarray, c: float, seed: int,
             num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight (K, D), bias (K,))`` of a group-balanced L1 logistic regression on standardised
    ``features``, folded back to act on raw features. Binary: logits ``∓ (w·x + b) / 2``."""
    present = np.unique(labels)
    coef, intercept = _group_balanced_logistic(features, labels, groups, c, seed)
    weight, bias = np.zeros((num_classes, features.shape[1])), np.full(num_classes, -1e4)
    if len(present) == 2:
        weight[present[0]], weight[present[1]] = -coef[0] / 2, coef[0] / 2
        bias[present[0]], bias[present[1]] = -intercept[0] / 2, intercept[0] / 2
    else:
        weight[present], bias[present] = coef, intercept
    return torch.from_numpy(weight).float(), torch.from_numpy(bias).float()


def fit_finding_row(features: torch.Tensor, labels: np.ndarray, groups: np.ndarray, c: float, seed: int,
                    head: nn.Linear, finding: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight (K, D), bias (K,))``: ``head`` with row ``finding`` refitted on the binary
    ``labels`` (has the finding) as a group-balanced L1 logistic regression, its sigmoid's logit."""
    if len(np.unique(labels)) < 2:
        raise UsageError("--method dfr: the training split has only one value of the finding; nothing to fit")
    coef, intercept = _group_balanced_logistic(features, labels, groups, c, seed)
    weight, bias = head.weight.detach().cpu().clone().float(), head.bias.detach().cpu().clone().float()
    weight[finding], bias[finding] = torch.from_numpy(coef[0]).float(), float(intercept[0])
    return weight, bias


def _group_balanced_logistic(features: torch.Tensor, labels: np.ndarray, groups: np.ndarray, c: float,
                             seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(coef (1 or K, D), intercept)`` of an L1 logistic regression on standardised features with
    every group of equal weight, folded back to act on the raw features."""
    from sklearn.linear_model import LogisticRegression

    x = features.double().numpy()
    mean, std = x.mean(0), x.std(0)
    std[std < 1e-8] = 1.0
    solver = "liblinear" if len(np.unique(labels)) == 2 else "saga"
    lr = LogisticRegression(C=c, l1_ratio=1.0, solver=solver, max_iter=2000, random_state=seed)
    lr.fit((x - mean) / std, labels, sample_weight=balanced_weights(groups))
    return lr.coef_ / std, lr.intercept_ - (lr.coef_ / std) @ mean


def _validation_features(model, head, validation, device, batch_size) -> list[torch.Tensor | None]:
    """Penultimate features of the validation images and of their artifact-inserted copies."""
    return [None if images is None else penultimate_features(model, head, images, device, batch_size)
            for images in (validation.images, validation.inserted)]
