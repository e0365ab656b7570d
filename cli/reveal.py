"""``cxr-audit reveal``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from cxr_audit.cli._common import console, friendly_errors, progress_bar
from cxr_audit.reveal.alarm import alarm_sentence
from cxr_audit.reveal.pipeline import reveal as reveal_lib
from rich.markup import escape
from rich.table import Table


@friendly_errors
def reveal(scan: Path = typer.Argument(..., help="Scan file from `cxr-audit scan`."),
           out: Path = typer.Option(..., "--out", "-o", help="Folder for reveal.json and report.html."),
           target: str = typer.Option("pred", "--target", help="Which stored heatmaps/relevances to analyse."),
           top: int = typer.Option(10, "--top", help="Concepts to keep."),
           max_k: int = typer.Option(8, "--max-k", help="Largest number of SpRAy clusters per class."),
           references: bool = typer.Option(True, "--references/--no-references",
                                           help="CRP conditional heatmaps and crops per top concept (needs the scanned model)."),
           embedding: str = typer.Option("tsne", "--embedding",
                                         help="2-D embedding of each class's heatmaps: 'tsne' or 'umap'."),
           virelay: Optional[bool] = typer.Option(
               None, "--virelay/--no-virelay", show_default=False,
               help="Write a ViRelAy project (OUT/virelay/project.yaml; reads every scanned image once). "
                    "Default: only for scans of up to 20,000 samples."),
           device: str = typer.Option("cpu", "--device")) -> None:
    """Rank suspicious concepts and explanation clusters; write reveal.json and an HTML report."""
    with progress_bar("reveal") as update:
        result = reveal_lib(scan, out, target=target, top=top, max_k=max_k, references=references, embedding=embedding,
                            device=device, virelay_project=virelay, on_progress=update)
    names = result["class_names"]
    table = Table("concept", "layer:channel", "class", "suspicion", "bimodality z", "alarm", "members",
                  title="most suspicious concepts")
    for c in result["concepts"][:5]:
        table.add_row(str(c["id"]), f"{c['layer']}:{c['channel']}", names[c["class_index"]], f"{c['suspicion']:.3f}",
                      f"{c['bimodality_z']:.1f}", "[red]yes[/]" if c["alarm"] else "", str(len(c["members"])))
    console.print(table)
    sentence = alarm_sentence(result)
    console.print(f"[bold red]{escape(sentence)}[/]" if result["alarm"]["raised"] else escape(sentence))
    console.print(f"annotate the top concept: cxr-audit annotate {scan} --concept "
                  f"{result['concepts'][0]['layer']}:{result['concepts'][0]['channel']} "
                  f"--layer {result['concepts'][0]['layer']} --out ann.h5" if result["concepts"] else "no concepts found")
    console.print(f"report: [bold]{Path(out) / 'report.html'}[/]")
    if (result.get("virelay") or {}).get("project"):
        console.print(f"ViRelAy project, open with: virelay {result['virelay']['project']}",
                      highlight=False)
