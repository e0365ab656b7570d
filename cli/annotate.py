"""``cxr-audit annotate``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cxr_audit.annotate.cav import CAV_METHODS
from cxr_audit.annotating import annotate as annotate_lib
from cxr_audit.cli._common import console, friendly_errors, progress_bar, split_csv
from cxr_audit.errors import UsageError


def _ids(values: Optional[list[str]]) -> Optional[list[int]]:
    items = split_csv(values)
    if items is None:
        return None
    try:
        return [int(v) for v in items]
    except ValueError:
        raise UsageError(f"sample ids must be integers (manifest row numbers), got {items}") from None


@friendly_errors
def annotate(scan: Path = typer.Argument(..., help="Scan file from `cxr-audit scan`."),
             out: Path = typer.Option(..., "--out", "-o", help="Annotation HDF5 to write."),
             seeds: Optional[list[str]] = typer.Option(None, "--seeds", help="Positive sample ids (2-5 suffice)."),
             negatives: Optional[list[str]] = typer.Option(None, "--negatives",
                                                           help="Negative sample ids (default: a random sample of the rest)."),
             concept: Optional[str] = typer.Option(None, "--concept",
                                                   help="[LAYER:]CHANNEL; its top-relevance samples are the positives."),
             cluster: Optional[int] = typer.Option(None, "--cluster", help="A SpRAy cluster id from reveal.json (needs --reveal)."),
             reveal_json: Optional[Path] = typer.Option(None, "--reveal", help="reveal.json written by `cxr-audit reveal`."),
             from_column: Optional[str] = typer.Option(None, "--from-column", help="Use the manifest's 'artifact' column."),
             layer: Optional[str] = typer.Option(None, "--layer", help="Layer for the labelling CAV (default: the "
                                                 "concept's layer, else the earliest scanned layer)."),
             mask_layer: Optional[str] = typer.Option(None, "--mask-layer",
                                                      help="Layer whose CAV paints masks (default: earliest scanned layer)."),
             method: str = typer.Option("signal", "--method", help=f"CAV estimator: {', '.join(CAV_METHODS)}."),
             threshold: str = typer.Option("auto", "--threshold", help="Score threshold, or 'auto' (Otsu on the scores)."),
             refine: int = typer.Option(0, "--refine", help="Refinement rounds (refit on the labelled set)."),
             masks_dir: Optional[Path] = typer.Option(None, "--masks", help="Folder for mask PNGs, annotated.csv, contact sheet."),
             no_masks: bool = typer.Option(False, "--no-masks", help="Only label samples; skip pixel masks."),
             mask_threshold: str = typer.Option("peak", "--mask-threshold",
                                                help="'peak' (half the blurred maximum; 'peak:0.3' for another fraction), "
                                                     "'otsu' or 'quantile' (top 5 %)."),
             mask_rule: str = typer.Option("upsample", "--mask-rule",
                                           help="How first-layer relevance reaches pixels: 'upsample' (bilinear), "
                                                "'intensity' (z+ on pixel intensities: bright artifacts), 'zbox' or 'flat'."),
             mask_reference: str = typer.Option("clean", "--mask-reference",
                                                help="'clean': paint only the concept's presence in excess of its "
                                                     "median over unlabelled samples at each position; 'none': raw."),
             mask_complete: str = typer.Option("none", "--mask-complete",
                                               help="'saturated': add the clipped white/black structure a mask "
                                                    "touches (a frame's other sides, a ruler's length; check the "
                                                    "contact sheet: saturated anatomy can be added too); 'none'."),
             mask_cav: str = typer.Option("within-class", "--mask-cav",
                                          help="'within-class': the masks' CAV contrasts labelled and unlabelled "
                                               "samples of the same class, so it does not also point along the "
                                               "class's own evidence (a shortcut artifact is correlated with its "
                                               "class); 'across': over all samples (Pahde et al., 2025)."),
             blur: Optional[float] = typer.Option(None, "--blur", help="Gaussian sigma in pixels (default 1.5 per 64 px of input)."),
             dilate: int = typer.Option(0, "--dilate", help="Mask dilation iterations."),
             model: Optional[Path] = typer.Option(None, "--model", help="Checkpoint (default: the scanned one)."),
             data: Optional[Path] = typer.Option(None, "--data", help="Manifest (default: the scanned one)."),
             device: str = typer.Option("auto", "--device"),
             seed: int = typer.Option(0, "--seed")) -> None:
    """Label artifact samples with a concept direction (CAV) and paint pixel masks with its LRP heatmap."""
    thr = threshold if threshold == "auto" else _float(threshold)
    with progress_bar("annotate") as update:
        result = annotate_lib(scan, out, seeds=_ids(seeds), negatives=_ids(negatives), concept=concept,
                              cluster=cluster, reveal_json=reveal_json,
                              from_column=from_column, layer=layer, mask_layer=mask_layer, method=method,
                              threshold=thr, refine=refine, masks=not no_masks, masks_dir=masks_dir,
                              mask_threshold=mask_threshold, mask_rule=mask_rule, mask_reference=mask_reference,
                              mask_complete=mask_complete, mask_cav=mask_cav, blur=blur, dilate=dilate, model=model, data=data,
                              device=device, seed=seed, on_progress=update)
    console.print(f"labelled {result.n_labelled} samples as the concept (layer {result.layer}, threshold "
                  f"{result.threshold:.3f})")
    if result.quality:
        table = Table("quality vs ground truth", "value")
        for key, value in result.quality.items():
            if isinstance(value, dict):
                for k, v in value.items():
                    table.add_row(f"{key} {k}", f"{v:.3f}" if isinstance(v, float) else str(v))
            else:
                table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
        console.print(table)
    for key, path in result.files.items():
        console.print(f"{key}: [bold]{path}[/]")


def _float(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise UsageError(f"--threshold must be a number or 'auto', got '{value}'") from None
