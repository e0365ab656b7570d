"""Create, resume and read scan files (schema in :mod:`cxr_audit.store.schema`).

Datasets are allocated at full size when the file is created, so later writes never change the
file's structure: a scan killed mid-batch leaves every row already marked in ``/done`` intact.
Chunks are uncompressed (gzip is 3-30x slower to write for little gain on relevances).
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from cxr_audit.errors import BadInputError
from cxr_audit.store.schema import SCHEMA_VERSION, validate

STR = h5py.string_dtype("utf-8")


def create_scan_file(path: Path, n: int, meta: dict, layer_channels: dict[str, int], num_classes: int,
                     targets: list[str], heatmap_size: int, multilabel: bool, chunk_rows: int = 16) -> h5py.File:
    """Allocate an empty scan file for ``n`` samples and return it open for writing."""
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


def read_rows(ds: h5py.Dataset, rows: np.ndarray, transform=None, chunk: int | None = None) -> np.ndarray:
    """``ds[rows]`` for increasing ``rows``, read ``chunk`` (default :data:`READ_CHUNK`) rows at a
    time into one preallocated result; ``transform`` (a row-wise function of a block, e.g.
    pooling) is applied to each block before it is kept, so peak memory is the result plus one
    raw block."""
    rows = np.asarray(rows, np.int64)
    chunk = chunk or READ_CHUNK
    out = None
    for i in range(0, len(rows), chunk):
        part = rows[i:i + chunk]
        lo, hi = int(part[0]), int(part[-1]) + 1
        # a contiguous slice is one HDF5 read; fancy indexing only when the rows are sparse
        block = ds[lo:hi][part - lo] if hi - lo <= 4 * len(part) else ds[part]
        block = transform(block) if transform else block
        if out is None:
            out = np.empty((len(rows),) + block.shape[1:], block.dtype)
        out[i:i + len(part)] = block
    if out is None:
        empty = ds[:0]
        return transform(empty) if transform else empty
    return out
