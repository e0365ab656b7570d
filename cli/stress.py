"""``cxr-audit stress``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from cxr_audit.cli._common import console, friendly_errors, progress_bar, split_csv
from cxr_audit.errors import UsageError
from cxr_audit.stress.pipeline import stress as stress_lib


@friendly_errors
def stress(data: Path = typer.Argument(..., help="Manifest with a source column (two sources) and train/test splits."),
           out: Path = typer.Option(Path("stress-out"), "--out", "-o", help="Folder for models, table and plot."),
           sources: Optional[list[str]] = typer.Option(None, "--sources", help="H1,H2 (default: the two sources)."),
           positive: Optional[str] = typer.Option(None, "--positive", help="Class whose H1 share is x (default: first)."),
           grid: Optional[list[str]] = typer.Option(None, "--grid", help="Percentages, e.g. 0,25,50,75,100."),
           per_class: Optional[int] = typer.Option(None, "--per-class", help="Training images per class (default: max)."),
           arch: str = typer.Option("resnet18", "--arch"),
           size: int = typer.Option(64, "--size"),
           epochs: int = typer.Option(5, "--epochs"),
           seed: int = typer.Option(0, "--seed"),
           device: str = typer.Option("auto", "--device")) -> None:
    """Label-imbalance sweep (Gautam et al., 2022): train on xH1–yH2 sets, report Test-100H1/H2/50-50."""
    pair = split_csv(sources)
    if pair is not None and len(pair) != 2:
        raise UsageError(f"--sources takes two names, got {pair}")
    try:
        xs = [int(v) for v in split_csv(grid)] if grid else [0, 25, 50, 75, 100]
    except ValueError:
        raise UsageError(f"--grid must be integers (percent), got {grid}") from None
    with progress_bar("stress") as update:
        result = stress_lib(data, out, sources=tuple(pair) if pair else None, positive=positive, grid=xs,
                            per_class=per_class, arch=arch, size=size, epochs=epochs, seed=seed, device=device,
                            on_stage=lambda s: console.print(f"[cyan]•[/] {s}"), on_progress=update)
    console.print(result.files["markdown"].read_text(), markup=False, highlight=False)
    console.print(f"plot: [bold]{result.files['plot']}[/]  table: {result.files['json']}")
