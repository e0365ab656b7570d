"""The validation objective every ``unlearn`` run is chosen and judged on.

Higher is better: the mean of the balanced accuracy on the artifact-free validation images and on
the same images with the artifact inserted into every image of the other classes (pasted from
annotated training samples by their masks) when artifact masks exist — what `evaluate` reports
as clean and artifact-inserted accuracy; otherwise worst-group accuracy; otherwise accuracy.
Balanced, so that a model that escapes the penalty by predicting one class for everything (what
too large a λ does) scores no better than chance.

Artifact-free, because on validation images that carry the artifact the shortcut gives the right
answer: judged on them, a method that removes the shortcut looks worse than the input
(measured: reactive P-ClArC on a vgg11 with a marker closed 67–100 % of the test gap at no clean
cost and was refused). Validation rows the annotation did not label (its scan covered only the
training split) are labelled by the annotation's own CAV (:func:`cav_labels`), no class keeping
more artifact-free rows than its share in the annotated training split. When fewer than
:data:`MIN_CLEAN_PER_CLASS` artifact-free images of some class remain, every row is judged.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import torch
import torch.nn.functional as F

from cxr_audit.annotate.store import read_annotations
from cxr_audit.data.attack import artifact_class, paste_attack, victims
from cxr_audit.data.dataset import load_batch
from cxr_audit.data.manifest import Manifest
from cxr_audit.training.balance import group_ids
from cxr_audit.training.pipeline import batched_logits
from cxr_audit.unlearn.base import Context, task_class, task_labels, task_logits
from cxr_audit.unlearn.clarc import concept_scores

#: fewest artifact-free validation images per class for the objective to be judged on them alone
MIN_CLEAN_PER_CLASS = 5
#: balanced accuracy within this of chance (1/K) is chance, however many images it was measured on
CHANCE_MARGIN = 0.05
#: standard errors above chance a balanced accuracy must lie to count as signal (one-sided p < 0.05)
SIGNAL_Z = 1.645


class Validation:
    """The validation split, read once and held in memory: the sweep's objective (:meth:`score`)
    and its clean bound (:meth:`clean`). See the module docstring for the objective."""

    def __init__(self, train_set: Manifest, val_set: Manifest, prep, dev, context: Context, batch_size: int,
                 seed: int, batch: dict | None = None):
        if batch is None:  # `unlearn` passes the batch it read for the CAV labels: images read once
            batch = load_batch(val_set, prep, with_masks=False)
        self.finding = context.finding  # multi-label: judged on this finding as a binary task
        self.images, self.labels = batch["image"], task_labels(batch["label"], self.finding)
        self.dev, self.batch_size = dev, batch_size
        clean = torch.tensor([not context.artifact.get(s.index, s.artifact or 0) for s in val_set.samples])
        self.clean_rows = clean if clean.any() else torch.ones_like(clean)
        counts = [int((self.labels[self.clean_rows] == c).sum()) for c in self.labels.unique()]
        self.judged_rows = self.clean_rows if min(counts) >= MIN_CLEAN_PER_CLASS else torch.ones_like(clean)
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
            judged = "artifact-free " if not bool(self.judged_rows.all()) else ""
            self.description = f"mean balanced accuracy on {judged}validation and on it artifact-inserted"
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
            rows, labels = self.judged_rows, self.labels[self.judged_rows]
            return (balanced_accuracy(pred[rows], labels) + balanced_accuracy(inserted.argmax(1)[rows], labels)) / 2
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
        out = {"objective": self.score_logits(logits, inserted), "clean_balanced_accuracy": self.clean_logits(logits)[1],
               "clean_counts": [int(n) for n in self.labels[self.clean_rows].unique(return_counts=True)[1]]}
        if inserted is not None:
            rows = self.judged_rows
            out["inserted_balanced_accuracy"] = balanced_accuracy(inserted.argmax(1)[rows], self.labels[rows])
        return out


def at_chance(balanced: float, counts: list[int] | None, num_classes: int, tries: int = 1) -> bool:
    """Whether a balanced accuracy measured on ``counts`` images per class shows no signal: within
    :data:`CHANCE_MARGIN` of chance (``1/K``), or fewer than ``z`` standard errors above it, the
    error of a model whose predictions ignore the image (each class predicted with probability
    ``1/K``, so recall_c ~ Binomial(n_c, 1/K) / n_c):

        sd = sqrt(sum_c (1/K)(1 - 1/K) / n_c) / K_present

    ``z`` is :data:`SIGNAL_Z` (one-sided p < 0.05) for one measurement, and Šidák's
    ``Φ⁻¹((1 − 0.05)^(1/tries))`` for the best of ``tries`` candidates (a λ or C sweep picks the
    luckiest of its runs: measured, DFR's C sweep on a model at chance picked 0.619 of seven
    chance-level scores, just above the one-measurement bound 0.615).

    Why the test: artifact-free validation images of the artifact's class are few by construction
    (15 % of them at 85 % prevalence: 6–8 in the benchmark's splits), and a model that learned
    only the artifact scored 0.62 on them by luck (measured: pure-shortcut resnet18, test 0.53),
    which a fixed margin took for signal. The benchmark's models that had learned the label scored
    ≥ 2.6 sd above chance on their splits. ``counts`` ``None`` (figures recorded before the counts
    were): the margin only."""
    chance = 1 / num_classes
    if balanced <= chance + CHANCE_MARGIN:
        return True
    if not counts:
        return False
    sd = np.sqrt(sum(chance * (1 - chance) / max(n, 1) for n in counts)) / len(counts)
    return bool(balanced < chance + signal_z(tries) * sd)


def signal_z(tries: int = 1) -> float:
    """The one-sided z of p < 0.05 for the best of ``tries`` independent measurements (Šidák)."""
    return SIGNAL_Z if tries <= 1 else NormalDist().inv_cdf(0.95 ** (1 / tries))


def balanced_accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean recall over the classes present: a model that collapses to one class scores 1/K."""
    return float(np.mean([(pred[labels == c] == c).float().mean().item() for c in labels.unique()]))


def cav_labels(model, samples: Manifest, images: torch.Tensor, annotations, batch_size: int,
               known: dict[int, int], classes: list[int] | None = None,
               clean_share: dict[int, float] | None = None) -> dict[int, int]:
    """Artifact labels ``{manifest row: 0/1}`` for the ``samples`` not in ``known``, from their
    ``images (N, C, H, W)`` (in the order of ``samples``, as :func:`load_batch` reads them), by the
    annotation's own CAV: ``v · maxpool(a_layer) > t`` — the score `annotate` ranks by — with
    ``t`` the cut that best separates the annotation's own labels by its own scores (balanced
    accuracy); then, with ``classes`` (each sample's task class, in the same order) and
    ``clean_share`` (:func:`artifact_free_share` of the training split), no class keeps more
    artifact-free rows than its share allows (:func:`at_most_expected_clean`). ``{}`` when the
    model has no module of the annotation's layer."""
    todo = [i for i, s in enumerate(samples.samples) if s.index not in known]
    ann = read_annotations(annotations) if todo else None
    if ann is None or ann.layer not in dict(model.named_modules()) or not ann.scores:
        return {}
    rows = list(ann.scores)
    cut = best_cut(np.array([ann.scores[i] for i in rows]), np.array([ann.labels[i] for i in rows]))
    index = torch.tensor([samples.samples[i].index for i in todo])
    todo = torch.tensor(todo)
    batches = [{"image": images[todo[i:i + batch_size]], "index": index[i:i + batch_size]}
               for i in range(0, len(todo), batch_size)]
    scores, rows = concept_scores(model, ann.layer, torch.from_numpy(ann.cav), batches)  # in the order of todo
    labels = (scores > cut).astype(int)
    if classes is not None and clean_share:
        labels = at_most_expected_clean(labels, scores, np.array(classes)[todo.numpy()], clean_share)
    return {int(i): int(v) for i, v in zip(rows, labels)}


def at_most_expected_clean(labels: np.ndarray, scores: np.ndarray, classes: np.ndarray,
                           clean_share: dict[int, float]) -> np.ndarray:
    """``labels (N,)`` 0/1 with, in each class ``c``, at most ``floor(clean_share[c] · n_c)`` rows
    left 0 (artifact-free): those with the lowest ``scores``; the others become 1. Why: a CAV
    whose scores overlap between images with and without the artifact (measured: the text stamp
    at resnet18's ranking layer, real data, 85 % of the lesion class stamped) labels stamped
    images artifact-free — 4–11 of the 12–18 "artifact-free" lesion images of each seed's
    validation split carried the stamp — and on those the shortcut gives the right answer, so a
    model that learned only the artifact looked above chance (pure-shortcut vgg11: 0.675 on
    validation, 0.45 on the test) and its "fix" was kept. The training split's share says how many
    artifact-free images a class can hold; taking the lowest-scoring ones keeps the most certain.
    Classes not in ``clean_share`` are left as they are."""
    labels = labels.copy()
    for c, share in clean_share.items():
        rows = np.flatnonzero(classes == c)
        clean = rows[labels[rows] == 0]
        allowed = int(np.floor(share * len(rows) + 1e-9))
        if len(clean) > allowed:
            surplus = clean[np.argsort(scores[clean], kind="stable")[allowed:]]
            labels[surplus] = 1
    return labels


def artifact_free_share(samples: Manifest, artifact: dict[int, int], finding: int | None = None) -> dict[int, float]:
    """``{task class: share of its samples labelled without the artifact}`` over the ``samples``
    that ``artifact`` labels (the annotation's labels of the training split); the task class is
    the label (single-label) or 1/0 for having ``finding`` (multi-label)."""
    counts: dict[int, list[int]] = {}
    for s in samples.samples:
        if s.index in artifact:
            counts.setdefault(task_class(s, finding), []).append(artifact[s.index])
    return {c: 1 - float(np.mean(flags)) for c, flags in counts.items()}


def best_cut(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold ``t`` (between two sorted scores) for which ``scores > t`` has the highest
    balanced accuracy against 0/1 ``labels``; with one label only, beyond that label's scores."""
    positives, negatives = int(labels.sum()), int((labels == 0).sum())
    order = np.argsort(scores, kind="stable")
    s, y = scores[order], labels[order]
    if not positives or not negatives:
        return float(s[-1] + 1) if not positives else float(s[0] - 1)
    below_neg = np.concatenate([[0], np.cumsum(y == 0)])  # negatives below the cut at position k
    below_pos = np.concatenate([[0], np.cumsum(y == 1)])
    balanced = (below_neg / negatives + (positives - below_pos) / positives) / 2
    valid = np.concatenate([[True], s[1:] > s[:-1], [True]])  # never cut between equal scores
    k = int(np.argmax(np.where(valid, balanced, -1)))
    if k == 0:
        return float(s[0] - 1)
    if k == len(s):
        return float(s[-1] + 1)
    return float((s[k - 1] + s[k]) / 2)
