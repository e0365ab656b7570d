"""The ``cxr-audit`` command line: thin typer commands over the library."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from cxr_audit import __version__
from cxr_audit.cli import (
    annotate,
    data_commands,
    demo,
    evaluate,
    gate,
    import_model,
    reveal,
    scan,
    stress,
    train,
    unlearn,
)
from cxr_audit.cli._common import friendly_errors, load_config
from cxr_audit.models.architectures import trust_factory

app = typer.Typer(
    name="cxr-audit",
    help="Audit chest X-ray classifiers for shortcut learning and remove it.\n\n"
         "Typical loop: train (or bring a checkpoint) → scan → reveal → annotate → unlearn → evaluate → gate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cxr-audit {__version__}")
        raise typer.Exit()


@app.callback()
@friendly_errors
def main(ctx: typer.Context,
         config: Optional[Path] = typer.Option(None, "--config", "-c",
                                               help="TOML/YAML file with a table per command ([scan], [train] ...); "
                                                    "flags on the command line override it."),
         trust: Optional[list[str]] = typer.Option(None, "--trust-factory",
                                                   help="Allow checkpoints that name this module:factory of yours "
                                                        "(code is never imported because a file names it)."),
         version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    if config is not None:
        ctx.default_map = load_config(config)
    for factory in trust or []:
        trust_factory(factory)


app.command("phantom")(data_commands.phantom)
app.command("inject")(data_commands.inject)
app.command("manifest")(data_commands.manifest)
app.command("import")(import_model.import_model)
app.command("train")(train.train)
app.command("scan")(scan.scan)
app.command("reveal")(reveal.reveal)
app.command("annotate")(annotate.annotate)
app.command("unlearn")(unlearn.unlearn)
app.command("evaluate")(evaluate.evaluate)
app.command("gate")(gate.gate)
app.command("stress")(stress.stress)
app.command("demo")(demo.demo)

if __name__ == "__main__":
    app()
