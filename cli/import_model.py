"""``cxr-audit import``."""

from __future__ import annotations

from pathlib import Path

import typer
from cxr_audit.cli._common import console, friendly_errors, split_csv
from cxr_audit.models.architectures import names
from cxr_audit.models.importing import import_model as import_lib


@friendly_errors
def import_model(weights: Path = typer.Argument(..., help="A state_dict file (.pt/.pth/.ckpt) trained outside cxr-audit: "
                                                          "bare, under a key (state_dict, model, ...), Lightning or DDP."),
                 arch: str = typer.Option(..., "--arch", help=f"{', '.join(names())}, torchvision.models:NAME or "
                                                              "your module:factory (called with num_classes only, "
                                                              "if that is all it takes)."),
                 classes: list[str] = typer.Option(..., "--classes", help="Output names in the model's order: A,B,C."),
                 out: Path = typer.Option(..., "--out", "-o", help="cxr-audit checkpoint to write (.pt)."),
                 multilabel: bool = typer.Option(False, "--multilabel/--single-label",
                                                 help="Outputs are independent findings (sigmoid each)."),
                 size: int = typer.Option(224, "--size", help="Input side in pixels the model was trained at."),
                 channels: int = typer.Option(3, "--channels", help="Input channels: 1 or 3 (gray repeated)."),
                 normalize: str = typer.Option("imagenet", "--normalize",
                                               help="imagenet, xrv (torchxrayvision: [-1024, 1024]), none, or "
                                                    "MEAN,STD on intensities in [0, 1] (or one mean and std per channel)."),
                 ignore_keys: list[str] = typer.Option([], "--ignore-key",
                                                       help="Drop extra tensors by glob, e.g. op_threshs."),
                 resize: str = typer.Option("squash", "--resize", help="squash (whole image) or pad (letterbox).")) -> None:
    """Make a model trained elsewhere auditable: writes a cxr-audit checkpoint with its preprocessing."""
    result = import_lib(weights, arch, split_csv(classes) or [], out, size=size, channels=channels,
                        normalize=normalize, multilabel=multilabel, ignore_keys=tuple(split_csv(ignore_keys) or ()),
                        resize=resize)
    where = f"under key '{result.state_dict_key}'" if result.state_dict_key else "a bare state_dict"
    prefix = f", prefix '{result.prefix}' stripped" if result.prefix else ""
    ignored = f", ignored {len(result.ignored)} key(s)" if result.ignored else ""
    console.print(f"read {weights} ({where}{prefix}{ignored}; sha256 {result.sha256[:12]}) as {result.arch}",
                  highlight=False)
    console.print(f"checkpoint: [bold]{result.checkpoint}[/]", highlight=False)
