"""``stress``: the source-imbalance sweep of Gautam et al. (2022, "Demonstrating the risk of
imbalanced datasets in chest X-ray image-based diagnostics by prototypical relevance
propagation", ISBI).

For each ``x`` in the grid a training set is drawn in which ``x`` % of the *positive* class
comes from source H1 (the rest from H2) while the other class is split 50/50 between the
sources, with the same number of images per class at every ``x``; a model is trained on it and
tested on Test-100H1 (test images from H1 only), Test-100H2 and Test-50-50 (equally many from
each). Away from 50 the source predicts the label and a model can become a "hospital detector":
at ``x = 100`` an H2 image is never positive in training, so H2's positives are missed
(Test-100H2 falls) while H1 images still need the real signal; at ``x = 0`` the mirror image.
The H1 and H2 curves cross near 50/50, where Test-50-50 peaks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from cxr_audit.data.manifest import Manifest, load_manifest
from cxr_audit.errors import UsageError
from cxr_audit.evaluate import metrics as M
from cxr_audit.models.registry import load_checkpoint, preprocessing_of
from cxr_audit.runtime import now, resolve_device, versions, write_text_atomic
from cxr_audit.training.pipeline import predict, train


@dataclass
class StressResult:
    rows: list[dict] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)


def stress(data: str | Path, out: str | Path, *, sources: tuple[str, str] | None = None,
           positive: str | None = None, grid: list[int] = (0, 25, 50, 75, 100), per_class: int | None = None,
           arch: str = "resnet18", size: int = 64, epochs: int = 5, batch_size: int = 32, lr: float | None = None,
           seed: int = 0, device: str = "auto", on_stage: Callable[[str], None] | None = None,
           on_progress: Callable[..., None] | None = None) -> StressResult:
    """Run the sweep; writes per-``x`` manifests and checkpoints, ``stress.json``, ``stress.md``
    and ``stress.png`` to ``out``. ``data`` needs a ``source`` column with two sources and
    ``train``/``test`` splits; each model trains for ``epochs`` on its biased set (no model selection
    on unbiased validation data, which would hide the effect)."""
    say = on_stage or (lambda _: None)
    manifest = load_manifest(data)
    if manifest.num_classes != 2:
        raise UsageError(f"stress needs a two-class manifest, {data} has {manifest.class_names}")
    h1, h2 = sources or _two_sources(manifest)
    pos = manifest.class_names.index(positive) if positive else 0
    if positive and positive not in manifest.class_names:
        raise UsageError(f"--positive '{positive}' is not a class ({', '.join(manifest.class_names)})")
    if any(not 0 <= x <= 100 for x in grid):
        raise UsageError("grid values are percentages in [0, 100]")
    train_pool = manifest.subset("train")
    test = manifest.subset("test")
    pools = {(src, c): [s for s in train_pool.samples if s.source == src and s.label == c]
             for src in (h1, h2) for c in (0, 1)}
    # the largest class size that every x in the grid can draw without replacement
    feasible = min(min(len(pools[(h1, c)]), len(pools[(h2, c)])) for c in (0, 1))
    per_class = min(per_class or feasible, feasible)
    if per_class < 4:
        raise UsageError(f"too few training images per source and class to sweep ({per_class}); need >= 4")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    src = np.array([s.source for s in test.samples])
    result = StressResult()
    for k, x in enumerate(grid):
        say(f"{x}% of '{manifest.class_names[pos]}' from {h1} ({k + 1}/{len(grid)})")
        chosen = _biased_draw(pools, h1, h2, pos, x, per_class, np.random.default_rng(seed + k))
        extra = list(test.samples)  # no val rows: model selection on unbiased data would hide the effect
        csv = out / f"x{x:03d}" / "manifest.csv"
        replace(manifest, samples=chosen + extra).write(csv)
        ckpt = train(csv, out / f"x{x:03d}" / "model.pt", arch, size=size, epochs=epochs, batch_size=batch_size,
                     lr=lr, seed=seed, device=device, on_progress=on_progress).checkpoint
        model, config = load_checkpoint(ckpt)
        logits, labels = predict(model.to(dev), test, preprocessing_of(config), dev)
        pred, y = logits.argmax(1).numpy(), labels.numpy()
        rows = M.balanced_two_source(src, h1, h2, np.random.default_rng(seed))
        result.rows.append({"x": x, "test_100_h1": M.accuracy(pred[src == h1], y[src == h1]),
                            "test_100_h2": M.accuracy(pred[src == h2], y[src == h2]),
                            "test_50_50": M.accuracy(pred[rows], y[rows]), "train_per_class": per_class,
                            **prototype_source_shares(ckpt, h1)})
    options = {"data": str(data), "sources": [h1, h2], "positive": manifest.class_names[pos], "grid": list(grid),
               "per_class": per_class, "arch": arch, "size": size, "epochs": epochs, "seed": seed}
    write_text_atomic(out / "stress.json", json.dumps({"rows": result.rows, "options": options, "created": now(),
                                                 "versions": versions()}, indent=2))
    write_text_atomic(out / "stress.md", stress_markdown(result.rows, h1, h2, manifest.class_names[pos]))
    result.files = {"json": out / "stress.json", "markdown": out / "stress.md",
                    "plot": _plot(out / "stress.png", result.rows, h1, h2, manifest.class_names[pos])}
    return result


def _biased_draw(pools: dict, h1: str, h2: str, pos: int, x: int, per_class: int, rng) -> list:
    """``per_class`` training samples per class: ``x`` % of class ``pos`` from ``h1`` (the rest from
    ``h2``), the other class half from each."""
    chosen = []
    for c in (0, 1):
        share = x / 100 if c == pos else 0.5
        n1 = int(round(share * per_class))
        chosen += list(rng.choice(pools[(h1, c)], n1, replace=False)) + \
            list(rng.choice(pools[(h2, c)], per_class - n1, replace=False))
    return chosen


def _two_sources(manifest: Manifest) -> tuple[str, str]:
    kinds = manifest.sources
    if len(kinds) != 2:
        raise UsageError(f"stress needs exactly two sources (found {kinds or 'none'}); pass --sources H1,H2")
    return kinds[0], kinds[1]


def prototype_source_shares(checkpoint: Path, h1: str) -> dict:
    """For a ProtoPNet checkpoint, ``{"prototypes_from_h1": {class: share}}``: the share of each class's
    prototypes projected onto a training image from source ``h1`` (Gautam et al., 2022); ``{}`` for
    other models."""
    import torch

    records = torch.load(checkpoint, map_location="cpu", weights_only=True)["extra"].get("prototypes")
    if not records:
        return {}
    by_class: dict[str, list[bool]] = {}
    for r in records:
        by_class.setdefault(r["class"], []).append(r.get("source") == h1)
    return {"prototypes_from_h1": {c: float(np.mean(v)) for c, v in by_class.items()}}


def stress_markdown(rows: list[dict], h1: str, h2: str, positive: str) -> str:
    classes = list(rows[0].get("prototypes_from_h1", {})) if rows else []
    extra = "".join(f" {c} prototypes from {h1} |" for c in classes)
    lines = [f"| % of {positive} from {h1} | Test-100{h1} | Test-100{h2} | Test-50-50 |{extra}",
             "|---|---|---|---|" + "---|" * len(classes)]
    for r in rows:
        shares = "".join(f" {r['prototypes_from_h1'][c]:.2f} |" for c in classes)
        lines.append(f"| {r['x']} | {r['test_100_h1']:.3f} | {r['test_100_h2']:.3f} | {r['test_50_50']:.3f} |{shares}")
    return "\n".join(lines) + "\n"


def _plot(path: Path, rows: list[dict], h1: str, h2: str, positive: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cxr_audit.report.figures import save_figure

    xs = [r["x"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, label in (("test_100_h1", f"Test-100{h1}"), ("test_100_h2", f"Test-100{h2}"), ("test_50_50", "Test-50-50")):
        ax.plot(xs, [r[key] for r in rows], marker="o", label=label)
    ax.set_xlabel(f"% of '{positive}' training images from {h1}")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend()
    ax.set_title("source-imbalance stress test")
    return save_figure(fig, path)
