"""Manifests: the list of samples a command works on.

A manifest is a CSV with columns ``path,label[,source][,split][,mask][,artifact][,artifact_mask]``
(paths relative to the CSV; extra columns are kept) or an ImageFolder tree ``root/<class>/<image>``.
Sample ids are 0-based manifest row numbers and stay stable across every command.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

from cxr_audit.errors import BadInputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp"}
KNOWN_COLUMNS = ("path", "label", "source", "split", "mask", "artifact", "artifact_mask")


@dataclass
class Sample:
    """One manifest row; ``labels`` holds class indices (one for single-label data)."""

    index: int
    path: Path
    labels: tuple[int, ...]
    source: str = ""
    split: str = ""
    mask: Path | None = None
    artifact: int | None = None
    artifact_mask: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> int:
        return self.labels[0] if self.labels else -1

    def row(self, class_names: list[str], folder: Path) -> dict[str, object]:
        """This sample as a manifest row of a CSV in ``folder`` (paths relative to it)."""
        def relative(p: Path | None) -> str | None:
            return None if p is None else os.path.relpath(p, folder)

        return {"path": relative(self.path), "label": "|".join(class_names[k] for k in self.labels),
                "source": self.source, "split": self.split, "mask": relative(self.mask), "artifact": self.artifact,
                "artifact_mask": relative(self.artifact_mask), **self.extra}


@dataclass
class Manifest:
    """Samples plus the class names their labels index into."""

    samples: list[Sample]
    class_names: list[str]
    source_file: Path | None = None
    multilabel: bool = False

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, split: str | None) -> "Manifest":
        """Samples of one split (all samples when ``split`` is None); indices are kept."""
        if split is None:
            return self
        chosen = [s for s in self.samples if s.split == split]
        if not chosen:
            raise BadInputError(f"no samples with split '{split}' in {self.source_file}")
        return Manifest(chosen, self.class_names, self.source_file, self.multilabel)

    @property
    def has_artifact_column(self) -> bool:
        return any(s.artifact is not None for s in self.samples)

    @property
    def sources(self) -> list[str]:
        return sorted({s.source for s in self.samples})

    def write(self, path: str | Path) -> Path:
        """Write the samples as a manifest CSV at ``path`` (whole or not at all; paths relative to its
        folder, extra columns kept); the written file lists the samples in this order."""
        path = Path(path)
        write_manifest(path, [s.row(self.class_names, path.parent) for s in self.samples])
        return path


def load_manifest(path: str | Path, class_names: list[str] | None = None, multilabel: bool = False) -> Manifest:
    """Load a manifest CSV or an ImageFolder directory.

    ``class_names`` (e.g. from a checkpoint) fixes the label order; labels not in it are an error.
    Without it, class names are the sorted distinct labels. ``multilabel=True`` (a multi-label
    model's data) reads labels as multi-hot even when no row holds two; otherwise a row with
    ``a|b`` makes the manifest multi-label.
    """
    path = Path(path)
    if path.is_dir():
        return _load_image_folder(path, class_names)
    if not path.is_file():
        raise BadInputError(f"manifest not found: {path}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or "path" not in reader.fieldnames:
                raise BadInputError(f"manifest {path} has no 'path' column (header: {reader.fieldnames})")
            rows = list(reader)
    except UnicodeDecodeError:
        raise BadInputError(f"manifest {path} is not UTF-8 text (saved as UTF-16? re-save it as UTF-8 CSV)") from None
    if not rows:
        raise BadInputError(f"manifest {path} has no rows")
    has_label = "label" in (reader.fieldnames or [])
    raw_labels = [_split_labels(r.get("label", "")) if has_label else [] for r in rows]
    multilabel = multilabel or any(len(lbls) > 1 for lbls in raw_labels)
    names = list(class_names) if class_names is not None else _infer_class_names(raw_labels)
    lookup = {n: i for i, n in enumerate(names)}
    root = path.parent
    samples = []
    for i, (row, lbls) in enumerate(zip(rows, raw_labels)):
        where = f"{path} row {i + 2}"
        if not row.get("path"):
            raise BadInputError(f"{where}: empty path")
        samples.append(
            Sample(
                index=i,
                path=root / row["path"],
                labels=tuple(_label_index(lbl, lookup, where) for lbl in lbls),
                source=row.get("source", "") or "",
                split=row.get("split", "") or "",
                mask=(root / row["mask"]) if row.get("mask") else None,
                artifact=_parse_flag(row.get("artifact"), where),
                artifact_mask=(root / row["artifact_mask"]) if row.get("artifact_mask") else None,
                extra={k: v for k, v in row.items() if k not in KNOWN_COLUMNS and k is not None},
            )
        )
    return Manifest(samples, names, path, multilabel)


def _split_labels(value: str) -> list[str]:
    return [p.strip() for p in (value or "").split("|") if p.strip()]


def _infer_class_names(raw_labels: list[list[str]]) -> list[str]:
    distinct = {lbl for lbls in raw_labels for lbl in lbls}
    if distinct and all(lbl.isdigit() for lbl in distinct):
        return [str(i) for i in range(max(int(lbl) for lbl in distinct) + 1)]
    return sorted(distinct)


def _label_index(label: str, lookup: dict[str, int], where: str) -> int:
    if label in lookup:
        return lookup[label]
    if label.isdigit() and int(label) < len(lookup):
        return int(label)
    raise BadInputError(f"{where}: unknown label '{label}' (known: {', '.join(lookup)})")


def _parse_flag(value: str | None, where: str) -> int | None:
    if value is None or value.strip() == "":
        return None
    if value.strip() in ("0", "1"):
        return int(value)
    raise BadInputError(f"{where}: artifact must be 0 or 1, got '{value}'")


def _load_image_folder(root: Path, class_names: list[str] | None) -> Manifest:
    folders = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not folders:
        raise BadInputError(f"{root} is neither a manifest CSV nor an ImageFolder tree (no class folders)")
    names = list(class_names) if class_names is not None else folders
    lookup = {n: i for i, n in enumerate(names)}
    samples = []
    for folder in folders:
        if folder not in lookup:
            raise BadInputError(f"{root / folder}: unknown class '{folder}' (known: {', '.join(names)})")
        for f in sorted((root / folder).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                samples.append(Sample(index=len(samples), path=f, labels=(lookup[folder],)))
    if not samples:
        raise BadInputError(f"no images found under {root}")
    return Manifest(samples, names, root)


def write_manifest(path: str | Path, rows: list[dict[str, object]]) -> None:
    """Write manifest rows (dicts) as CSV with known columns first, in a stable order; for a
    :class:`Manifest` use :meth:`Manifest.write`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    columns = [c for c in KNOWN_COLUMNS if c in keys] + [k for k in keys if k not in KNOWN_COLUMNS]
    tmp = path.with_name(path.name + ".tmp")  # a later command never reads a half-written manifest
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})
    tmp.replace(path)
