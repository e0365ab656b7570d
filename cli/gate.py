"""``cxr-audit gate``."""

from __future__ import annotations

from pathlib import Path

import typer
from cxr_audit.cli._common import console, err_console, friendly_errors
from cxr_audit.errors import CxrAuditError, UsageError
from cxr_audit.gate.pipeline import gate as gate_lib
from rich.table import Table


@friendly_errors
def gate(config: Path = typer.Option(..., "--config", "-c", help="Gate config (TOML/YAML) with a \\[gate] table."),
         out: Path = typer.Option(Path("gate-out"), "--out", "-o",
                                  help="Folder for junit.xml, gate.json, summary.md and the evaluation.")) -> None:
    """Fail a CI job when a shortcut comes back: exit 0 pass, 1 fail, 2 usage or input error.

    Append summary.md to $GITHUB_STEP_SUMMARY and publish junit.xml with any JUnit reporter.
    """
    try:
        result = gate_lib(config, out, on_stage=lambda s: err_console.print(f"[dim]·[/] {s}"))
    except CxrAuditError as exc:  # exit 1 means "the model failed the gate"; bad input must not read so
        raise UsageError(str(exc)) from None
    except OSError as exc:  # an unwritable --out is an input error too (exit 2), not a failed gate
        raise UsageError(f"cannot write {exc.filename or out}: {exc.strerror or exc}") from None
    table = Table("check", "value", "threshold", "result")
    for c in result.checks:
        table.add_row(c.metric, f"{c.value:.3f}", f"{'≤' if c.bound == 'max' else '≥'} {c.threshold:g}",
                      "[green]pass[/]" if c.passed else "[bold red]FAIL[/]")
    console.print(table)
    console.print(f"junit: {result.files['junit']}  summary: {result.files['summary']}")
    if not result.passed:
        console.print("[bold red]gate failed[/]")
        raise typer.Exit(1)
    console.print("[bold green]gate passed[/]")
