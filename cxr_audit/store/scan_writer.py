"""Write a scan file: the sample table once, then batch after batch, each marked done only once
its data is on disk (layout: :mod:`cxr_audit.store.schema`). ``scan`` hands over
:class:`ScanBatch` es and never names a dataset path.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from cxr_audit.errors import BadInputError
from cxr_audit.store.h5 import create_scan_file, open_scan


@dataclass
class ScanBatch:
    """One batch's results for ``n`` scan rows: ``logits (n, K)``; per target ``heatmaps (n, S, S)``
    float16 and ``targets (n,)`` (the explained class); per layer ``act_max``, ``act_mean`` and
    ``relevances (n, C)``; for ProtoPNet scans ``prototypes``: ``index``/``score (n, k)``,
    ``prp``/``activation (n, k, S, S)``."""

    logits: np.ndarray
    heatmaps: dict[str, np.ndarray] = field(default_factory=dict)
    targets: dict[str, np.ndarray] = field(default_factory=dict)
    act_max: dict[str, np.ndarray] = field(default_factory=dict)
    act_mean: dict[str, np.ndarray] = field(default_factory=dict)
    relevances: dict[str, np.ndarray] = field(default_factory=dict)
    prototypes: dict[str, np.ndarray] | None = None

    def datasets(self) -> dict[str, np.ndarray]:
        """Dataset path -> values."""
        out = {"outputs/logits": self.logits, "outputs/pred": self.logits.argmax(1)}
        for t in self.heatmaps:
            out[f"heatmaps/{t}"], out[f"targets/{t}"] = self.heatmaps[t], self.targets[t]
        for layer in self.act_max:
            out[f"activations/{layer}/max"] = self.act_max[layer]
            out[f"activations/{layer}/mean"] = self.act_mean[layer]
            out[f"relevances/{layer}"] = self.relevances[layer]
        for name, values in (self.prototypes or {}).items():
            out[f"prototypes/{name}"] = values
        return out


class ScanWriter:
    """A scan file open for writing (a new one from :meth:`create`, or one to resume from
    :meth:`resume`)."""

    def __init__(self, f: h5py.File):
        self.h5 = f

    @classmethod
    def create(cls, path: Path, samples, num_classes: int, multilabel: bool, meta: dict,
               layer_channels: dict[str, int], targets: list[str], heatmap_size: int,
               prototype_maps: int = 0) -> ScanWriter:
        """A new file for the manifest ``samples`` with their sample table written."""
        f = create_scan_file(path, len(samples), meta, layer_channels, num_classes, targets, heatmap_size,
                             multilabel, prototype_maps=prototype_maps)
        writer = cls(f)
        writer._write_samples(samples, num_classes, multilabel)
        return writer

    @classmethod
    def resume(cls, path: Path, options: dict, checkpoint_sha256: str, n: int) -> ScanWriter | None:
        """The existing file open for more rows, or ``None`` when it was made with other options,
        another model or another number of samples."""
        f = open_scan(path, "r+")
        same = (json.loads(f["meta"].attrs["options"]) == json.loads(json.dumps(options))
                and f["meta"].attrs["checkpoint_sha256"] == checkpoint_sha256 and f["samples/index"].shape[0] == n)
        if not same:
            f.close()
            return None
        return cls(f)

    def _write_samples(self, samples, num_classes: int, multilabel: bool) -> None:
        f = self.h5
        f["samples/index"][:] = [s.index for s in samples]
        f["samples/path"][:] = [str(s.path.resolve()) for s in samples]
        f["samples/source"][:] = [s.source for s in samples]
        f["samples/split"][:] = [s.split for s in samples]
        f["samples/artifact"][:] = [(-1 if s.artifact is None else s.artifact) for s in samples]
        if multilabel:
            hot = np.zeros((len(samples), num_classes), np.uint8)
            for r, s in enumerate(samples):
                hot[r, list(s.labels)] = 1
            f["samples/label"][:] = hot
        else:
            f["samples/label"][:] = [s.label for s in samples]
        f.flush()

    def pending(self) -> np.ndarray:
        """Rows not yet done."""
        return np.flatnonzero(~self.h5["done"][:])

    def done_count(self) -> int:
        return int(self.h5["done"][:].sum())

    def write_rows(self, rows: np.ndarray, batch: ScanBatch) -> None:
        """Write one batch (rows ascending), then mark it done: a crash in between loses only this batch."""
        sl = _as_slice(rows)
        try:
            for name, values in batch.datasets().items():
                self.h5[name][sl] = values
            self.h5.flush()  # the rows' data reach the disk before they are marked done
            self.h5["done"][sl] = True
            self.h5.flush()
        except (OSError, RuntimeError) as exc:  # h5py reports a failed flush (e.g. ENOSPC) as RuntimeError
            full = "No space left" in str(exc) or "errno = 28" in str(exc)
            raise BadInputError(f"{'disk full' if full else 'cannot write'}: {self.h5.filename}; rows already "
                                "marked done are kept and the others are not marked — free space and rerun the "
                                "same command to resume") from None

    def write_error(self, row: int, message: str) -> None:
        """Mark ``row`` done as unreadable (``--skip-bad``)."""
        self.h5["samples/error"][row] = message
        self.h5["done"][row] = True

    def check_free_space(self, pending: int, margin: float = 1.1) -> None:
        """Refuse to start when ``pending`` rows cannot fit on the file's disk (a full disk mid-scan
        leaves HDF5 unable to close the file cleanly)."""
        rows, row_bytes = len(self.h5["done"]), 0

        def add(_name, obj):
            nonlocal row_bytes
            if isinstance(obj, h5py.Dataset) and obj.shape and obj.shape[0] == rows:
                row_bytes += obj.dtype.itemsize * int(np.prod(obj.shape[1:], dtype=np.int64))

        self.h5.visititems(add)
        need = int(pending * row_bytes * margin)
        folder = Path(self.h5.filename).resolve().parent
        free = shutil.disk_usage(folder).free
        if need > free:
            raise BadInputError(f"disk full: the scan needs about {need / 2**20:.1f} MiB for {pending} rows, "
                                f"{free / 2**20:.1f} MiB are free under {folder}")

    def close(self) -> None:
        try:
            self.h5.close()
        except (OSError, RuntimeError):  # after a failed write HDF5 cannot flush again; the done rows are safe
            pass


def _as_slice(rows: np.ndarray):
    if len(rows) and rows[-1] - rows[0] == len(rows) - 1:
        return slice(int(rows[0]), int(rows[-1]) + 1)
    return rows
