"""Insert a controlled artifact into a dataset at a chosen prevalence per class, per source, or
per source × class cell (e.g. a stamp on 80 % of hospital A's disease images and 10 % of its
healthy ones, none at hospital B).

Only images that receive the artifact are rewritten (8-bit PNG); the new manifest points at the
original files for the rest, so injecting into a large dataset costs little disk. Every row
gets ``artifact`` (0/1) and injected rows an ``artifact_mask`` PNG: the ground truth that
reveal/annotate/evaluate are measured against.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from cxr_audit.data.artifacts import get_artifact
from cxr_audit.data.io import read_image, write_png
from cxr_audit.data.manifest import Manifest, load_manifest
from cxr_audit.errors import UsageError
from cxr_audit.options import choice
from cxr_audit.runtime import write_text_atomic


def _check_inputs(manifest: Manifest, data, out_dir, splits) -> None:
    """Splits that exist, and an output folder that is not the input's (it would overwrite it)."""
    unknown = sorted(set(splits or ()) - {s.split for s in manifest.samples})
    if unknown:
        raise UsageError(f"--split {', '.join(unknown)} not in {data} (splits: "
                         f"{', '.join(sorted({s.split for s in manifest.samples}))})")
    source_dir = (manifest.source_file if Path(data).is_dir() else Path(data).parent).resolve()
    if Path(out_dir).resolve() == source_dir:
        raise UsageError(f"--out {out_dir} is the input's folder: it would overwrite the original manifest; "
                         "choose a new folder")


def parse_prevalence(spec: str) -> dict[str, float]:
    """``"disease=0.5,healthy=0"`` -> dict; a bare number ``"0.3"`` -> ``{"*": 0.3}``."""
    out: dict[str, float] = {}
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        key, _, value = part.rpartition("=") if "=" in part else ("*", "", part)
        try:
            p = float(value)
        except ValueError:
            raise UsageError(f"prevalence '{part}' is not KEY=FRACTION") from None
        if not 0.0 <= p <= 1.0:
            raise UsageError(f"prevalence for '{key}' must be in [0, 1], got {p}")
        out[key.strip()] = p
    if not out:
        raise UsageError("empty prevalence specification")
    return out


def inject(data: str | Path, out_dir: str | Path, artifact: str, prevalence: dict[str, float] | str,
           by: str = "label", splits: list[str] | None = None, seed: int = 0,
           on_progress: Callable[[int, int], None] | None = None) -> Path:
    """Write ``out_dir/manifest.csv`` with ``artifact`` inserted into a fraction of each group.

    ``by="label"`` keys ``prevalence`` by class name, ``by="source"`` by source, and
    ``by="source:label"`` by ``SOURCE:CLASS`` cells, where either side may be ``*``
    (``"site0:disease=0.8,site0:*=0.1"``: the most specific key wins). Key ``*`` is every group. Exactly ``round(p * n_group)`` eligible rows (optionally only those in
    ``splits``) get the artifact, chosen with ``seed``. Returns the new manifest path.
    """
    if isinstance(prevalence, str):
        prevalence = parse_prevalence(prevalence)
    choice("--by", by, GROUPINGS)
    if by != "source:label" and any(":" in k for k in prevalence):
        raise UsageError("prevalence keys of the form SOURCE:CLASS need --by source:label")
    manifest = load_manifest(data)
    _check_inputs(manifest, data, out_dir, splits)
    art = get_artifact(artifact)
    groups = _groups(manifest, by)
    _check_keys(prevalence, groups, by)
    rng = np.random.default_rng(seed)
    chosen: set[int] = set()
    for key in sorted(groups):
        members = [i for i in groups[key] if splits is None or manifest[i].split in splits]
        p = _lookup(prevalence, key)
        k = int(round(p * len(members)))
        chosen.update(int(i) for i in rng.permutation(members)[:k])

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    samples, done = [], 0
    for s in manifest.samples:
        if s.index in chosen:
            image, mask = art.apply(read_image(s.path), rng)
            name = f"{s.index:06d}_{Path(s.path).stem}.png"
            write_png(out / "images" / name, image)
            write_png(out / "artifact_masks" / name, mask)
            s = replace(s, path=out / "images" / name, artifact=1, artifact_mask=out / "artifact_masks" / name)
            done += 1
            if on_progress:
                on_progress(done, len(chosen))
        else:
            s = replace(s, artifact=s.artifact or 0)
        samples.append(s)
    replace(manifest, samples=samples).write(out / "manifest.csv")
    write_text_atomic(out / "inject.json", json.dumps(
        {"source_manifest": str(Path(data).resolve()), "artifact": artifact, "prevalence": prevalence,
         "by": by, "splits": splits, "seed": seed, "injected": len(chosen)}, indent=2))
    return out / "manifest.csv"


GROUPINGS = ("label", "source", "source:label")


def _groups(manifest: Manifest, by: str) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for s in manifest.samples:
        label = manifest.class_names[s.label]
        key = {"label": label, "source": s.source, "source:label": f"{s.source}:{label}"}[by]
        groups.setdefault(key, []).append(s.index)
    return groups


def _lookup(prevalence: dict[str, float], key: str) -> float:
    """The most specific prevalence for a group key (``SOURCE:CLASS`` cells fall back to
    ``SOURCE:*``, then ``*:CLASS``, then ``*``)."""
    candidates = [key]
    if ":" in key:
        source, label = key.split(":", 1)
        candidates += [f"{source}:*", f"*:{label}", "*:*"]
    for k in candidates + ["*"]:
        if k in prevalence:
            return prevalence[k]
    return 0.0


def _check_keys(prevalence: dict[str, float], groups: dict[str, list[int]], by: str) -> None:
    if by != "source:label":
        unknown = [k for k in prevalence if k != "*" and k not in groups]
        if unknown:
            raise UsageError(f"prevalence names unknown {by}(s) {unknown}; known: {sorted(groups)}")
        return
    sources = {k.split(":", 1)[0] for k in groups}
    labels = {k.split(":", 1)[1] for k in groups}
    for k in prevalence:
        if k == "*":
            continue
        if ":" not in k:
            raise UsageError(f"with --by source:label every prevalence key is SOURCE:CLASS (or *), got '{k}'")
        source, label = k.split(":", 1)
        if (source != "*" and source not in sources) or (label != "*" and label not in labels):
            raise UsageError(f"prevalence key '{k}' names an unknown source or class; sources {sorted(sources)}, "
                             f"classes {sorted(labels)}")
