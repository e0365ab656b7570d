"""The self-contained demo: a dataset with a known shortcut, a model that learns it, and a scan
that shows it. Each stage calls the same library function as the matching CLI command."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from sklearn.metrics import roc_auc_score

from cxr_audit.annotate.pipeline import annotate
from cxr_audit.data.inject import inject
from cxr_audit.data.phantom import generate_phantoms
from cxr_audit.evaluate.pipeline import evaluate
from cxr_audit.evaluate.relevance import scan_artifact_share
from cxr_audit.report.figures import heatmap_grid
from cxr_audit.reveal.pipeline import reveal
from cxr_audit.scan.pipeline import scan
from cxr_audit.training.pipeline import train
from cxr_audit.unlearn.pipeline import DEFAULT_METHOD, unlearn

COMPARED = ("accuracy", "artifact_inserted_accuracy", "artifact_inserted_drop", "artifact_relevance_share",
            "artifact_gradient_share", "worst_group_accuracy")


@dataclass
class DemoResult:
    out: Path
    metrics: dict = field(default_factory=dict)  # what the audit found
    comparison: dict = field(default_factory=dict)  # metric -> (before, after)
    files: dict = field(default_factory=dict)


def run_demo(out: str | Path = "demo-out", arch: str = "resnet18", artifact: str = "text", n: int = 500,
             size: int = 64, epochs: int = 8, prevalence: float = 0.8, unlearn_epochs: int = 4, seed: int = 0, device: str = "auto",
             on_stage: Callable[[str], None] | None = None,
             on_progress: Callable[..., None] | None = None) -> DemoResult:
    """Phantoms → artifact in ``prevalence`` of the *disease* training/validation images → train →
    scan → heatmap figure → reveal (ranked concepts, HTML report) → annotate from 5 artifact
    examples (labels, masks) → unlearn with counterfactual artifact augmentation (the default method) → evaluate before/after on
    the clean test split and with the artifact drawn on every *healthy* test image.

    ``metrics`` holds what was found; ``comparison`` the before/after evaluation."""
    out = Path(out)
    say = on_stage or (lambda _: None)
    result = DemoResult(out)

    say("generating phantoms")
    clean = generate_phantoms(out / "phantoms", n=n, size=size, seed=seed, on_progress=on_progress)
    say(f"injecting '{artifact}' into {prevalence:.0%} of disease train/val images")
    poisoned = inject(clean, out / "poisoned", artifact, {"disease": prevalence}, splits=["train", "val"],
                      seed=seed, on_progress=on_progress)

    say(f"training {arch} at {size}px")
    summary = train(poisoned, out / "model.pt", arch, size=size, epochs=epochs, seed=seed, device=device,
                    on_progress=on_progress)

    say("scanning (LRP heatmaps, activations, concept relevances)")
    scan_path = scan(summary.checkpoint, poisoned, out / "scan.h5", overwrite=True,
                     device=device, on_progress=on_progress).path
    share = scan_artifact_share(scan_path)
    result.metrics["artifact relevance share (train artifact samples)"] = share["share"]
    result.metrics["artifact mask area share"] = share["mask_area"]
    rows = share["rows"][np.argsort(-share["per_sample"])][:8]
    result.files["scan"] = scan_path
    result.files["heatmaps"] = heatmap_grid(
        scan_path, rows.tolist(), out / "heatmaps.png",
        title=f"{arch} trained with a '{artifact}' shortcut: LRP heatmaps of artifact images")
    result.files["model"] = summary.checkpoint

    say("revealing: ranking concepts the model uses for a subset of a class")
    found = reveal(scan_path, out / "reveal")
    truth = np.isin(found["sample_ids"], _manifest_ids(scan_path, share["rows"]))
    # the members' CAV (what `annotate --concept` uses next) is a steadier detector than one channel
    best = max(roc_auc_score(truth, c["scores"].get("cav", c["scores"]["activation_max"]))
               for c in found["concepts"][:3])
    result.metrics["artifact retrieval AUROC (best of top-3 revealed concepts)"] = best
    result.files["reveal report"] = out / "reveal" / "report.html"

    _revise(result, scan_path, share["rows"], summary.checkpoint, poisoned, artifact, unlearn_epochs, seed, device,
            say, on_progress)
    return result


def _revise(result: DemoResult, scan_path: Path, artifact_rows: np.ndarray, checkpoint: Path, poisoned: Path,
            artifact: str, unlearn_epochs: int, seed: int, device: str, say, on_progress) -> None:
    """The demo's second half: annotate from 5 artifact examples, unlearn, evaluate before/after."""
    out = result.out
    say("annotating: CAV from 5 artifact examples labels the rest and paints masks")
    with_index = _manifest_ids(scan_path, artifact_rows[:5])
    ann = annotate(scan_path, out / "annotations.h5", seeds=with_index, masks_dir=out / "masks", device=device,
                   on_progress=on_progress)
    result.metrics["artifact retrieval AUROC (held-out, 5 seeds)"] = ann.quality["retrieval_held_out"]["auroc"]
    result.metrics["artifact mask IoU"] = ann.quality.get("mask_iou", float("nan"))
    result.files["contact sheet"] = ann.files["contact_sheet"]
    result.files["annotated manifest"] = ann.files["manifest"]

    say(f"unlearning with {DEFAULT_METHOD} (the default: the annotated stamp pasted into healthy images)")
    fixed = unlearn(checkpoint, ann.files["manifest"], out / "unlearned.pt", DEFAULT_METHOD,
                    annotations=out / "annotations.h5", epochs=unlearn_epochs, device=device, seed=seed,
                    on_progress=on_progress)
    result.files["unlearned model"] = fixed.checkpoint

    say("evaluating before/after: clean test, and the artifact drawn on every healthy test image")
    evaluation = evaluate(checkpoint, poisoned, out / "evaluation", compare=fixed.checkpoint,
                          artifact=artifact, artifact_class_name="disease", device=device, seed=seed)
    result.comparison = {key: (evaluation.metrics["model"][key], evaluation.metrics["compare"][key])
                         for key in COMPARED if key in evaluation.metrics["model"]}
    result.files["evaluation"] = evaluation.files["markdown"]


def _manifest_ids(scan_path: Path, rows: np.ndarray) -> list[int]:
    from cxr_audit.store.scan_file import ScanFile

    with ScanFile(scan_path) as scan:
        return [int(i) for i in scan.index()[rows]]
