"""``cxr-audit demo``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from cxr_audit.cli._common import console, friendly_errors, progress_bar
from cxr_audit.data.artifacts import ARTIFACTS
from cxr_audit.demo import run_demo


@friendly_errors
def demo(out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Folder for everything the demo writes."),
         arch: str = typer.Option("resnet18", "--arch", help="Model architecture."),
         artifact: str = typer.Option("text", "--artifact", help=f"Shortcut to plant: {', '.join(ARTIFACTS)}."),
         n: int = typer.Option(400, "--n", help="Number of phantom images."),
         size: int = typer.Option(64, "--size", help="Image side in pixels."),
         epochs: int = typer.Option(6, "--epochs"),
         seed: int = typer.Option(0, "--seed"),
         device: str = typer.Option("auto", "--device")) -> None:
    """Run the loop on generated data with a planted shortcut, on a laptop CPU in minutes."""
    with progress_bar("demo") as update:
        result = run_demo(out, arch=arch, artifact=artifact, n=n, size=size, epochs=epochs, seed=seed,
                          device=device, on_stage=lambda s: console.print(f"[cyan]•[/] {s}"), on_progress=update)
    table = Table("metric", "value", title="shortcut audit")
    for key, value in result.metrics.items():
        table.add_row(key, f"{value:.3f}")
    console.print(table)
    for key, path in result.files.items():
        console.print(f"{key}: [bold]{path}[/]")
