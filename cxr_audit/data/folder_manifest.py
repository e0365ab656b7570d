"""Build a manifest from a folder of DICOM/PNG/JPEG files, with chosen DICOM tags as columns.

Acquisition metadata is where hospital shortcuts hide: the scanner (``Manufacturer``), the site
(``InstitutionName``), AP vs PA (``ViewPosition``), the patient's sex or age. Recorded as columns,
any of them can be the manifest's ``source`` (``source_tag``), which ``reveal`` tests concepts
against (per-source association, prevalence warning), ``stress`` sweeps and ``gate`` groups by
(Test-100H1/H2, worst group).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable

from cxr_audit.data.io import is_dicom
from cxr_audit.data.manifest import IMAGE_SUFFIXES, write_manifest
from cxr_audit.errors import BadInputError, UsageError


def dicom_tags(path: Path, tags: list[str]) -> dict[str, str]:
    """The values of ``tags`` (DICOM keywords) in the header of ``path``; ``""`` where absent.
    Pixel data is not read. A file that is not DICOM is a :class:`BadInputError`."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many types for broken files
        raise BadInputError(f"cannot read DICOM header of {path}: {exc}") from None
    return {tag: _text(ds.get(tag)) for tag in tags}


def _text(element) -> str:
    value = getattr(element, "value", element)
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _images(folder: Path) -> list[Path]:
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    return [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES or (not p.suffix and is_dicom(p))]


def _read_labels(labels_csv: Path) -> dict[str, str]:
    """``path,label`` rows (paths relative to the folder, or file names) -> label per key."""
    with open(labels_csv, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
            raise BadInputError(f"{labels_csv} needs 'path' and 'label' columns (header: {reader.fieldnames})")
        return {row["path"]: row["label"] for row in reader}


def build_manifest(folder: str | Path, out: str | Path, *, tags: list[str] = (), source_tag: str | None = None,
                   labels_csv: str | Path | None = None, label_from_folder: bool = False,
                   on_progress: Callable[..., None] | None = None) -> Path:
    """Write ``out`` (CSV): one row per image under ``folder`` with ``path`` (relative to ``out``),
    ``label`` (from ``labels_csv`` or the first sub-folder's name), ``source`` (the ``source_tag``
    value) and one column per DICOM tag. Returns ``out``."""
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise BadInputError(f"not a folder: {folder}")
    if label_from_folder and labels_csv:
        raise UsageError("give --labels or --label-from-folder, not both")
    wanted = list(dict.fromkeys(list(tags) + ([source_tag] if source_tag else [])))
    images = _images(folder)
    if not images:
        raise BadInputError(f"no images (PNG, JPEG, TIFF, DICOM) under {folder}")
    labels = _read_labels(Path(labels_csv)) if labels_csv else None
    rows = []
    for i, path in enumerate(images):
        rel = path.relative_to(folder)
        row: dict[str, object] = {"path": str(path.resolve().relative_to(out.parent.resolve()))
                                  if _is_under(path, out.parent) else str(path.resolve())}
        if labels is not None:
            row["label"] = labels.get(str(rel).replace("\\", "/"), labels.get(path.name, ""))
        elif label_from_folder:
            row["label"] = rel.parts[0] if len(rel.parts) > 1 else ""
        values = dicom_tags(path, wanted) if wanted and is_dicom(path) else {t: "" for t in wanted}
        if source_tag:
            row["source"] = values[source_tag]
        row.update({t: values[t] for t in tags})
        rows.append(row)
        if on_progress:
            on_progress(i + 1, len(images))
    if labels is not None and not any(r["label"] for r in rows):
        raise BadInputError(f"no image under {folder} is named in {labels_csv} (match by relative path or file name)")
    write_manifest(out, rows)  # written whole or not at all
    return out


def _is_under(path: Path, parent: Path) -> bool:
    try:
        path.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False
