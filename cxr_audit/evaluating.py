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
from cxr_audit.data.dataset import load_batch
from cxr_audit.data.manifest import load_manifest
from cxr_audit.errors import UsageError
from cxr_audit.evaluate import findings as F
from cxr_audit.evaluate import metrics as M
from cxr_audit.evaluate.attack import AttackedSet, artifact_class, inject_attack, paste_attack, victims
from cxr_audit.evaluate.relevance import relevance_share
from cxr_audit.explain import create_method, explain_batch
from cxr_audit.models.registry import load_checkpoint, preprocessing_of
from cxr_audit.runtime import now, resolve_device, versions, write_text_atomic
from cxr_audit.training import batched_logits
from cxr_audit.unlearn.rrclarc import spatial_mean

@dataclass
class EvaluationResult:
    metrics: dict[str, dict] = field(default_factory=dict)  # model label -> metric -> value
    files: dict[str, Path] = field(default_factory=dict)


def evaluate(model: str | Path, data: str | Path, out: str | Path | None = None, *,
             compare: str | Path | None = None, split: str | None = "test", artifact: str | None = None,
             paste_from: str | Path | None = None, artifact_class_name: str | None = None,
             annotations: str | Path | None = None, cav_method: str = "ridge", attribution: str = "lrp",
             sources: tuple[str, str] | None = None, device: str = "auto", batch_size: int = 32, seed: int = 0,
             on_stage: Callable[[str], None] | None = None) -> EvaluationResult:
    """Evaluate ``model`` (and ``compare``) on ``data``'s ``split``; write ``metrics.json`` and
    ``metrics.md`` to ``out`` when given."""
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
    inputs = _TestInputs(test, target, artifact, paste_from, names, seed)
    for label, ckpt in labels.items():
        say(f"evaluating {Path(ckpt).name}")
        result.metrics[label] = _evaluate_one(ckpt, names, inputs, annotations, cav_method, attribution, sources,
                                              device, batch_size, seed)
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


class _TestInputs:
    """The test images and their artifact-inserted copies, read once per preprocessing, so a
    before/after pair sharing it is evaluated on the very same tensors."""

    def __init__(self, test, target, artifact, paste_from, names, seed):
        self.test, self.target, self.artifact, self.paste_from = test, target, artifact, paste_from
        self.names, self.seed = names, seed
        self._batches: dict = {}
        self._attacked: dict = {}

    def batch(self, prep) -> dict:
        if prep not in self._batches:
            self._batches[prep] = load_batch(self.test, prep)
        return self._batches[prep]

    def attacked(self, prep) -> AttackedSet:
        if prep not in self._attacked:
            self._attacked[prep] = _attack(self.test, self.target, prep, self.artifact, self.paste_from, self.names,
                                           self.seed)
        return self._attacked[prep]


def _evaluate_one(ckpt, names, inputs: _TestInputs, annotations, cav_method, attribution, sources, device,
                  batch_size, seed) -> dict:
    test, target, artifact, paste_from = inputs.test, inputs.target, inputs.artifact, inputs.paste_from
    dev = resolve_device(device)
    net, config = load_checkpoint(ckpt)
    if config["class_names"] != names:
        raise UsageError(f"{ckpt} has classes {config['class_names']}, the first model {names}")
    net = net.to(dev)
    prep = preprocessing_of(config)
    if inputs.test.multilabel:
        return _evaluate_findings(net, names, inputs, prep, dev, batch_size)
    batch = inputs.batch(prep)
    images, y = batch["image"], batch["label"].numpy()
    logits = batched_logits(net, images, dev, batch_size)
    pred = logits.argmax(1).numpy()
    out: dict = {"n": len(test), "accuracy": M.accuracy(pred, y),
                 "auroc": M.auroc(torch.softmax(logits, 1).numpy(), y)}
    src = np.array([s.source for s in test.samples])
    kinds = sorted(set(src.tolist()))
    groups = [f"{s}|{names[l]}" if len(kinds) > 1 else names[l] for s, l in zip(src, y)]
    out["group_accuracy"] = M.group_accuracy(pred, y, groups)
    out["worst_group_accuracy"] = min(out["group_accuracy"].values())
    if len(kinds) > 1:
        out["source_accuracy"] = M.group_accuracy(pred, y, src.tolist())
    pair = sources or (tuple(kinds) if len(kinds) == 2 else None)
    if pair:
        out.update(_two_source_metrics(pred, y, src, pair, seed))

    if target is not None and (artifact or paste_from):
        attacked = inputs.attacked(prep)
        inserted = pred.copy()
        rows = attacked.rows_in(test)
        attacked_pred = batched_logits(net, attacked.images, dev, batch_size).argmax(1).numpy()
        inserted[rows] = attacked_pred
        out["artifact_class"] = names[target]
        out["artifact_inserted_accuracy"] = M.accuracy(inserted, y)
        out["artifact_inserted_drop"] = out["accuracy"] - out["artifact_inserted_accuracy"]
        out["victims_clean_accuracy"] = M.accuracy(pred[rows], y[rows])
        out["victims_inserted_accuracy"] = M.accuracy(attacked_pred, y[rows])
        heat = _heatmaps(net, config, prep, attacked.images, torch.full((len(rows),), target), attribution, dev,
                         batch_size)
        out["artifact_relevance_share"] = float(np.nanmean(relevance_share(heat, attacked.masks[:, 0].numpy())))
        if attribution != "gxi":
            heat = _heatmaps(net, config, prep, attacked.images, torch.full((len(rows),), target), "gxi", dev,
                             batch_size)
            out["artifact_gradient_share"] = float(np.nanmean(relevance_share(heat, attacked.masks[:, 0].numpy())))
        out["artifact_mask_area"] = float(attacked.masks.mean())
    if "mask" in batch and len(batch["mask"]) == len(test):
        heat = _heatmaps(net, config, prep, images, torch.from_numpy(pred), attribution, dev, batch_size)
        out["activation_precision"] = float(M.activation_precision(heat, batch["mask"][:, 0].numpy()).mean())
    if annotations:
        ann = read_annotations(annotations, method=None if cav_method == "annotation" else cav_method)
        cls = target if target is not None else artifact_class(test, ann.labels)
        members = images[torch.from_numpy(y == cls)]
        sens = _directional_derivatives(net, members, ann.layer, torch.from_numpy(ann.cav), cls, dev, batch_size)
        out["tcav_score"] = float((sens > 0).mean()) if len(sens) else float("nan")
        out["tcav_sensitivity"] = float(sens.mean()) if len(sens) else float("nan")
        out["cav_layer"] = ann.layer
    return out


