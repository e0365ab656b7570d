"""``cxr-audit evaluate``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from cxr_audit.cli._common import console, err_console, friendly_errors, progress_bar, split_csv
from cxr_audit.data.artifacts import ARTIFACTS
from cxr_audit.errors import UsageError
from cxr_audit.evaluate.pipeline import evaluate as evaluate_lib


@friendly_errors
def evaluate(model: Path = typer.Option(..., "--model", "-m", help="Checkpoint to evaluate."),
             data: Path = typer.Option(..., "--data", "-d", help="Manifest CSV or ImageFolder."),
             out: Path = typer.Option(..., "--out", "-o", help="Folder for metrics.json and metrics.md."),
             compare: Optional[Path] = typer.Option(None, "--compare", help="A second checkpoint (e.g. after unlearn)."),
             split: str = typer.Option("test", "--split", help="Split to evaluate ('' = all rows)."),
             artifact: Optional[str] = typer.Option(None, "--artifact",
                                                    help=f"Insert this injector's artifact ({', '.join(ARTIFACTS)})."),
             paste_from: Optional[Path] = typer.Option(None, "--paste-from",
                                                       help="Manifest whose artifact samples (with artifact_mask) are cut "
                                                            "out and pasted, for real artifacts."),
             artifact_class: Optional[str] = typer.Option(None, "--artifact-class",
                                                          help="Class the artifact points to (default: inferred)."),
             annotations: Optional[Path] = typer.Option(None, "--annotations", "-a", help="annotations.h5 for TCAV."),
             sources: Optional[list[str]] = typer.Option(None, "--sources", help="H1,H2 for the Test-100/50-50 protocol."),
             attribution: str = typer.Option("lrp", "--attribution", help="Heatmap method for relevance metrics."),
             device: str = typer.Option("auto", "--device"),
             batch_size: int = typer.Option(32, "--batch-size"),
             seed: int = typer.Option(0, "--seed")) -> None:
    """Accuracy, worst-group and artifact-inserted accuracy, artifact relevance, TCAV, Activation Precision."""
    pair = split_csv(sources)
    if pair is not None and len(pair) != 2:
        raise UsageError(f"--sources takes exactly two source names, got {pair}")
    with progress_bar("evaluate") as update:
        result = evaluate_lib(model, data, out, compare=compare, split=split or None, artifact=artifact,
                              paste_from=paste_from, artifact_class_name=artifact_class, annotations=annotations,
                              attribution=attribution, sources=tuple(pair) if pair else None, device=device,
                              batch_size=batch_size, seed=seed, on_stage=lambda s: err_console.print(f"[dim]·[/] {s}"),
                              on_progress=update)
    console.print(result.files["markdown"].read_text(), markup=False, highlight=False)
    console.print(f"written: [bold]{result.files['json']}[/], {result.files['markdown']}")
