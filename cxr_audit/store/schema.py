"""The HDF5 scan-file schema (version 1). See docs/hdf5-schema.md for the human description.

```
/meta                     attrs: schema_version, arch, checkpoint, checkpoint_sha256, layers (JSON),
                          method, targets (JSON), class_names (JSON), heatmap_size, init, data,
                          options (JSON), created, versions (JSON)
/samples/index  (N,)      int64  manifest row ids
/samples/path   (N,)      str
/samples/label  (N,)|(N,K) int64 | uint8 multi-hot
/samples/source (N,)      str
/samples/split  (N,)      str
/samples/artifact (N,)    int8   -1 unknown, 0/1 from the manifest
/samples/error  (N,)      str    non-empty for samples skipped with --skip-bad
/outputs/logits (N,K)     float32
/outputs/pred   (N,)      int64
/heatmaps/<target> (N,S,S) float16  sum-pooled relevance (sums to the input relevance);
                          <target>: pred, true or finding:NAME
/targets/<target>  (N,)   int64  class explained by that heatmap
/activations/<layer>/max  (N,C) float32   spatial max
/activations/<layer>/mean (N,C) float32   spatial mean
/relevances/<layer>       (N,C) float32   channel relevance for the first target
/done           (N,)      bool   rows that are complete
```
"""

from __future__ import annotations

import json

import h5py

from cxr_audit.errors import BadInputError, UsageError

SCHEMA_VERSION = 1

TARGETS = ("pred", "true", "finding:NAME")


def finding_index(target: str, class_names: list[str]) -> int | None:
    """The output index a ``finding:NAME`` target explains; ``None`` for ``pred``/``true``."""
    if target in ("pred", "true"):
        return None
    kind, _, name = target.partition(":")
    if kind != "finding" or name not in class_names:
        raise UsageError(f"target '{target}' is none of pred, true, finding:NAME with NAME one of "
                         f"{', '.join(class_names)}")
    return class_names.index(name)


REQUIRED_META = ("schema_version", "arch", "layers", "method", "targets", "class_names", "heatmap_size")
REQUIRED_DATASETS = ("samples/index", "samples/path", "samples/label", "outputs/logits", "outputs/pred", "done")


def validate(f: h5py.File, where: str = "scan file") -> None:
    """Raise :class:`BadInputError` (one line) if ``f`` is not a scan file of this schema."""
    if "meta" not in f:
        raise BadInputError(f"{where} is not a cxr-audit scan (no /meta group)")
    attrs = f["meta"].attrs
    missing = [k for k in REQUIRED_META if k not in attrs]
    if missing:
        raise BadInputError(f"{where}: /meta lacks {', '.join(missing)}")
    version = int(attrs["schema_version"])
    if version != SCHEMA_VERSION:
        raise BadInputError(f"{where} has schema version {version}; this cxr-audit reads version {SCHEMA_VERSION}")
    absent = [d for d in REQUIRED_DATASETS if d not in f]
    if absent:
        raise BadInputError(f"{where}: missing datasets {', '.join('/' + d for d in absent)}")
    n = f["samples/index"].shape[0]
    layers = json.loads(attrs["layers"])
    targets = json.loads(attrs["targets"])
    expected = ["done", "outputs/logits", "outputs/pred", "samples/path", "samples/label"]
    expected += [f"heatmaps/{t}" for t in targets] + [f"relevances/{l}" for l in layers]
    expected += [f"activations/{l}/max" for l in layers] + [f"activations/{l}/mean" for l in layers]
    for name in expected:
        if name not in f:
            raise BadInputError(f"{where}: missing dataset /{name}")
        if f[name].shape[0] != n:
            raise BadInputError(f"{where}: /{name} has {f[name].shape[0]} rows, expected {n}")
    s = int(attrs["heatmap_size"])
    for t in targets:
        if f[f"heatmaps/{t}"].shape[1:] != (s, s):
            raise BadInputError(f"{where}: /heatmaps/{t} is not {s}x{s}")