def _two_source_metrics(pred: np.ndarray, y: np.ndarray, src: np.ndarray, pair, seed: int) -> dict:
    """Test-100H1 / Test-100H2 / Test-50-50 of Gautam et al. (2022) and the H1-H2 gap."""
    h1, h2 = pair
    out = {"test_100_h1": M.accuracy(pred[src == h1], y[src == h1]), "test_100_h2": M.accuracy(pred[src == h2], y[src == h2])}
    rows = M.balanced_two_source(src, h1, h2, np.random.default_rng(seed))
    out["test_50_50"] = M.accuracy(pred[rows], y[rows])
    out["h1_h2_gap"] = abs(out["test_100_h1"] - out["test_100_h2"])
    out["sources"] = list(pair)
    return out


def _evaluate_findings(net, names, inputs: _TestInputs, prep, dev, batch_size) -> dict:
    """Multi-label models: per-finding AUROC/accuracy, clean and artifact-inserted (see
    :mod:`cxr_audit.evaluate.findings`), flat keys ``METRIC.FINDING`` for tables and ``gate``."""
    batch = inputs.batch(prep)
    y = batch["label"].numpy()
    probs = torch.sigmoid(batched_logits(net, batch["image"], dev, batch_size)).numpy()
    findings = F.per_finding(probs, y, names)
    out: dict = {"n": len(inputs.test), "multilabel": True}
    if inputs.target is not None and (inputs.artifact or inputs.paste_from):
        attacked = inputs.attacked(prep)
        rows = attacked.rows_in(inputs.test)
        inserted = torch.sigmoid(batched_logits(net, attacked.images, dev, batch_size)).numpy()
        F.with_inserted(findings, probs, inserted, rows, y, names)
        out["artifact_class"] = names[inputs.target]
    keys = list(next(iter(findings.values())))
    out.update({key: F.macro(findings, key) for key in keys if key != "prevalence"})
    out.update({f"{key}.{name}": figures[key] for name, figures in findings.items() for key in keys})
    out["findings"] = findings
    return out


def _attack(test, target, prep, artifact, paste_from, names, seed) -> AttackedSet:
    targets = victims(test, target)
    if artifact:
        return inject_attack(targets, prep, artifact, seed=seed)
    return paste_attack(targets, load_manifest(paste_from, class_names=names), prep, seed=seed)


def _heatmaps(net, config, prep, images, targets, method, dev, batch_size) -> np.ndarray:
    """``(N, S, S)`` heatmaps for ``targets (N,)``."""
    frozen = [p.requires_grad for p in net.parameters()]
    for p in net.parameters():
        p.requires_grad_(False)
    attribution = create_method(method, net, config["arch"], prep)
    capture = attribution.capture([])
    heat = []
    try:
        with attribution.rules(), capture.attached(attribution.model):
            for i in range(0, len(images), batch_size):
                expl = explain_batch(attribution, capture, images[i:i + batch_size].to(dev),
                                     {"t": targets[i:i + batch_size]})
                heat.append(expl.heatmaps["t"].cpu())
    finally:
        for p, flag in zip(net.parameters(), frozen):
            p.requires_grad_(flag)
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
