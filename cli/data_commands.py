"""``cxr-audit phantom``, ``inject`` (data with a known shortcut) and ``manifest`` (a folder of images)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from cxr_audit.cli._common import console, friendly_errors, progress_bar, split_csv
from cxr_audit.data import inject as inject_lib
from cxr_audit.data import phantom as phantom_lib
from cxr_audit.data.artifacts import ARTIFACTS


@friendly_errors
def phantom(out: Path = typer.Option(..., "--out", "-o", help="Folder for images/, masks/ and manifest.csv."),
            n: int = typer.Option(400, "--n", min=2, help="Number of images (classes balanced)."),
            size: int = typer.Option(128, "--size", min=32, help="Image side in pixels."),
            sources: int = typer.Option(1, "--sources", min=1, help="Number of sources (site0, site1, ...)."),
            disease_strength: float = typer.Option(0.15, "--disease-strength", min=0.0,
                                                   help="Contrast of the disease opacities (lower = harder)."),
            seed: int = typer.Option(0, "--seed", help="Random seed.")) -> None:
    """Generate synthetic CXR-like phantoms (healthy / disease with lung opacities) and lung masks."""
    with progress_bar("phantoms") as update:
        manifest = phantom_lib.generate_phantoms(out, n=n, size=size, seed=seed, sources=sources,
                                                   disease_strength=disease_strength, on_progress=update)
    console.print(f"wrote {n} phantoms: [bold]{manifest}[/]")


@friendly_errors
def inject(data: Path = typer.Argument(..., help="Manifest CSV or ImageFolder to insert the artifact into."),
           out: Path = typer.Option(..., "--out", "-o", help="Folder for the new manifest, images and masks."),
           artifact: str = typer.Option("text", "--artifact", "-a", help=f"One of: {', '.join(ARTIFACTS)}."),
           prevalence: str = typer.Option(..., "--prevalence", "-p",
                                          help="Fraction per group, e.g. 'disease=0.8,healthy=0', '0.3' for all, or "
                                               "with --by source:label 'site0:disease=0.8,site0:*=0.1'."),
           by: str = typer.Option("label", "--by",
                                  help="Group rows by 'label', 'source', or 'source:label' (cells SOURCE:CLASS)."),
           splits: Optional[list[str]] = typer.Option(None, "--split",
                                                      help="Only inject into these splits (repeat or comma-separate)."),
           seed: int = typer.Option(0, "--seed", help="Random seed (which rows, where the artifact goes).")) -> None:
    """Insert a controlled artifact at a chosen prevalence; writes ground-truth masks and an `artifact` column."""
    with progress_bar(f"inject {artifact}") as update:
        manifest = inject_lib.inject(data, out, artifact, prevalence, by=by, splits=split_csv(splits), seed=seed,
                                     on_progress=update)
    console.print(f"new manifest: [bold]{manifest}[/]")


@friendly_errors
def manifest(folder: Path = typer.Argument(..., help="Folder of DICOM/PNG/JPEG images (searched recursively)."),
             out: Path = typer.Option(..., "--out", "-o", help="Manifest CSV to write."),
             tags: Optional[list[str]] = typer.Option(None, "--tag",
                                                      help="DICOM keyword(s) to record as columns, e.g. "
                                                           "ViewPosition,Manufacturer,InstitutionName,PatientSex."),
             source_tag: Optional[str] = typer.Option(None, "--source-tag",
                                                      help="DICOM keyword whose value becomes the 'source' column "
                                                           "(what reveal, stress and gate group by)."),
             labels: Optional[Path] = typer.Option(None, "--labels", help="CSV with path,label (relative paths or "
                                                                           "file names)."),
             label_from_folder: bool = typer.Option(False, "--label-from-folder/--no-label-from-folder",
                                                    help="Label = the first sub-folder's name.")) -> None:
    """Build a manifest from a folder of images, with DICOM tags (scanner, site, view ...) as columns."""
    from cxr_audit.data.folder_manifest import build_manifest

    with progress_bar("manifest") as update:
        path = build_manifest(folder, out, tags=split_csv(tags) or [], source_tag=source_tag, labels_csv=labels,
                              label_from_folder=label_from_folder, on_progress=update)
    console.print(f"manifest: [bold]{path}[/]", highlight=False)
