"""``cxr-audit unlearn``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from cxr_audit.cli._common import console, err_console, friendly_errors, options_help, progress_bar, split_csv
from cxr_audit.errors import UsageError
from cxr_audit.options import parse_pairs
from cxr_audit.unlearn import BALANCE_MODES, MITIGATIONS
from cxr_audit.unlearn.pipeline import DEFAULT_FALLBACK, DEFAULT_METHOD
from cxr_audit.unlearn.pipeline import unlearn as unlearn_lib
from rich.table import Table

ModelOpt = Annotated[Path, typer.Option("--model", "-m", help="Checkpoint to fine-tune.")]
DataOpt = Annotated[Path, typer.Option("--data", "-d",
    help="Manifest CSV (train/val splits; artifact/artifact_mask/mask columns as the method needs, e.g. the "
         "annotated.csv of `annotate --masks`).")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Checkpoint to write.")]
MethodOpt = Annotated[str, typer.Option("--method",
    help=f"Mitigation: {', '.join(MITIGATIONS)}. The default, augment, fine-tunes with the annotated artifact "
         "pasted into the other classes' images until it predicts nothing; docs/unlearn.md has the benchmark.")]
FallbackOpt = Annotated[str, typer.Option("--fallback",
    help="Methods tried in turn, comma-separated, when --method's result is refused (worse than the input on "
         "validation); one that needs a CAV is skipped without --annotations; 'none': refuse at once.")]
AnnotationsOpt = Annotated[Optional[Path], typer.Option("--annotations", "-a",
    help="annotations.h5 from `cxr-audit annotate` (CAV, artifact labels).")]
LayerOpt = Annotated[Optional[str], typer.Option("--layer",
    help="Layer for the ClArC methods (default: earliest scanned layer).")]
CavMethodOpt = Annotated[str, typer.Option("--cav-method",
    help="CAV refitted for ClArC: signal, ridge, svm, logistic, annotation.")]
CavScopeOpt = Annotated[str, typer.Option("--cav-scope",
    help="Fit the CAV on the artifact's class (class) or every sample (all).")]
LambdaOpt = Annotated[Optional[float], typer.Option("--lambda",
    help="Penalty strength; omitted: chosen by a sweep on the validation split.")]
LambdasOpt = Annotated[Optional[list[str]], typer.Option("--lambdas", help="Sweep grid, e.g. 1e3,1e5,1e7.")]
BalanceOpt = Annotated[str, typer.Option("--balance", help=f"Group balancing: {', '.join(BALANCE_MODES)}.")]
FreezeOpt = Annotated[str, typer.Option("--freeze",
    help="auto (up to the CAV layer for RR-/A-ClArC), none, or a layer name.")]
OutputOpt = Annotated[Optional[str], typer.Option("--output",
    help="What RR-ClArC/RRR differentiate: random, target, max, logprob.")]
CamLayerOpt = Annotated[Optional[str], typer.Option("--cam-layer", help="Grad-CAM layer for eXBL.")]
OptionOpt = Annotated[Optional[list[str]], typer.Option("--option",
    help=f"Method option KEY=VALUE, repeatable ({options_help(MITIGATIONS)}).")]
TargetOpt = Annotated[Optional[str], typer.Option("--target",
    help="Multi-label models: finding:NAME, the finding whose shortcut to remove (augment or none).")]
KeepWorseOpt = Annotated[bool, typer.Option("--keep-worse",
    help="Write the result even when it scores worse than the input on the validation objective (default: "
         "refuse, write nothing).")]
EpochsOpt = Annotated[int, typer.Option("--epochs")]
SweepEpochsOpt = Annotated[Optional[int], typer.Option("--sweep-epochs",
    help="Epochs per λ candidate (default: --epochs; the best candidate is kept without retraining).")]
RestartsOpt = Annotated[Optional[int], typer.Option("--restarts", min=1,
    help="Runs from the input with seeds --seed, --seed+1, ...; the best on the validation objective is kept "
         "(default: the method's, 3 for augment, whose single run is a noisy draw; 1 for the others). Methods "
         "that do not train (dfr, rpclarc, pclarc) run once.")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size")]
LrOpt = Annotated[Optional[float], typer.Option("--lr",
    help="Learning rate (default: the architecture's recommended rate, 1e-3; 1e-4 for VGG).")]
PatienceOpt = Annotated[Optional[int], typer.Option("--patience", help="Early stopping patience (epochs).")]
SeedOpt = Annotated[int, typer.Option("--seed")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1 ...")]
AmpOpt = Annotated[bool, typer.Option("--amp/--no-amp", help="bf16 autocast on CUDA.")]
WorkersOpt = Annotated[int, typer.Option("--workers", help="DataLoader worker processes.")]


@friendly_errors
def unlearn(model: ModelOpt,
            data: DataOpt,
            out: OutOpt,
            method: MethodOpt = DEFAULT_METHOD,
            fallback: FallbackOpt = DEFAULT_FALLBACK,
            annotations: AnnotationsOpt = None,
            layer: LayerOpt = None,
            cav_method: CavMethodOpt = "signal",
            cav_scope: CavScopeOpt = "class",
            lambda_: LambdaOpt = None,
            lambdas: LambdasOpt = None,
            balance: BalanceOpt = "none",
            freeze: FreezeOpt = "auto",
            output: OutputOpt = None,
            cam_layer: CamLayerOpt = None,
            option: OptionOpt = None,
            target: TargetOpt = None,
            keep_worse: KeepWorseOpt = False,
            epochs: EpochsOpt = 5,
            sweep_epochs: SweepEpochsOpt = None,
            restarts: RestartsOpt = None,
            batch_size: BatchSizeOpt = 32,
            lr: LrOpt = None,
            patience: PatienceOpt = None,
            seed: SeedOpt = 0,
            device: DeviceOpt = "auto",
            amp: AmpOpt = True,
            workers: WorkersOpt = 0) -> None:
    """Remove a shortcut from a checkpoint (default: augment, the annotated artifact pasted into the
    other classes' images) and judge the result on the validation split: a result worse than its
    input is not written (exit 3). Multi-GPU: launch with torchrun."""
    grid = None
    if lambdas:
        try:
            grid = [float(v) for v in split_csv(lambdas)]
        except ValueError:
            raise UsageError(f"--lambdas must be numbers, got {lambdas}") from None
    with progress_bar(f"unlearn ({method})") as update:
        result = unlearn_lib(model, data, out, method, fallback=None if fallback == "none" else fallback,
                             annotations=annotations, layer=layer, cav_method=cav_method,
                             cav_scope=cav_scope, lambda_=lambda_, lambdas=grid, balance=balance, freeze=freeze,
                             output=output, cam_layer=cam_layer, epochs=epochs, sweep_epochs=sweep_epochs,
                             restarts=restarts, batch_size=batch_size, lr=lr, patience=patience, seed=seed,
                             device=device, amp=amp, num_workers=workers, options=parse_pairs(option),
                             keep_worse=keep_worse, target=target, on_progress=update,
                             on_stage=lambda s: err_console.print(f"[dim]·[/] {s}"))
    _print_result(result)


def _print_result(result) -> None:
    """The λ sweep, the training history, the before/after validation figures, the checkpoint."""
    if result.sweep:
        console.print(_sweep_table(result))
    if result.history:
        table = Table("epoch", "train loss", "penalty", "val objective")
        for rec in result.history:
            table.add_row(str(rec["epoch"]), f"{rec['train_loss']:.4f}", f"{rec['penalty']:.4g}",
                          f"{rec['val_score']:.3f}" if "val_score" in rec else "-")
        console.print(table)
    if result.before:
        console.print(_before_after(result))
    chosen = f", λ={result.lambda_:g}" if result.lambda_ else ""
    used = f"{result.method}, after {result.fallback_from} was refused" if result.fallback_from else result.method
    console.print(f"checkpoint: [bold]{result.checkpoint}[/] ({used}{chosen})")


def _sweep_table(result) -> Table:
    """One row per run of the sweep (λ, restart seed), the kept one marked; a column only for
    what varied."""
    rows = result.sweep
    seeds = len({r.get("seed") for r in rows}) > 1
    lambdas = len({r["lambda"] for r in rows}) > 1 or not seeds
    marked = any(r.get("chosen") for r in rows)
    names = [result.strength_name] * lambdas + ["seed"] * seeds
    table = Table(*names, "objective", "clean val bal. accuracy",
                  title=" and ".join([f"{result.strength_name} sweep"] * lambdas + ["restarts"] * seeds))
    for row in rows:
        kept = " ←" if (row.get("chosen") if marked else row["lambda"] == result.lambda_) else ""
        cells = [f"{row['lambda']:g}"] * lambdas + [str(row.get("seed"))] * seeds
        cells[0] += kept
        table.add_row(*cells, f"{row['objective']:.3f}",
                      f"{row['clean_val_accuracy']:.3f} (start {row['start_clean_val_accuracy']:.3f})")
    return table


def _before_after(result) -> Table:
    """The validation figures the result was chosen and judged on, input vs output."""
    table = Table("validation", "input", "unlearned", title=f"judged on: {result.objective}")
    names = {"objective": "objective", "clean_balanced_accuracy": "balanced accuracy without the artifact",
             "inserted_balanced_accuracy": "balanced accuracy, artifact inserted"}
    for key, name in names.items():
        if key in result.before:
            table.add_row(name, f"{result.before[key]:.3f}", f"{result.after[key]:.3f}")
    if result.before.get("clean_counts"):  # how far to trust the figures above
        counts = "/".join(map(str, result.before["clean_counts"]))
        table.caption = f"artifact-free validation images per class: {counts}"
    return table
