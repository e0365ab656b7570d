"""``cxr-audit demo``."""

from __future__ import annotations

from pathlib import Path

import typer
from cxr_audit.cli._common import console, friendly_errors, progress_bar
from cxr_audit.data.artifacts import ARTIFACTS
from cxr_audit.demo import run_demo
from rich.table import Table


@friendly_errors
def demo(out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Folder for everything the demo writes."),
         arch: str = typer.Option("resnet18", "--arch", help="Model architecture."),
         artifact: str = typer.Option("text", "--artifact", help=f"Shortcut to plant: {', '.join(ARTIFACTS)}."),
         n: int = typer.Option(500, "--n", help="Number of phantom images."),
         size: int = typer.Option(64, "--size", help="Image side in pixels."),
         epochs: int = typer.Option(8, "--epochs", help="Epochs to train the shortcut model."),
         unlearn_epochs: int = typer.Option(4, "--unlearn-epochs", help="Epochs of unlearning fine-tuning."),
         seed: int = typer.Option(0, "--seed"),
         device: str = typer.Option("auto", "--device")) -> None:
    """The whole loop on generated data with a planted shortcut: train, scan, reveal, annotate,
    unlearn (the default method, augment), evaluate before/after. A few minutes on a laptop CPU."""
    with progress_bar("demo") as update:
        result = run_demo(out, arch=arch, artifact=artifact, n=n, size=size, epochs=epochs,
                          unlearn_epochs=unlearn_epochs, seed=seed,
                          device=device, on_stage=lambda s: console.print(f"[cyan]•[/] {s}"), on_progress=update)
    table = Table("found", "value", title="1. the shortcut is found")
    for key, value in result.metrics.items():
        table.add_row(key, f"{value:.3g}" if isinstance(value, float) else str(value))
    console.print(table)
    table = Table("metric", "before", "after unlearn", "change", title="2. … and unlearned (test split)")
    for key, (before, after) in result.comparison.items():
        table.add_row(key.replace("_", " "), f"{before:.3f}", f"{after:.3f}", f"{after - before:+.3f}")
    console.print(table)
    for key, path in result.files.items():
        if key != "reveal report":
            console.print(f"{key}: {path}")
    console.print(f"HTML report (open in a browser): [bold]{result.files['reveal report']}[/]")
