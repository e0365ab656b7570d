"""The test set a block of images at a time, each block with its artifact-inserted copy.

A 20,000-image test set at 224 px with three channels is 12 GB of tensors, and its inserted copy
(images, clean images and masks of the victims) as much again; ``evaluate`` used to hold both.
Here at most :data:`EVAL_BLOCK` images (and their inserted copies) are in memory at once. The
inserted copies are the ones the whole set would get: one random stream per pass for drawn
artifacts (victims in test order), and for pasted ones every victim's donor drawn once up front
(:class:`~cxr_audit.data.attack.Paster`), so the figures do not depend on the block size and a
before/after pair sharing a preprocessing sees the very same images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from cxr_audit.data.attack import AttackedSet, Paster, inject_attack, is_victim
from cxr_audit.data.dataset import Preprocessing, load_batch
from cxr_audit.data.manifest import Manifest, load_manifest
from cxr_audit.errors import UsageError

EVAL_BLOCK = 256  # images per block: peak memory is set by this, not by the test set


@dataclass
class TestBlock:
    rows: np.ndarray  # (n,) positions in the test set
    batch: dict  # :func:`~cxr_audit.data.dataset.collate` of those samples: image (n, C, S, S), label, mask, ...
    attacked: AttackedSet | None  # the block's victims with the artifact inserted (None: no victims here)
    attacked_rows: np.ndarray  # (v,) their positions in the test set


class TestBlocks:
    """Iterate over ``test`` in blocks for one preprocessing; with ``target`` and an ``artifact``
    (injector name) or ``paste_from`` (annotated manifest), each block also carries its victims'
    inserted copies."""

    def __init__(self, test: Manifest, target: int | None, artifact: str | None, paste_from,
                 names: list[str], seed: int = 0, block: int | None = None):
        self.test, self.target, self.artifact, self.paste_from = test, target, artifact, paste_from
        self.names, self.seed, self.block = names, seed, block
        self.attacks = target is not None and bool(artifact or paste_from)
        self.victim_rows = np.array([r for r, s in enumerate(test.samples) if self.attacks and is_victim(s, target)],
                                    dtype=np.int64)
        if self.attacks and not len(self.victim_rows):
            raise UsageError("no test samples to attack (every test image already carries the artifact or is of "
                             "the artifact's class)")

    def __call__(self, prep: Preprocessing) -> Iterator[TestBlock]:
        size = self.block or EVAL_BLOCK
        insert = self._inserter(prep) if self.attacks else None
        done_victims = 0
        for start in range(0, len(self.test), size):
            rows = np.arange(start, min(start + size, len(self.test)))
            part = Manifest(self.test.samples[start:rows[-1] + 1], self.test.class_names, self.test.source_file,
                            self.test.multilabel)
            batch = load_batch(part, prep)
            hit = np.isin(rows, self.victim_rows) if insert else np.zeros(len(rows), bool)
            attacked = None
            if hit.any():
                victims = Manifest([s for s, h in zip(part.samples, hit) if h], part.class_names, part.source_file,
                                   part.multilabel)
                attacked = insert(victims, batch["image"][hit], done_victims)
                done_victims += len(victims)
            yield TestBlock(rows, batch, attacked, rows[hit])

    def _inserter(self, prep: Preprocessing):
        """``insert(victims, clean images, victims before them) -> AttackedSet`` for one pass."""
        if self.artifact:
            rng = np.random.default_rng(self.seed)  # one stream over the victims in test order
            return lambda victims, clean, first: inject_attack(victims, prep, self.artifact, rng=rng)
        donors = load_manifest(self.paste_from, class_names=self.names)
        paster = Paster(donors, prep, len(self.victim_rows), seed=self.seed)
        return paster.paste
