"""Artifact-inserted test sets: the shortcut test of Reveal-to-Revise (Pahde et al., 2023, MICCAI).

Every test image of the classes the artifact does *not* point to gets the artifact; a model that
relies on it flips its prediction. Two ways to insert it:

* ``inject``: a registered artifact (:mod:`cxr_audit.data.artifacts`) drawn fresh on each image;
* ``paste``: for real artifacts with no injector, the artifact is cut out of an annotated sample
  by its mask and pasted onto the clean image (Reveal-to-Revise's "auto-attack").

Shapes: images ``(N, C, S, S)`` normalised as the model expects, masks ``(N, 1, S, S)`` in {0, 1}.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cxr_audit.data.artifacts import get_artifact
from cxr_audit.data.dataset import Preprocessing, load_batch
from cxr_audit.data.io import read_image
from cxr_audit.data.manifest import Manifest
from cxr_audit.errors import UsageError


@dataclass
class AttackedSet:
    images: torch.Tensor  # (N, C, S, S) with the artifact
    clean: torch.Tensor  # (N, C, S, S) the same images without it
    masks: torch.Tensor  # (N, 1, S, S) where the artifact is
    labels: torch.Tensor  # (N,)
    index: np.ndarray  # (N,) manifest rows

    def rows_in(self, manifest: Manifest) -> np.ndarray:
        """``(N,)`` positions of the attacked samples within ``manifest``'s samples (e.g. the test set)."""
        position = {s.index: r for r, s in enumerate(manifest.samples)}
        return np.array([position[int(i)] for i in self.index])


def artifact_class(manifest: Manifest, artifact: dict[int, int] | None = None) -> int:
    """The class whose samples carry the artifact most often (what the shortcut points to)."""
    counts = np.zeros(manifest.num_classes)
    totals = np.zeros(manifest.num_classes)
    for s in manifest.samples:
        flag = (artifact or {}).get(s.index, s.artifact or 0)
        for label in s.labels:  # every finding of a multi-label sample
            counts[label] += flag == 1
            totals[label] += 1
    if counts.sum() == 0:
        raise UsageError("no artifact samples to tell which class the artifact points to; pass --artifact-class")
    return int(np.argmax(counts / np.maximum(totals, 1)))


def is_victim(sample, target_class: int) -> bool:
    """Of another class (negative for the finding, multi-label) and without an artifact."""
    return target_class not in sample.labels and not sample.artifact


def victims(manifest: Manifest, target_class: int) -> Manifest:
    """The samples the attack is applied to (:func:`is_victim`)."""
    rows = [s for s in manifest.samples if is_victim(s, target_class)]
    return Manifest(rows, manifest.class_names, manifest.source_file, manifest.multilabel)


def inject_attack(test: Manifest, prep: Preprocessing, artifact: str, seed: int = 0,
                  rng: np.random.Generator | None = None) -> AttackedSet:
    """Draw ``artifact`` onto every sample of ``test`` (already the victims); ``rng`` (default: a
    fresh one from ``seed``) lets consecutive blocks of one test set continue one random stream."""
    art = get_artifact(artifact)
    rng = rng if rng is not None else np.random.default_rng(seed)
    images, clean, masks, labels = [], [], [], []
    for s in test.samples:
        gray = read_image(s.path)
        drawn, mask = art.apply(gray, rng)
        images.append(prep.image_to_tensor(drawn))
        clean.append(prep.image_to_tensor(gray))
        masks.append(prep.mask_to_tensor(mask))
        labels.append(s.label)
    return _stack(images, clean, masks, labels, test)


class Paster:
    """Pastes the masked region of a random donor (artifact samples with an ``artifact_mask``)
    onto each of ``n_victims`` images; the donors (at most ``max_donors``) and every victim's
    donor are drawn once from ``seed``, so a test set pasted block by block gets the same images."""

    def __init__(self, donors: Manifest, prep: Preprocessing, n_victims: int, seed: int = 0, max_donors: int = 64):
        donor_rows = [s for s in donors.samples if s.artifact == 1 and s.artifact_mask is not None]
        if not donor_rows:
            raise UsageError("pasting artifacts needs annotated artifact samples with masks (artifact=1 and an "
                             "artifact_mask column, e.g. the annotated.csv of `cxr-audit annotate --masks`)")
        if not n_victims:
            raise UsageError("no test samples to attack (every test image already carries the artifact or is of "
                             "the artifact's class)")
        rng = np.random.default_rng(seed)
        chosen = [donor_rows[i] for i in rng.permutation(len(donor_rows))[:max_donors]]
        self.donors = load_batch(Manifest(chosen, donors.class_names), prep)
        self.pick = torch.from_numpy(rng.integers(0, len(chosen), n_victims))

    def paste(self, test: Manifest, clean: torch.Tensor, first: int = 0) -> AttackedSet:
        """Attack ``test`` (victims ``first, first + 1, ...`` of the whole set) whose clean images are ``clean``."""
        pick = self.pick[first:first + len(test)]
        masks = self.donors["artifact_mask"][pick]
        images = clean * (1 - masks) + self.donors["image"][pick] * masks
        return AttackedSet(images, clean, masks, torch.tensor([s.label for s in test.samples]),
                           np.array([s.index for s in test.samples]))


def paste_attack(test: Manifest, donors: Manifest, prep: Preprocessing, seed: int = 0,
                 max_donors: int = 64) -> AttackedSet:
    """Paste a random donor's artifact onto every sample of ``test`` (:class:`Paster`)."""
    paster = Paster(donors, prep, len(test), seed, max_donors)
    return paster.paste(test, load_batch(test, prep, with_masks=False)["image"])


def _stack(images, clean, masks, labels, test) -> AttackedSet:
    if not images:
        raise UsageError("no test samples to attack (every test image already carries the artifact or is of "
                         "the artifact's class)")
    return AttackedSet(torch.stack(images), torch.stack(clean), torch.stack(masks), torch.tensor(labels),
                       np.array([s.index for s in test.samples]))
