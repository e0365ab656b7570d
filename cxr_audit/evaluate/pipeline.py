"""``evaluate``: prove on artifact-controlled tests that a model does (not) use a shortcut.

For one checkpoint, or a before/after pair evaluated on the same test images and the same
inserted artifacts, computes (keys of ``metrics.json``; ``gate`` thresholds use the same names):

* ``accuracy``, ``auroc``; ``source_accuracy`` and ``group_accuracy`` (source × label, or label
  alone with one source) and ``worst_group_accuracy``;
* with two sources H1, H2 (Gautam et al., 2022): ``test_100_h1``, ``test_100_h2``,
  ``test_50_50`` (equal samples from each) and ``h1_h2_gap``;
* with an artifact (``artifact=NAME`` drawn by an injector, or ``paste_from=CSV`` cut out of
  annotated samples by their masks): ``artifact_inserted_accuracy`` — the whole test set with the
  artifact inserted into every image of the other classes — and ``artifact_inserted_drop``
  (clean minus inserted); ``artifact_relevance_share``: positive LRP relevance for the artifact's
  class inside the inserted artifact / all positive relevance, next to ``artifact_mask_area``;
  ``artifact_gradient_share``: the same with gradient × input (= LRP-0 for ReLU networks). Both,
  because they disagree after gradient-based mitigations: RRR drives input gradients in the mask
  to zero (G×I share falls ~90 % on phantoms) while LRP-z+ relevance, which follows positive
  activations rather than sensitivity, can stay where it was (docs/evaluate.md: z+, γ-box and
  α2β1 all keep the share after RRR/RR-ClArC; "the share falls" is read on the G×I one);
* with lung masks: ``activation_precision`` (top-5 % relevance pixels inside the lungs);
* for a multi-label model, per finding (``auroc.NAME``, ``artifact_inserted_auroc_drop.NAME``, ...)
  and their macro means (:mod:`cxr_audit.evaluate.findings`);
* for a prototype model (ProtoPNet), ``prp_average_drop`` / ``prp_average_increase`` and
  ``activation_average_drop`` / ``activation_average_increase``: how much of each top prototype's
  similarity score survives when only the most relevant half of its PRP map, or of its upsampled
  similarity map, is kept (:mod:`cxr_audit.evaluate.faithfulness`);
* with ``annotations``: ``tcav_score`` (share of the artifact class's test samples whose logit
  increases along the CAV; Kim et al., 2018, ICML) and ``tcav_sensitivity`` (mean directional
  derivative).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cxr_audit.annotate.store import read_annotations
from cxr_audit.data.attack import artifact_class
from cxr_audit.data.manifest import load_manifest
from cxr_audit.errors import UsageError
from cxr_audit.evaluate import findings as F
from cxr_audit.evaluate import metrics as M
from cxr_audit.evaluate.blocks import TestBlocks
from cxr_audit.evaluate.faithfulness import PrototypeFaithfulness, prototype_faithfulness
from cxr_audit.evaluate.relevance import relevance_share
from cxr_audit.explain import create_method, explain_batch
from cxr_audit.explain.core import parameters_frozen
from cxr_audit.models.architectures import spec_of
from cxr_audit.models.registry import load_checkpoint, preprocessing_of
from cxr_audit.numerics.tensors import spatial_mean
from cxr_audit.runtime import now, resolve_device, versions, write_text_atomic
from cxr_audit.training.pipeline import batched_logits


@dataclass
class EvaluationResult:
    metrics: dict[str, dict] = field(default_factory=dict)  # model label -> metric -> value
    files: dict[str, Path] = field(default_factory=dict)


def evaluate(model: str | Path, data: str | Path, out: str | Path | None = None, *,
             compare: str | Path | None = None, split: str | None = "test", artifact: str | None = None,
             paste_from: str | Path | None = None, artifact_class_name: str | None = None,
             annotations: str | Path | None = None, cav_method: str = "ridge", attribution: str = "lrp",
             sources: tuple[str, str] | None = None, device: str = "auto", batch_size: int = 32, seed: int = 0,
             on_stage: Callable[[str], None] | None = None,
             on_progress: Callable[..., None] | None = None) -> EvaluationResult:
    """Evaluate ``model`` (and ``compare``) on ``data``'s ``split``; write ``metrics.json`` and
    ``metrics.md`` to ``out`` when given. ``on_progress(done, total, status)`` after each block
    of test images."""
    if artifact and paste_from:
        raise UsageError("give --artifact (an injector) or --paste-from (annotated samples), not both")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise UsageError(f"--out {out} is a file; evaluate writes a folder (metrics.json, metrics.md)")
    say = on_stage or (lambda _: None)
    _, config = load_checkpoint(model)
    names = config["class_names"]
    manifest = load_manifest(data, class_names=names, multilabel=config.get("multilabel", False))
    has_splits = {s.split for s in manifest.samples} != {""}
    test = manifest.subset(split) if split and has_splits else manifest
    target = _target_class(artifact_class_name, names, artifact, paste_from, manifest, annotations)
    unknown = sorted(set(sources or ()) - {s.source for s in test.samples})
    if unknown:
        raise UsageError(f"--sources {', '.join(unknown)} not in the test data (sources: "
                         f"{', '.join(sorted({s.source for s in test.samples}))})")
    result = EvaluationResult()
    labels = {"model": model} | ({"compare": compare} if compare else {})
    # streamed a block at a time; a before/after pair sharing a preprocessing sees the same tensors
    inputs = TestBlocks(test, target, artifact, paste_from, names, seed)
    for label, ckpt in labels.items():
        say(f"evaluating {Path(ckpt).name}")
        result.metrics[label] = _evaluate_one(ckpt, names, inputs, annotations, cav_method, attribution, sources,
                                              device, batch_size, seed, on_progress)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        options = {"model": str(model), "compare": str(compare) if compare else None, "data": str(data),
                   "split": split, "artifact": artifact, "paste_from": str(paste_from) if paste_from else None,
                   "artifact_class": names[target] if target is not None else None,
                   "annotations": str(annotations) if annotations else None, "cav_method": cav_method,
                   "attribution": attribution, "seed": seed}
        write_text_atomic(out / "metrics.json", json.dumps(
            {"metrics": result.metrics, "options": options, "created": now(), "versions": versions()},
            indent=2, default=_jsonable))
        write_text_atomic(out / "metrics.md", markdown_table(result.metrics, labels))
        result.files = {"json": out / "metrics.json", "markdown": out / "metrics.md"}
    return result


def _target_class(name, names, artifact, paste_from, manifest, annotations) -> int | None:
    if name is not None:
        if name not in names:
            raise UsageError(f"--artifact-class '{name}' is not a class of the model ({', '.join(names)})")
        return names.index(name)
    if not (artifact or paste_from or annotations):
        return None
    if paste_from:
        return artifact_class(load_manifest(paste_from, class_names=names))
    flags = read_annotations(annotations).labels if annotations else None
    if any(s.artifact for s in manifest.samples) or flags:
        return artifact_class(manifest, flags)
    raise UsageError("cannot tell which class the artifact points to: pass --artifact-class")


@dataclass
class _Outputs:
    """One model's outputs over the whole test set, gathered block by block: ``logits (N, K)``,
    ``labels (N,)`` or ``(N, K)``; for the victims (positions ``attacked_rows (V,)``) their
    inserted-copy ``attacked_logits (V, K)`` and relevance shares inside the inserted artifact;
    ``precision (N,)`` with lung masks; ``sensitivity (M,)`` for TCAV."""

    logits: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    attacked_rows: list = field(default_factory=list)
    attacked_logits: list = field(default_factory=list)
    shares: dict = field(default_factory=dict)  # attribution method -> [per victim]
    mask_area: list = field(default_factory=list)
    precision: list = field(default_factory=list)
    sensitivity: list = field(default_factory=list)
    faithfulness: list = field(default_factory=list)  # PrototypeFaithfulness per block

    def cat(self, name: str):
        parts = getattr(self, name)
        return torch.cat(parts).numpy() if parts and isinstance(parts[0], torch.Tensor) else np.concatenate(parts)


@dataclass
class _Plan:
    """What to compute per block: heatmap methods for the inserted copies (none for multi-label),
    lung-mask precision, TCAV ``(layer, cav, class)``."""

    attribution_methods: tuple[str, ...] = ()
    precision_method: str | None = None
    tcav: tuple | None = None
    prototype_layer: str | None = None  # a prototype model's similarity maps: AD/AI of PRP vs upsampled maps
    generator: torch.Generator | None = None  # the noise of the AD/AI masks
    on_progress: Callable[..., None] | None = None
    label: str = ""


def _gather(net, config, prep, inputs: TestBlocks, plan: _Plan, dev, batch_size) -> _Outputs:
    """Run the model over the test blocks once, keeping per-sample outputs only (:class:`_Outputs`)."""
    out = _Outputs()
    for block in inputs(prep):
        images, y = block.batch["image"], block.batch["label"]
        logits = batched_logits(net, images, dev, batch_size)
        out.logits.append(logits)
        out.labels.append(y)
        if block.attacked is not None:
            a = block.attacked
            out.attacked_rows.append(block.attacked_rows)
            out.attacked_logits.append(batched_logits(net, a.images, dev, batch_size))
            targets = torch.full((len(a.images),), inputs.target)
            for method in plan.attribution_methods:
                heat = _heatmaps(net, config, prep, a.images, targets, method, dev, batch_size)
                out.shares.setdefault(method, []).append(relevance_share(heat, a.masks[:, 0].numpy()))
            out.mask_area.append(a.masks.mean((1, 2, 3)))
        if plan.precision_method:
            heat = _heatmaps(net, config, prep, images, logits.argmax(1), plan.precision_method, dev, batch_size)
            out.precision.append(M.activation_precision(heat, block.batch["mask"][:, 0].numpy()))
        if plan.tcav:
            layer, cav, cls = plan.tcav
            members = images[torch.as_tensor(y == cls)]
            out.sensitivity.append(_directional_derivatives(net, members, layer, cav, cls, dev, batch_size))
        if plan.prototype_layer:
            out.faithfulness.append(prototype_faithfulness(net, config["arch"], prep, plan.prototype_layer, images,
                                                           dev, plan.generator, batch_size=batch_size))
        if plan.on_progress:
            plan.on_progress(int(block.rows[-1]) + 1, len(inputs.test), plan.label)
    return out


def _evaluate_one(ckpt, names, inputs: TestBlocks, annotations, cav_method, attribution, sources, device,
                  batch_size, seed, on_progress=None) -> dict:
    test, target = inputs.test, inputs.target
    dev = resolve_device(device)
    net, config = load_checkpoint(ckpt)
    if config["class_names"] != names:
        raise UsageError(f"{ckpt} has classes {config['class_names']}, the first model {names}")
    net = net.to(dev)
    prep = preprocessing_of(config)
    if test.multilabel:
        plan = _Plan(on_progress=on_progress, label=Path(ckpt).name)
        return _evaluate_findings(_gather(net, config, prep, inputs, plan, dev, batch_size), names, inputs)
    ann = read_annotations(annotations, method=None if cav_method == "annotation" else cav_method) \
        if annotations else None
    plan = _Plan(attribution_methods=(attribution,) + (("gxi",) if attribution != "gxi" else ()),
                 precision_method=attribution if all(s.mask is not None for s in test.samples) else None,
                 tcav=(ann.layer, torch.from_numpy(ann.cav), target if target is not None
                       else artifact_class(test, ann.labels)) if ann else None,
                 prototype_layer=spec_of(config["arch"]).prototype_layer,
                 generator=torch.Generator().manual_seed(seed), on_progress=on_progress, label=Path(ckpt).name)
    o = _gather(net, config, prep, inputs, plan, dev, batch_size)
    logits, y = torch.from_numpy(o.cat("logits")), o.cat("labels")
    pred = logits.argmax(1).numpy()
    out: dict = {"n": len(test), "accuracy": M.accuracy(pred, y),
                 "auroc": M.auroc(torch.softmax(logits, 1).numpy(), y)}
    out.update(_group_metrics(pred, y, np.array([s.source for s in test.samples]), names, sources, seed))
    if inputs.attacks:
        out.update(_inserted_metrics(o, pred, y, names[target], attribution))
    if plan.precision_method:
        out["activation_precision"] = float(o.cat("precision").mean())
    if ann:
        sens = o.cat("sensitivity")
        out["tcav_score"] = float((sens > 0).mean()) if len(sens) else float("nan")
        out["tcav_sensitivity"] = float(sens.mean()) if len(sens) else float("nan")
        out["cav_layer"] = ann.layer
    if o.faithfulness:
        out.update(PrototypeFaithfulness.concat(o.faithfulness).metrics())
    return out


def _group_metrics(pred, y, src: np.ndarray, names, sources, seed) -> dict:
    """Per group (source × label, or label alone) and per source; the two-source tests."""
    kinds = sorted(set(src.tolist()))
    groups = [f"{s}|{names[l]}" if len(kinds) > 1 else names[l] for s, l in zip(src, y)]
    out: dict = {"group_accuracy": M.group_accuracy(pred, y, groups)}
    out["worst_group_accuracy"] = min(out["group_accuracy"].values())
    if len(kinds) > 1:
        out["source_accuracy"] = M.group_accuracy(pred, y, src.tolist())
    pair = sources or (tuple(kinds) if len(kinds) == 2 else None)
    if pair:
        out.update(_two_source_metrics(pred, y, src, pair, seed))
    return out


def _inserted_metrics(o: _Outputs, pred, y, artifact_class_name: str, attribution: str) -> dict:
    """Clean vs artifact-inserted accuracy and the relevance inside the inserted artifact."""
    rows = o.cat("attacked_rows")
    attacked_pred = o.cat("attacked_logits").argmax(1)
    inserted = pred.copy()
    inserted[rows] = attacked_pred
    out = {"artifact_class": artifact_class_name, "artifact_inserted_accuracy": M.accuracy(inserted, y)}
    out["artifact_inserted_drop"] = M.accuracy(pred, y) - out["artifact_inserted_accuracy"]
    out["victims_clean_accuracy"] = M.accuracy(pred[rows], y[rows])
    out["victims_inserted_accuracy"] = M.accuracy(attacked_pred, y[rows])
    out["artifact_relevance_share"] = _mean_share(o.shares[attribution])
    if "gxi" in o.shares and attribution != "gxi":
        out["artifact_gradient_share"] = _mean_share(o.shares["gxi"])
    out["artifact_mask_area"] = float(o.cat("mask_area").mean())
    return out


def _mean_share(parts: list[np.ndarray]) -> float:
    """Mean of the per-image shares that are defined; NaN (without numpy's warning) when none is:
    an image whose relevance sums to zero, e.g. a model that outputs a constant, has no share."""
    values = np.concatenate(parts)
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else float("nan")


def _two_source_metrics(pred: np.ndarray, y: np.ndarray, src: np.ndarray, pair, seed: int) -> dict:
    """Test-100H1 / Test-100H2 / Test-50-50 of Gautam et al. (2022) and the H1-H2 gap."""
    h1, h2 = pair
    out = {"test_100_h1": M.accuracy(pred[src == h1], y[src == h1]), "test_100_h2": M.accuracy(pred[src == h2], y[src == h2])}
    rows = M.balanced_two_source(src, h1, h2, np.random.default_rng(seed))
    out["test_50_50"] = M.accuracy(pred[rows], y[rows])
    out["h1_h2_gap"] = abs(out["test_100_h1"] - out["test_100_h2"])
    out["sources"] = list(pair)
    return out


def _evaluate_findings(o: _Outputs, names, inputs: TestBlocks) -> dict:
    """Multi-label models: per-finding AUROC/accuracy, clean and artifact-inserted (see
    :mod:`cxr_audit.evaluate.findings`), flat keys ``METRIC.FINDING`` for tables and ``gate``."""
    y = o.cat("labels")
    probs = torch.sigmoid(torch.from_numpy(o.cat("logits"))).numpy()
    findings = F.per_finding(probs, y, names)
    out: dict = {"n": len(inputs.test), "multilabel": True}
    if inputs.attacks:
        inserted = torch.sigmoid(torch.from_numpy(o.cat("attacked_logits"))).numpy()
        F.with_inserted(findings, probs, inserted, o.cat("attacked_rows"), y, names)
        out["artifact_class"] = names[inputs.target]
    keys = list(next(iter(findings.values())))
    out.update({key: F.macro(findings, key) for key in keys if key != "prevalence"})
    out.update({f"{key}.{name}": figures[key] for name, figures in findings.items() for key in keys})
    out["findings"] = findings
    return out


def _heatmaps(net, config, prep, images, targets, method, dev, batch_size) -> np.ndarray:
    """``(N, S, S)`` heatmaps for ``targets (N,)``."""
    heat = []
    with parameters_frozen(net):
        attribution = create_method(method, net, config["arch"], prep)
        capture = attribution.capture([])
        with attribution.rules(), capture.attached(attribution.model):
            for i in range(0, len(images), batch_size):
                expl = explain_batch(attribution, capture, images[i:i + batch_size].to(dev),
                                     {"t": targets[i:i + batch_size]})
                heat.append(expl.heatmaps["t"].cpu())
    return torch.cat(heat).numpy() if heat else np.zeros((0,) + images.shape[-2:])


def _directional_derivatives(net, images, layer, v, cls, dev, batch_size) -> np.ndarray:
    """``⟨mean_space ∂f_cls/∂a, v⟩`` per sample ``(N,)`` at ``layer``."""
    store: dict = {}

    handle = net.get_submodule(layer).register_forward_hook(lambda _m, _i, output: store.__setitem__("a", output))
    out = []
    try:
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(dev).requires_grad_(True)
            logit = net(x)[:, cls].sum()
            (grad,) = torch.autograd.grad(logit, store["a"])
            out.append((spatial_mean(grad).float().cpu() @ v).detach())
    finally:
        handle.remove()
    return torch.cat(out).numpy() if out else np.zeros(0)


def markdown_table(metrics: dict[str, dict], labels: dict[str, object]) -> str:
    """One row per scalar metric, one column per model (+ the change when two are compared)."""
    cols = list(metrics)
    head = ["metric"] + [f"{c} ({Path(str(labels[c])).name})" for c in cols] + (["change"] if len(cols) == 2 else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = [k for k in metrics[cols[0]] if isinstance(metrics[cols[0]][k], (int, float))]
    for key in keys:
        values = [metrics[c].get(key) for c in cols]
        row = [key] + [_fmt(v) for v in values]
        if len(cols) == 2 and all(isinstance(v, (int, float)) for v in values):
            row.append(_fmt(values[1] - values[0], signed=True))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, int):
        return str(v)
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def _jsonable(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(type(obj).__name__)
