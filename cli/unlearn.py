"""``cxr-audit unlearn``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cxr_audit.cli._common import console, err_console, friendly_errors, progress_bar, split_csv
from cxr_audit.errors import UsageError
from cxr_audit.unlearn import BALANCE_MODES, MITIGATIONS
from cxr_audit.unlearning import DEFAULT_FALLBACK, DEFAULT_METHOD
from cxr_audit.unlearning import unlearn as unlearn_lib


@friendly_errors
def unlearn(model: Path = typer.Option(..., "--model", "-m", help="Checkpoint to fine-tune."),
            data: Path = typer.Option(..., "--data", "-d",
                                      help="Manifest CSV (train/val splits; artifact/artifact_mask/mask columns as "
                                           "the method needs, e.g. the annotated.csv of `annotate --masks`)."),
            out: Path = typer.Option(..., "--out", "-o", help="Checkpoint to write."),
            method: str = typer.Option(DEFAULT_METHOD, "--method",
                                       help=f"Mitigation: {', '.join(MITIGATIONS)}. The default, augment, fine-tunes "
                                            "with the annotated artifact pasted into the other classes' images until "
                                            "it predicts nothing; docs/unlearn.md has the benchmark."),
            fallback: str = typer.Option(DEFAULT_FALLBACK, "--fallback",
                                         help="Method tried once when --method's result is refused (worse than "
                                              "the input on validation); 'none': refuse at once."),
            annotations: Optional[Path] = typer.Option(None, "--annotations", "-a",
                                                       help="annotations.h5 from `cxr-audit annotate` (CAV, artifact labels)."),
            layer: Optional[str] = typer.Option(None, "--layer",
                                                help="Layer for the ClArC methods (default: earliest scanned layer)."),
            cav_method: str = typer.Option("signal", "--cav-method",
                                           help="CAV refitted for ClArC: signal, ridge, svm, logistic, annotation."),
            cav_scope: str = typer.Option("class", "--cav-scope",
                                          help="Fit the CAV on the artifact's class (class) or every sample (all)."),
            lambda_: Optional[float] = typer.Option(None, "--lambda",
                                                    help="Penalty strength; omitted: chosen by a sweep on the validation split."),
            lambdas: Optional[list[str]] = typer.Option(None, "--lambdas", help="Sweep grid, e.g. 1e3,1e5,1e7."),
            balance: str = typer.Option("none", "--balance", help=f"Group balancing: {', '.join(BALANCE_MODES)}."),
            freeze: str = typer.Option("auto", "--freeze",
                                       help="auto (up to the CAV layer for RR-/A-ClArC), none, or a layer name."),
            output: Optional[str] = typer.Option(None, "--output",
                                                 help="What RR-ClArC/RRR differentiate: random, target, max, logprob."),
            cam_layer: Optional[str] = typer.Option(None, "--cam-layer", help="Grad-CAM layer for eXBL."),
            option: Optional[list[str]] = typer.Option(None, "--option",
                                                       help="Method option KEY=VALUE, repeatable (dfr: C; jtt: "
                                                            "upweight; rrclarc: per_position; exbl: margin, good, bad)."),
            target: Optional[str] = typer.Option(None, "--target",
                                                 help="Multi-label models: finding:NAME, the finding whose shortcut "
                                                      "to remove (augment or none)."),
            keep_worse: bool = typer.Option(False, "--keep-worse",
                                            help="Write the result even when it scores worse than the input on "
                                                 "the validation objective (default: refuse, write nothing)."),
            epochs: int = typer.Option(5, "--epochs"),
            sweep_epochs: Optional[int] = typer.Option(None, "--sweep-epochs",
                                                       help="Epochs per λ candidate (default: --epochs; the best "
                                                            "candidate is kept without retraining)."),
            batch_size: int = typer.Option(32, "--batch-size"),
            lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (default: the architecture's "
                                                                     "recommended rate, 1e-3; 1e-4 for VGG)."),
            patience: Optional[int] = typer.Option(None, "--patience", help="Early stopping patience (epochs)."),
            seed: int = typer.Option(0, "--seed"),
            device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 ..."),
            amp: bool = typer.Option(True, "--amp/--no-amp", help="bf16 autocast on CUDA."),
            workers: int = typer.Option(0, "--workers", help="DataLoader worker processes.")) -> None:
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
                             batch_size=batch_size, lr=lr, patience=patience, seed=seed, device=device, amp=amp,
                             num_workers=workers, options=parse_options(option), keep_worse=keep_worse, target=target,
                             on_progress=update,
                             on_stage=lambda s: err_console.print(f"[dim]·[/] {s}"))
    if result.sweep:
        table = Table(result.strength_name, "objective", "clean val bal. accuracy",
                      title=f"{result.strength_name} sweep")
        for row in result.sweep:
            mark = " ←" if row["lambda"] == result.lambda_ else ""
            table.add_row(f"{row['lambda']:g}{mark}", f"{row['objective']:.3f}",
                          f"{row['clean_val_accuracy']:.3f} (start {row['start_clean_val_accuracy']:.3f})")
        console.print(table)
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


def parse_options(pairs: Optional[list[str]]) -> dict[str, str]:
    """``["C=0.1", "per_position=false"]`` -> dict; the method converts and checks the values."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--option must be KEY=VALUE, got '{pair}'")
        out[key.strip()] = value.strip()
    return out


def _before_after(result) -> Table:
    """The validation figures the result was chosen and judged on, input vs output."""
    table = Table("validation", "input", "unlearned", title=f"judged on: {result.objective}")
    names = {"objective": "objective", "clean_balanced_accuracy": "balanced accuracy without the artifact",
             "inserted_balanced_accuracy": "balanced accuracy, artifact inserted"}
    for key, name in names.items():
        if key in result.before:
            table.add_row(name, f"{result.before[key]:.3f}", f"{result.after[key]:.3f}")
    return table
