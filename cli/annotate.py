"""``cxr-audit annotate``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from cxr_audit.annotate.pipeline import MaskOptions
from cxr_audit.annotate.pipeline import annotate as annotate_lib
from cxr_audit.cli._common import console, friendly_errors, options_help, progress_bar, split_csv
from cxr_audit.errors import UsageError
from cxr_audit.numerics.cav import CAV_METHODS
from cxr_audit.options import parse_pairs
from rich.table import Table


def _ids(values: Optional[list[str]]) -> Optional[list[int]]:
    items = split_csv(values)
    if items is None:
        return None
    try:
        return [int(v) for v in items]
    except ValueError:
        raise UsageError(f"sample ids must be integers (manifest row numbers), got {items}") from None


ScanOpt = Annotated[Path, typer.Argument(help="Scan file from `cxr-audit scan`.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Annotation HDF5 to write.")]
SeedsOpt = Annotated[Optional[list[str]], typer.Option("--seeds", help="Positive sample ids (2-5 suffice).")]
NegativesOpt = Annotated[Optional[list[str]], typer.Option("--negatives",
    help="Negative sample ids (default: a random sample of the rest).")]
ConceptOpt = Annotated[Optional[str], typer.Option("--concept",
    help="[LAYER:]CHANNEL; its top-relevance samples are the positives.")]
ClusterOpt = Annotated[Optional[int], typer.Option("--cluster",
    help="A SpRAy cluster id from reveal.json (needs --reveal).")]
RevealJsonOpt = Annotated[Optional[Path], typer.Option("--reveal", help="reveal.json written by `cxr-audit reveal`.")]
FromColumnOpt = Annotated[Optional[str], typer.Option("--from-column", help="Use the manifest's 'artifact' column.")]
LayerOpt = Annotated[Optional[str], typer.Option("--layer",
    help="Layer for the labelling CAV (default: the concept's layer, else the earliest scanned layer).")]
MaskLayerOpt = Annotated[Optional[str], typer.Option("--mask-layer",
    help="Layer whose CAV paints masks (default: earliest scanned layer).")]
MethodOpt = Annotated[str, typer.Option("--method", help=f"CAV estimator: {', '.join(CAV_METHODS)}.")]
OptionOpt = Annotated[Optional[list[str]], typer.Option(
    "--option", help=f"CAV estimator option KEY=VALUE, repeatable ({options_help(CAV_METHODS)}).")]
ThresholdOpt = Annotated[str, typer.Option("--threshold", help="Score threshold, or 'auto' (Otsu on the scores).")]
RefineOpt = Annotated[int, typer.Option("--refine", help="Refinement rounds (refit on the labelled set).")]
MasksDirOpt = Annotated[Optional[Path], typer.Option("--masks",
    help="Folder for mask PNGs, annotated.csv, contact sheet.")]
NoMasksOpt = Annotated[bool, typer.Option("--no-masks", help="Only label samples; skip pixel masks.")]
MaskThresholdOpt = Annotated[str, typer.Option("--mask-threshold",
    help="'peak:F': pixels above F of the blurred maximum (default peak:0.7; 'peak' is peak:0.5), 'otsu' or "
         "'quantile' (top 5 %).")]
MaskRuleOpt = Annotated[str, typer.Option("--mask-rule",
    help="How first-layer relevance reaches pixels: 'upsample' (bilinear), 'intensity' (z+ on pixel "
         "intensities: bright artifacts), 'zbox' or 'flat'.")]
MaskReferenceOpt = Annotated[str, typer.Option("--mask-reference",
    help="'clean': paint only the concept's presence in excess of its median over unlabelled samples at each "
         "position; 'none': raw.")]
MaskCompleteOpt = Annotated[str, typer.Option("--mask-complete",
    help="'saturated' (default): add the thin clipped white/black structure a mask touches (a frame's other "
         "sides, a ruler's length, a stamp's strokes; thick clipped regions such as an over-exposed abdomen are "
         "left out); 'none': the masks as the concept's relevance paints them.")]
MaskCavOpt = Annotated[str, typer.Option("--mask-cav",
    help="'within-class': the masks' CAV contrasts labelled and unlabelled samples of the same class, so it "
         "does not also point along the class's own evidence (a shortcut artifact is correlated with its "
         "class); 'across': over all samples (Pahde et al., 2025).")]
BlurOpt = Annotated[Optional[float], typer.Option("--blur",
    help="Gaussian sigma in pixels (default 1.5 per 64 px of input).")]
DilateOpt = Annotated[int, typer.Option("--dilate", help="Mask dilation iterations.")]
ModelOpt = Annotated[Optional[Path], typer.Option("--model", help="Checkpoint (default: the scanned one).")]
DataOpt = Annotated[Optional[Path], typer.Option("--data", help="Manifest (default: the scanned one).")]
DeviceOpt = Annotated[str, typer.Option("--device")]
SeedOpt = Annotated[int, typer.Option("--seed")]
TargetOpt = Annotated[Optional[str], typer.Option("--target",
    help="Multi-label scans: finding:NAME, whose positives and negatives are the classes the masks' CAV is "
         "fitted within (default: every combination of findings).")]


@friendly_errors
def annotate(scan: ScanOpt,
             out: OutOpt,
             seeds: SeedsOpt = None,
             negatives: NegativesOpt = None,
             concept: ConceptOpt = None,
             cluster: ClusterOpt = None,
             reveal_json: RevealJsonOpt = None,
             from_column: FromColumnOpt = None,
             layer: LayerOpt = None,
             mask_layer: MaskLayerOpt = MaskOptions.layer,
             method: MethodOpt = "signal",
             option: OptionOpt = None,
             threshold: ThresholdOpt = "auto",
             refine: RefineOpt = 0,
             masks_dir: MasksDirOpt = None,
             no_masks: NoMasksOpt = False,
             mask_threshold: MaskThresholdOpt = MaskOptions.threshold,
             mask_rule: MaskRuleOpt = MaskOptions.rule,
             mask_reference: MaskReferenceOpt = MaskOptions.reference,
             mask_complete: MaskCompleteOpt = MaskOptions.complete,
             mask_cav: MaskCavOpt = MaskOptions.cav,
             blur: BlurOpt = MaskOptions.blur,
             dilate: DilateOpt = MaskOptions.dilate,
             model: ModelOpt = None,
             data: DataOpt = None,
             device: DeviceOpt = "auto",
             seed: SeedOpt = 0,
             target: TargetOpt = None) -> None:
    """Label artifact samples with a concept direction (CAV) and paint pixel masks with its LRP heatmap."""
    thr = threshold if threshold == "auto" else _float(threshold)
    masking = MaskOptions(layer=mask_layer, threshold=mask_threshold, rule=mask_rule, reference=mask_reference,
                          complete=mask_complete, cav=mask_cav, blur=blur, dilate=dilate)
    with progress_bar("annotate") as update:
        result = annotate_lib(scan, out, seeds=_ids(seeds), negatives=_ids(negatives), concept=concept,
                              cluster=cluster, reveal_json=reveal_json,
                              from_column=from_column, layer=layer, method=method, cav_options=parse_pairs(option),
                              threshold=thr, refine=refine, masks=not no_masks, masks_dir=masks_dir, masking=masking,
                              model=model, data=data, device=device, seed=seed, target=target, on_progress=update)
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
