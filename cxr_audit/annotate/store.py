"""Read what ``cxr-audit annotate`` wrote (``annotations.h5``) for the commands downstream."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr_audit.errors import BadInputError, UsageError
from cxr_audit.numerics.cav import make_cav
from cxr_audit.store.annotation_file import read_annotation_file
from cxr_audit.store.scan_file import ScanFile


@dataclass
class Annotations:
    path: Path
    layer: str
    cav: np.ndarray  # (C,) unit direction at ``layer``
    labels: dict[int, int]  # manifest row -> 0/1 (rows the scan skipped are absent)
    scores: dict[int, float]  # manifest row -> v · maxpool(a)
    scan: Path
    meta: dict
    paths: dict[int, str] | None = None  # manifest row -> absolute image path (None: an older file)

    def check_samples(self, samples) -> None:
        """Refuse ``samples`` (manifest :class:`~cxr_audit.data.manifest.Sample` s) whose rows these
        annotations label but whose image is another one: annotations of another data set."""
        paths = self.paths if self.paths is not None else _scan_paths(self.scan)
        if paths is None:
            return
        wrong = [s for s in samples if s.index in paths and str(Path(s.path).resolve()) != paths[s.index]]
        unlabelled = [s for s in samples if s.index not in paths]
        if wrong or unlabelled:
            s = (wrong or unlabelled)[0]
            seen = paths.get(s.index, "no row")
            raise UsageError(f"annotations {self.path} were made on other images: manifest row {s.index} is "
                             f"{s.path}, the annotations have {seen} ({len(wrong)} rows differ, "
                             f"{len(unlabelled)} missing); annotate the data you unlearn on")


def read_annotations(path: str | Path, layer: str | None = None, method: str | None = None,
                     within_class: bool = False) -> Annotations:
    """Load an annotations file.

    With ``layer`` or CAV ``method`` other than the annotation's, or ``within_class``, the CAV is
    refitted on the scan's max-pooled activations (the scan must exist) from the annotation's
    labels. ``within_class`` fits
    it only on samples of the class the artifact co-occurs with: when the artifact correlates
    with a label, a CAV fitted across classes also points along the class's real features, and
    unlearning it removes those too (measured on phantoms: RR-ClArC then collapses to one class).
    """
    contents = read_annotation_file(path)
    meta, index, labels, scores, cav, paths = (contents.meta, contents.index, contents.labels, contents.scores,
                                               contents.cav, contents.paths)
    own_layer = str(meta["layer"])
    scan = Path(str(meta["scan"]))
    layer = layer or own_layer
    method = method or str(meta.get("method", "signal"))
    if layer != own_layer or method != meta.get("method") or within_class:
        own = meta.get("options", {}).get("cav_options", {}) if method == meta.get("method") else {}
        cav = _refit(scan, layer, labels, make_cav(method, **own), within_class)
    known = labels >= 0  # -1: a row the scan skipped (--skip-bad) or did not finish
    return Annotations(contents.path, layer, cav.astype(np.float32),
                       dict(zip(index[known].tolist(), labels[known].tolist())),
                       dict(zip(index[known].tolist(), scores[known].tolist())), scan, meta,
                       dict(zip(index.tolist(), paths)) if paths is not None else None)


def _scan_paths(scan: Path) -> dict[int, str] | None:
    """Row -> path from the scan the annotations were made from (older annotation files)."""
    if not scan.is_file():
        return None
    with ScanFile(scan) as opened:
        return opened.paths_by_index()


def _refit(scan: Path, layer: str, labels: np.ndarray, estimator, within_class: bool) -> np.ndarray:
    """The CAV of ``labels`` at ``layer`` by ``estimator`` (a fresh :class:`~cxr_audit.numerics.cav.CAV`)."""
    if not scan.is_file():
        raise BadInputError(f"refitting the CAV needs the scan {scan}, which is missing")
    with ScanFile(scan) as opened:
        if not opened.has_layer(layer):
            raise UsageError(f"layer '{layer}' was not scanned (scanned: {', '.join(opened.meta['layers'])})")
        classes = opened.labels()
        rows = np.flatnonzero(labels >= 0)
        if within_class and classes.ndim == 1 and (labels == 1).any():
            known = labels >= 0
            prevalence = [(labels[(classes == c) & known] == 1).mean() if ((classes == c) & known).any() else 0
                          for c in range(classes.max() + 1)]
            in_class = np.flatnonzero((classes == int(np.argmax(prevalence))) & known)
            if 0 < labels[in_class].sum() < len(in_class) - 1:
                rows = in_class
        # read a block of rows at a time: memory O(block x C), not O(N x C)
        return estimator.fit_rows(opened.activations(layer), rows, labels[rows]).direction_
