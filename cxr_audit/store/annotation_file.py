"""The annotations file ``cxr-audit annotate`` writes (``annotations.h5``) and later commands read.

Layout (schema ``cxr-audit-annotations/1``)::

    /meta            attrs: scan, checkpoint, data, arch, layer, method, threshold, options (JSON),
                     quality (JSON), created, versions (JSON), schema
    /samples/index   (N,) int64  manifest row ids of the scan's rows
    /samples/path    (N,) str    their image paths: which images the labels belong to
    /scores          (N,) float32 CAV score per row
    /labels          (N,) int    1 artifact, 0 clean, -1 unknown (a row the scan skipped)
    /fit_rows        (n,) int    rows the CAV was fitted on
    /cav/{layer}     (C,) float  unit CAV direction
    /masks           (M, S, S) uint8 and /mask_rows (M,) int  (when masks were painted)

Written to a temporary file and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from cxr_audit.errors import BadInputError

SCHEMA = "cxr-audit-annotations/1"
JSON_ATTRS = ("options", "quality", "versions")
STR = h5py.string_dtype("utf-8")


@dataclass
class AnnotationContents:
    """What an annotations file holds (``meta`` with its JSON attributes decoded)."""

    path: Path
    meta: dict
    index: np.ndarray  # (N,) manifest row ids
    paths: list[str] | None  # (N,) image paths; None in files older than the path record
    labels: np.ndarray  # (N,) 1/0/-1
    scores: np.ndarray  # (N,)
    cav: np.ndarray  # (C,) at meta["layer"]


def write_annotation_file(out: Path, meta: dict, index: np.ndarray, paths, scores: np.ndarray, labels: np.ndarray,
                          fit_rows: np.ndarray, cav: np.ndarray, masks: np.ndarray | None = None,
                          mask_rows: np.ndarray | None = None) -> None:
    """Write ``out`` atomically; ``meta`` values that are not str/int/float are stored as JSON."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    with h5py.File(tmp, "w") as f:
        g = f.create_group("meta")
        g.attrs.update({k: (v if isinstance(v, (str, int, float)) else json.dumps(v)) for k, v in meta.items()})
        g.attrs["schema"] = SCHEMA
        f["samples/index"] = np.asarray(index, np.int64)
        f.create_dataset("samples/path", data=np.asarray([_text(p) for p in paths], dtype=object), dtype=STR)
        f["scores"] = np.asarray(scores, np.float32)
        f["labels"] = labels
        f["fit_rows"] = fit_rows
        f[f"cav/{meta['layer']}"] = cav
        if masks is not None:
            f.create_dataset("masks", data=masks.astype(np.uint8), chunks=(1,) + masks.shape[1:], compression="lzf")
            f["mask_rows"] = mask_rows
    os.replace(tmp, out)


def read_annotation_file(path: str | Path) -> AnnotationContents:
    """The contents of an annotations file; one-line errors for missing, foreign or corrupt files."""
    path = _existing(path)
    try:
        with h5py.File(path, "r") as f:
            meta = _meta(f, path)
            paths = f["samples/path"].asstr()[:].tolist() if "samples/path" in f else None
            return AnnotationContents(path, meta, f["samples/index"][:], paths, f["labels"][:].astype(int),
                                      f["scores"][:], f[f"cav/{meta['layer']}"][:])
    except (OSError, KeyError) as exc:
        raise BadInputError(f"cannot read annotations {path}: {exc}") from None


def annotation_meta(path: str | Path) -> dict:
    """Only ``/meta`` of an annotations file (JSON attributes decoded)."""
    path = _existing(path)
    try:
        with h5py.File(path, "r") as f:
            return _meta(f, path)
    except (OSError, KeyError) as exc:
        raise BadInputError(f"cannot read annotations {path}: {exc}") from None


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"annotations file not found: {path}")
    return path


def _meta(f: h5py.File, path: Path) -> dict:
    """``/meta`` of the open file ``f``, refused unless it is this project's annotations schema."""
    meta = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f["meta"].attrs.items()}
    if meta.get("schema") != SCHEMA:
        raise BadInputError(f"{path} is not a cxr-audit annotations file (run `cxr-audit annotate`)")
    return {k: (json.loads(v) if k in JSON_ATTRS else v) for k, v in meta.items()}


def _text(p) -> str:
    return p.decode() if isinstance(p, bytes) else str(p)
