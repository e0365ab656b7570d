"""Typed reads of a scan file (layout: :mod:`cxr_audit.store.schema`, docs/hdf5-schema.md).

Every stage after ``scan`` reads scans through :class:`ScanFile`, so no module outside
:mod:`cxr_audit.store` names an HDF5 dataset path, and "reopen the scanned model and data" is
written once (:meth:`ScanFile.manifest`, :meth:`ScanFile.open_model`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr_audit.store.h5 import StoredRows, open_scan, read_meta


@dataclass
class Reopened:
    """The scanned model (frozen, on its device), its config and preprocessing, and the scanned
    images as a :class:`~cxr_audit.data.dataset.CxrDataset` indexed by manifest id."""

    net: object
    config: dict
    prep: object
    dataset: object


class ScanFile:
    """An open, validated scan; use as a context manager. Per-sample arrays are ``(N, ...)`` over
    every row of the file (manifest order); :meth:`good_rows` selects those scanned without error."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.h5 = open_scan(self.path)
        self.meta = read_meta(self.h5)

    def __enter__(self) -> ScanFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.h5.close()

    def __len__(self) -> int:
        return int(self.h5["samples/index"].shape[0])

    # -- per sample ------------------------------------------------------------------------------
    def done(self) -> np.ndarray:
        """``(N,)`` bool: rows written (a killed scan leaves the rest False)."""
        return self.h5["done"][:]

    def errors(self) -> np.ndarray:
        """``(N,)`` str: non-empty for samples skipped with ``--skip-bad``."""
        return self.h5["samples/error"].asstr()[:]

    def good_rows(self) -> np.ndarray:
        """Increasing row numbers scanned without error."""
        return np.flatnonzero(self.done() & (self.errors() == ""))

    def index(self) -> np.ndarray:
        """``(N,)`` int64 manifest row ids."""
        return self.h5["samples/index"][:]

    def paths(self) -> np.ndarray:
        """``(N,)`` str image paths as scanned (resolved)."""
        return self.h5["samples/path"].asstr()[:]

    def sources(self) -> np.ndarray:
        """``(N,)`` str source (hospital) of each sample."""
        return self.h5["samples/source"].asstr()[:]

    def labels(self) -> np.ndarray:
        """``(N,)`` int64 class ids, or ``(N, K)`` uint8 multi-hot for multi-label scans."""
        return self.h5["samples/label"][:]

    def artifacts(self) -> np.ndarray:
        """``(N,)`` int8: the manifest's artifact column (-1 unknown)."""
        return self.h5["samples/artifact"][:]

    def paths_by_index(self) -> dict[int, str]:
        """Manifest id -> scanned image path."""
        return dict(zip(self.index().tolist(), self.paths().tolist()))

    def logits(self, rows: np.ndarray | None = None) -> np.ndarray:
        """``(N, K)`` float32 model outputs (of ``rows`` if given)."""
        logits = self.h5["outputs/logits"]
        return logits[:] if rows is None else StoredRows(logits).read(rows)

    def targets(self, name: str) -> np.ndarray:
        """``(N,)`` the class each heatmap of target ``name`` (``pred``, ``label``, ...) explains."""
        return self.h5[f"targets/{name}"][:]

    def heatmaps(self, name: str) -> StoredRows:
        """``(N, H, W)`` float16 input heatmaps for target ``name``, read a block of rows at a time."""
        return StoredRows(self.h5[f"heatmaps/{name}"])

    # -- per layer -------------------------------------------------------------------------------
    def has_layer(self, layer: str) -> bool:
        return f"activations/{layer}/max" in self.h5

    def activations(self, layer: str, pooling: str = "max") -> StoredRows:
        """``(N, C)`` float32 spatially ``max``- or ``mean``-pooled activations of ``layer``."""
        return StoredRows(self.h5[f"activations/{layer}/{pooling}"])

    def relevances(self, layer: str) -> StoredRows:
        """``(N, C)`` float32 LRP relevance per channel of ``layer``."""
        return StoredRows(self.h5[f"relevances/{layer}"])

    def channels(self, layer: str) -> int:
        return int(self.h5[f"relevances/{layer}"].shape[1])

    # -- what the scan was made from -------------------------------------------------------------
    def manifest(self):
        """The scanned data's :class:`~cxr_audit.data.manifest.Manifest` (label order of the model),
        or ``None`` when the data is no longer where the scan says."""
        from cxr_audit.data.manifest import load_manifest

        if not Path(self.meta["data"]).exists():
            return None
        return load_manifest(self.meta["data"], class_names=self.meta["class_names"])

    def open_model(self, device):
        """``(frozen net, its config)`` of the scanned checkpoint on ``device``, or ``None`` when the
        checkpoint is no longer where the scan says."""
        from cxr_audit.models.registry import load_frozen

        if not Path(self.meta["checkpoint"]).is_file():
            return None
        return load_frozen(self.meta["checkpoint"], device)

    def reopen(self, device, lung_masks: bool = False) -> Reopened | None:
        """The scanned model and data, or ``None`` when either moved, or (``lung_masks``) when a
        sample has no lung mask."""
        from cxr_audit.data.dataset import CxrDataset
        from cxr_audit.models.registry import preprocessing_of

        manifest = self.manifest()
        if manifest is None or (lung_masks and any(s.mask is None for s in manifest.samples)):
            return None
        opened = self.open_model(device)
        if opened is None:
            return None
        net, config = opened
        prep = preprocessing_of(config)
        return Reopened(net, config, prep, CxrDataset(manifest, prep, with_masks=lung_masks))
