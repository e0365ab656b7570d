"""``cxr-audit train``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from cxr_audit.cli._common import console, friendly_errors, progress_bar
from cxr_audit.models.architectures import names
from cxr_audit.training.pipeline import train as train_lib
from rich.table import Table


@friendly_errors
def train(data: Path = typer.Argument(..., help="Manifest CSV (with optional split column) or ImageFolder."),
          out: Path = typer.Option(..., "--out", "-o", help="Checkpoint file to write (.pt)."),
          arch: str = typer.Option("resnet18", "--arch", help=f"{', '.join(names())}, torchvision.models:NAME or module:factory (a factory taking num_classes, optionally in_channels/image_size)."),
          size: int = typer.Option(128, "--size", help="Input side in pixels."),
          channels: int = typer.Option(1, "--channels", help="Input channels (1 = grayscale)."),
          epochs: int = typer.Option(5, "--epochs"),
          batch_size: int = typer.Option(32, "--batch-size"),
          lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (default: the architecture's "
                                                                     "recommended rate, 1e-3; 1e-4 for VGG)."),
          seed: int = typer.Option(0, "--seed"),
          device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 ..."),
          amp: bool = typer.Option(True, "--amp/--no-amp", help="bf16 autocast on CUDA."),
          workers: int = typer.Option(0, "--workers", help="DataLoader worker processes."),
          balance: str = typer.Option("none", "--balance",
                                      help="Equal weight per (source, label) group, or (artifact, label) with one "
                                           "source: none, reweight, resample, groupdro.")) -> None:
    """Train a classifier from scratch (no hub weights); the checkpoint records every option."""
    with progress_bar(f"train {arch}") as update:
        summary = train_lib(data, out, arch, size=size, channels=channels, epochs=epochs, batch_size=batch_size,
                            lr=lr, seed=seed, device=device, amp=amp, num_workers=workers, balance=balance,
                            on_progress=update)
    staged = any("stage" in rec for rec in summary.history)  # ProtoPNet: joint and last-layer epochs per round
    table = Table(*(["round", "stage"] if staged else []), "epoch", "train loss", "val accuracy")
    for rec in summary.history:
        table.add_row(*([str(rec["round"]), rec["stage"]] if staged else []), str(rec["epoch"]),
                      f"{rec['train_loss']:.4f}", f"{rec['val_accuracy']:.3f}" if "val_accuracy" in rec else "-")
    console.print(table)
    console.print(f"checkpoint: [bold]{summary.checkpoint}[/] ({summary.seconds:.1f} s)")
    for warning in summary.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
