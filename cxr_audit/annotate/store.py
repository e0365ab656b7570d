"""Read what ``cxr-audit annotate`` wrote (``annotations.h5``) for the commands downstream."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from cxr_audit.annotate.cav import make_cav
from cxr_audit.errors import BadInputError, UsageError


@dataclass
class Annotations:
    path: Path
    layer: str
    cav: np.ndarray  # (C,) unit direction at ``layer``
    labels: dict[int, int]  # manifest row -> 0/1
    scores: dict[int, float]  # manifest row -> v · maxpool(a)
    scan: Path
    meta: dict


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
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"annotations file not found: {path}")
    try:
        with h5py.File(path, "r") as f:
            meta = dict(f["meta"].attrs)
            if meta.get("schema") != "cxr-audit-annotations/1":
                raise BadInputError(f"{path} is not a cxr-audit annotations file (run `cxr-audit annotate`)")
            index = f["samples/index"][:]
            labels = f["labels"][:].astype(int)
            scores = f["scores"][:]
            own_layer = str(meta["layer"])
            cav = f[f"cav/{own_layer}"][:]
    except OSError as exc:
        raise BadInputError(f"cannot read annotations {path}: {exc}") from None
    scan = Path(str(meta["scan"]))
    layer = layer or own_layer
    method = method or str(meta.get("method", "signal"))
    if layer != own_layer or method != meta.get("method") or within_class:
        cav = _refit(scan, layer, labels, method, within_class)
    return Annotations(path, layer, cav.astype(np.float32), dict(zip(index.tolist(), labels.tolist())),
                       dict(zip(index.tolist(), scores.tolist())), scan,
                       {k: (json.loads(v) if k in ("options", "quality", "versions") else v) for k, v in meta.items()})


def _refit(scan: Path, layer: str, labels: np.ndarray, method: str, within_class: bool) -> np.ndarray:
    if not scan.is_file():
        raise BadInputError(f"refitting the CAV needs the scan {scan}, which is missing")
    with h5py.File(scan, "r") as f:
        if f"activations/{layer}/max" not in f:
            raise UsageError(f"layer '{layer}' was not scanned (scanned: {', '.join(f['activations'].keys())})")
        acts = f[f"activations/{layer}/max"][:]
        classes = f["samples/label"][:]
    rows = np.arange(len(labels))
    if within_class and classes.ndim == 1 and labels.any():
        prevalence = [labels[classes == c].mean() if (classes == c).any() else 0 for c in range(classes.max() + 1)]
        in_class = np.flatnonzero(classes == int(np.argmax(prevalence)))
        if 0 < labels[in_class].sum() < len(in_class) - 1:
            rows = in_class
    return make_cav(method).fit(acts[rows], labels[rows]).direction_
