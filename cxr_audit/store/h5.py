"""Create, resume and read scan files (schema in :mod:`cxr_audit.store.schema`).

Datasets are allocated at full size when the file is created, so later writes never change the
file's structure: a scan killed mid-batch leaves every row already marked in ``/done`` intact.
Chunks are uncompressed (gzip is 3-30x slower to write for little gain on relevances).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from cxr_audit.errors import BadInputError
from cxr_audit.store.schema import SCHEMA_VERSION, validate

STR = h5py.string_dtype("utf-8")


def create_scan_file(path: Path, n: int, meta: dict, layer_channels: dict[str, int], num_classes: int,
                     targets: list[str], heatmap_size: int, multilabel: bool, chunk_rows: int = 16,
                     prototype_maps: int = 0) -> h5py.File:
    """Allocate an empty scan file for ``n`` samples and return it open for writing; with
    ``prototype_maps`` k > 0 also ``prototypes/{index,score,prp,activation}`` (ProtoPNet scans)."""
    f = h5py.File(path, "w")
    g = f.create_group("meta")
    for key, value in meta.items():
        g.attrs[key] = value if isinstance(value, (str, int, float)) else json.dumps(value)
    g.attrs["schema_version"] = SCHEMA_VERSION
    rows = max(1, min(chunk_rows, n))

    def ds(name, shape, dtype, fill=None):
        chunks = (rows,) + tuple(shape) if shape or dtype != STR else None
        kw = {"fillvalue": fill} if fill is not None else {}
        f.create_dataset(name, shape=(n,) + tuple(shape), dtype=dtype, chunks=chunks, **kw)

    ds("samples/index", (), np.int64)
    ds("samples/path", (), STR)
    ds("samples/label", (num_classes,) if multilabel else (), np.uint8 if multilabel else np.int64)
    ds("samples/source", (), STR)
    ds("samples/split", (), STR)
    ds("samples/artifact", (), np.int8, fill=-1)
    ds("samples/error", (), STR)
    ds("outputs/logits", (num_classes,), np.float32, fill=np.nan)
    ds("outputs/pred", (), np.int64, fill=-1)
    for t in targets:
        ds(f"heatmaps/{t}", (heatmap_size, heatmap_size), np.float16)
        ds(f"targets/{t}", (), np.int64, fill=-1)
    for layer, c in layer_channels.items():
        ds(f"activations/{layer}/max", (c,), np.float32)
        ds(f"activations/{layer}/mean", (c,), np.float32)
        ds(f"relevances/{layer}", (c,), np.float32)
    if prototype_maps:
        ds("prototypes/index", (prototype_maps,), np.int64, fill=-1)
        ds("prototypes/score", (prototype_maps,), np.float32, fill=np.nan)
        ds("prototypes/prp", (prototype_maps, heatmap_size, heatmap_size), np.float16)
        ds("prototypes/activation", (prototype_maps, heatmap_size, heatmap_size), np.float16)
    f.create_dataset("done", shape=(n,), dtype=bool, fillvalue=False)
    return f


def open_scan(path: str | Path, mode: str = "r") -> h5py.File:
    """Open and validate a scan file; one-line errors for missing/corrupt/foreign files."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"scan file not found: {path}")
    try:
        f = h5py.File(path, mode)
    except OSError as exc:
        if "lock" in str(exc).lower():
            raise BadInputError(f"scan file {path} is in use by another process (a running scan?)") from None
        raise BadInputError(f"cannot open scan file {path} (corrupt or not HDF5): {exc}") from None
    try:
        validate(f, str(path))
    except BadInputError:
        f.close()
        raise
    return f


def read_meta(f: h5py.File) -> dict:
    """``/meta`` attributes with JSON values decoded."""
    out = {}
    for key, value in f["meta"].attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, str) and value[:1] in "[{":
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        out[key] = value
    return out


READ_CHUNK = 8192  # rows per read: memory of a streamed read is one block, not the data set


def row_blocks(ds, rows: np.ndarray, chunk: int | None = None) -> Iterator[tuple[slice, np.ndarray]]:
    """``(positions, ds[rows[positions]])`` for consecutive blocks of ``chunk`` (default
    :data:`READ_CHUNK`) of the increasing ``rows``; ``ds`` is an HDF5 dataset or an array."""
    rows = np.asarray(rows, np.int64)
    chunk = chunk or READ_CHUNK
    for i in range(0, len(rows), chunk):
        part = rows[i:i + chunk]
        lo, hi = int(part[0]), int(part[-1]) + 1
        # a contiguous slice is one HDF5 read; fancy indexing only when the rows are sparse
        yield slice(i, i + len(part)), (ds[lo:hi][part - lo] if hi - lo <= 4 * len(part) else ds[part])


def read_rows(ds: h5py.Dataset, rows: np.ndarray, transform=None, chunk: int | None = None) -> np.ndarray:
    """``ds[rows]`` for increasing ``rows``, read ``chunk`` (default :data:`READ_CHUNK`) rows at a
    time into one preallocated result; ``transform`` (a row-wise function of a block, e.g.
    pooling) is applied to each block before it is kept, so peak memory is the result plus one
    raw block."""
    out = None
    for positions, block in row_blocks(ds, rows, chunk):
        block = transform(block) if transform else block
        if out is None:
            out = np.empty((len(rows),) + block.shape[1:], block.dtype)
        out[positions] = block
    if out is None:
        empty = ds[:0]
        return transform(empty) if transform else empty
    return out


class StoredRows:
    """An ``(N, ...)`` dataset (HDF5, or an array in tests) that is only ever read a block of rows
    at a time: what statistics over a whole data set take instead of the array itself."""

    def __init__(self, ds, chunk: int | None = None):
        self.ds, self.chunk = ds, chunk

    def __len__(self) -> int:
        return len(self.ds)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.ds.shape)

    def read(self, rows: np.ndarray, transform=None) -> np.ndarray:
        return read_rows(self.ds, rows, transform, self.chunk)

    def blocks(self, rows: np.ndarray | None = None) -> Iterator[tuple[slice, np.ndarray]]:
        """Blocks over ``rows`` (default: every row), as :func:`row_blocks`."""
        return row_blocks(self.ds, np.arange(len(self.ds)) if rows is None else rows, self.chunk)
