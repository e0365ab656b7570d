"""``cxr-audit scan``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from cxr_audit.cli._common import console, friendly_errors, options_help, progress_bar, split_csv
from cxr_audit.explain.methods import METHODS
from cxr_audit.options import parse_pairs
from cxr_audit.scan.pipeline import scan as scan_lib


@friendly_errors
def scan(data: Path = typer.Argument(..., help="Manifest CSV or ImageFolder."),
         model: Path = typer.Option(..., "--model", "-m", help="Checkpoint written by `cxr-audit train`/`unlearn`."),
         out: Path = typer.Option(..., "--out", "-o", help="HDF5 scan file; an existing one with the same options resumes."),
         layers: Optional[list[str]] = typer.Option(None, "--layer", "-l",
                                                    help="Layer(s) for activations and concept relevances "
                                                         "(default: early/middle/late of the architecture)."),
         method: str = typer.Option("lrp", "--method", help=f"Attribution: {', '.join(METHODS)}."),
         option: Optional[list[str]] = typer.Option(None, "--option", help="Attribution option KEY=VALUE, "
                                                    f"repeatable ({options_help(METHODS)})."),
         targets: Optional[list[str]] = typer.Option(None, "--target", "-t",
                                                     help="Explain the 'pred' (default) and/or 'true' class, or finding:NAME (that output, for every image: multi-label models)."),
         heatmap_size: int = typer.Option(64, "--heatmap-size", help="Stored heatmap side (sum-pooled)."),
         batch_size: int = typer.Option(16, "--batch-size"),
         split: Optional[str] = typer.Option(None, "--split", help="Only scan this split of the manifest."),
         init: str = typer.Option("logit", "--init", help="Initial relevance: 'logit' (target logit) or 'onehot'."),
         cam_layer: Optional[str] = typer.Option(None, "--cam-layer", help="GradCAM layer (method gradcam)."),
         prototype_maps: int = typer.Option(3, "--prototype-maps", min=0,
                                            help="ProtoPNet models: store PRP and upsampled-similarity maps of this "
                                                 "many of the predicted class's top prototypes per image (0: none)."),
         device: str = typer.Option("auto", "--device"),
         amp: bool = typer.Option(False, "--amp/--no-amp", help="bf16 autocast (faster, less exact LRP): on CUDA, and on CPUs with "
                                                    "AVX-512/AMX bf16 kernels (about 2x there)."),
         workers: int = typer.Option(0, "--workers", help="DataLoader worker processes."),
         skip_bad: bool = typer.Option(False, "--skip-bad/--strict",
                                       help="Log and skip unreadable images instead of stopping."),
         overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing scan file.")) -> None:
    """Explain every image: heatmaps, layer activations, concept relevances and predictions in one HDF5 file.

    Resumable: if interrupted, run the same command again and it continues where it stopped.
    """
    with progress_bar("scan") as update:
        summary = scan_lib(model, data, out, layers=split_csv(layers), method=method,
                           targets=tuple(split_csv(targets) or ["pred"]), heatmap_size=heatmap_size,
                           batch_size=batch_size, split=split, init=init, device=device, amp=amp,
                           num_workers=workers, skip_bad=skip_bad, overwrite=overwrite, cam_layer=cam_layer,
                           method_options=parse_pairs(option),
                           prototype_maps=prototype_maps, on_progress=update)
    for idx, message in summary.skipped:
        console.print(f"[yellow]skipped[/] sample {idx}: {message}")
    resumed = f", resumed after {summary.resumed_from}" if summary.resumed_from else ""
    console.print(f"scanned {summary.done}/{summary.n} samples{resumed} in {summary.seconds:.1f} s → "
                  f"[bold]{summary.path}[/]")
