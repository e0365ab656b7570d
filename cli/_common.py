"""Shared CLI plumbing: one-line errors, rich progress bars, config files."""

from __future__ import annotations

import functools
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import typer
from cxr_audit.configfile import read_config_file
from cxr_audit.errors import CxrAuditError, UsageError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console()
err_console = Console(stderr=True)


def friendly_errors(func: Callable) -> Callable:
    """Turn library input errors into one red line and an exit code, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except CxrAuditError as exc:
            err_console.print(f"[bold red]error:[/] {escape(_one_line(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:  # unwritable or full output, a file vanishing under us: the user's to fix
            where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
            err_console.print(f"[bold red]error:[/] cannot access{escape(where)}: {escape(exc.strerror or str(exc))}",
                              highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]: outputs are written whole or not at all; a scan keeps its "
                              "finished rows and resumes when you rerun the same command")
            raise typer.Exit(130) from None

    return wrapper


def _one_line(exc: Exception) -> str:
    """The message itself; errors re-raised from DataLoader workers carry the worker's traceback."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    last = lines[-1] if lines else type(exc).__name__
    return last.split("Error: ", 1)[1] if last.startswith("cxr_audit.errors.") else last


#: seconds between progress lines when stderr is not a terminal (CI logs, nohup, pipes)
LOG_INTERVAL = 10.0


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[..., None]]:
    """Yield an ``on_progress(done, total, status="")`` callback: a rich bar on a terminal, else a
    plain line at most every :data:`LOG_INTERVAL` seconds and one at the end (rich draws nothing
    in a non-interactive log until it finishes)."""
    if not err_console.is_terminal:
        with _progress_lines(description) as update:
            yield update
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}")]
    with Progress(*columns, console=err_console, transient=False) as bar:
        task = bar.add_task(description, total=None, status="")

        def update(done: int, total: int, status: str = "") -> None:
            bar.update(task, completed=done, total=total, status=status)

        yield update


@contextmanager
def _progress_lines(description: str) -> Iterator[Callable[..., None]]:
    start = time.monotonic()
    state = {"last": None, "line": None}

    def line(done: int, total: int, status: str) -> str:
        share = f" ({100 * done / total:.0f} %)" if total else ""
        return f"{description}: {done}/{total or '?'}{share} {status} [{time.monotonic() - start:.0f} s]".rstrip()

    def update(done: int, total: int, status: str = "") -> None:
        state["line"] = line(done, total, status)
        now = time.monotonic()
        if state["last"] is None or now - state["last"] >= LOG_INTERVAL:
            err_console.print(state["line"], highlight=False, markup=False)
            state["last"] = now

    yield update
    if state["line"] is not None and state["last"] is not None:
        err_console.print(state["line"], highlight=False, markup=False)  # the final state


def load_config(path: Path) -> dict:
    """Read a TOML or YAML config: ``{command: {option: value}}`` (top-level keys are commands)."""
    data = read_config_file(path)
    if not all(isinstance(v, dict) for v in data.values()):
        raise UsageError(f"config {path} must map command names to tables of options, e.g. [scan]")
    return {cmd: {k.replace("-", "_"): v for k, v in opts.items()} for cmd, opts in data.items()}


def split_csv(values: list[str] | None) -> list[str] | None:
    """Accept both ``--layer a --layer b`` and ``--layer a,b``."""
    if not values:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def options_help(registry: dict) -> str:
    """``"svm: C; ridge: alpha"``: the ``option_types`` of every method in ``registry`` that has
    any, for an ``--option`` help text."""
    return "; ".join(f"{name}: {', '.join(cls.option_types)}" for name, cls in registry.items() if cls.option_types)
