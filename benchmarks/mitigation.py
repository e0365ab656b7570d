"""Mitigation benchmark: does each `unlearn` method remove a planted shortcut on data it was not
tuned on, and what does it cost? Mean ± sd over seeds, per data set and architecture.

Data sets (``--datasets``), each with a clean test split and an artifact-inserted test split
(the artifact drawn on every test image of the other class):

* ``phantoms``: synthetic chest phantoms, disease = lung opacities, text stamp in
  ``--prevalence`` of the disease training/validation images;
* ``real``: the 486 real radiographs of ``covid-two-source`` (both hospitals, patient-wise
  splits) with a synthetic lesion of random size, contrast and position in the lung field as the
  label (:mod:`cxr_audit.data.lesions`), independent of the hospital; the same stamp in
  ``--prevalence`` of the lesion training/validation images;
* ``pure``: the same real images with labels that no pixel carries except the stamp — a model
  that can only learn the shortcut. Nothing can fix it; the right answer is to refuse.

Per seed: build the data, train the shortcut model, scan it, annotate the artifact from the
``artifact`` column (labels; masks from the CAV, as `annotate --masks` paints them), run every
method through the library's `unlearn` (its defaults; ``keep_worse`` so refused results are
measured too), evaluate. "closed" is the share of the trained model's clean-vs-inserted accuracy
gap that is gone; "cost" is each method's wall time over one plain fine-tune of the same epochs
(``none``) in the same run; "refused" counts the seeds where `unlearn` would not have written the
result (:func:`cxr_audit.unlearn.pipeline.refusal`: worse on its own validation objective, at
chance without the artifact, or clean accuracy traded away). When ``augment`` and ``dfr`` both
run, a row "default (augment, else rpclarc, else dfr)" shows what `unlearn`'s defaults give a
user (its ``--fallback rpclarc,dfr``; a refused result leaves the trained model). The trained model's row carries
the annotation's mask IoU against the injected masks, with the across-class mask CAV's in
brackets.

    .venv/bin/python benchmarks/mitigation.py --datasets real phantoms pure --archs resnet18 --seeds 0 1 2
    .venv/bin/python benchmarks/mitigation.py --methods augment rrclarc rrclarc:layer=layer4 --seeds 0
    .venv/bin/python benchmarks/mitigation.py --datasets phantoms --archs vgg11 --epochs 25  # 10: stamp only

A method may carry `unlearn` keyword arguments after a colon (``rrclarc:layer=layer4,freeze=none``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "covid-two-source" / "manifest.csv"
METHODS = ["none", "dfr", "jtt", "balance", "rpclarc", "pclarc", "rrclarc", "rrr"]


def build_data(kind: str, work: Path, seed: int, size: int, prevalence: float, artifact: str = "text") -> Path:
    """The poisoned manifest of one data set (stamp in ``prevalence`` of the positive class)."""
    from cxr_audit.data.inject import inject
    from cxr_audit.data.lesions import make_lesion_set
    from cxr_audit.data.phantom import generate_phantoms

    if kind == "phantoms":
        clean, positive = generate_phantoms(work / "clean", n=600, size=size, seed=seed + 1), "disease"
    elif kind in ("real", "pure"):
        contrast = (0.0, 0.0) if kind == "pure" else (0.30, 0.50)
        clean, positive = make_lesion_set(SHARED, work / "clean", size, seed=seed, contrast=contrast), "lesion"
    else:
        raise SystemExit(f"unknown data set {kind}")
    return inject(clean, work / "poisoned", artifact, {positive: prevalence}, splits=["train", "val"], seed=seed + 1)


def shortcut_model(data: Path, work: Path, arch: str, size: int, seed: int, epochs: int, device: str) -> Path:
    """The checkpoint trained on ``data``, scanned on its training split into ``work/scan.h5``
    (what :func:`annotate_cell` reads)."""
    from cxr_audit.models.architectures import build_model, spec_of
    from cxr_audit.scan.pipeline import scan
    from cxr_audit.training.pipeline import train

    spec = spec_of(arch)
    base = train(data, work / "base.pt", arch, size=size, epochs=epochs, seed=seed, device=device).checkpoint
    layers = list(spec.early_layers) + spec.scan_layers(build_model(arch, 2, 1, size))
    scan(base, data, work / "scan.h5", split="train", overwrite=True, device=device, layers=layers)
    return base


def annotate_cell(work: Path, device: str):
    """``(annotations.h5, annotated manifest, annotation quality)`` of ``work/scan.h5`` with
    `annotate`'s default masks; the quality (mask IoU against the injected masks) says whether a
    method failed on the model or on its annotation."""
    from cxr_audit.annotate.pipeline import MaskOptions, annotate

    scan_file = work / "scan.h5"
    ann = annotate(scan_file, work / "annotations.h5", from_column="artifact", masks_dir=work / "masks", device=device)
    # the masks the methods use (annotate's default, within-class CAV) beside the across-class CAV
    across = annotate(scan_file, work / "annotations-across.h5", from_column="artifact", masking=MaskOptions(cav="across"),
                      device=device)
    quality = {**ann.quality, "mask_iou_across": across.quality.get("mask_iou", float("nan"))}
    return work / "annotations.h5", ann.files["manifest"], quality


def default_masking() -> dict:
    """`annotate`'s mask defaults, recorded with a cached cell: a cell annotated under other
    defaults is annotated again (its trained model and scan are reused)."""
    from dataclasses import asdict

    from cxr_audit.annotate.pipeline import MaskOptions

    return asdict(MaskOptions())


def measure(checkpoint, data: Path, positive: str, device: str, seed: int, artifact: str = "text") -> dict:
    from cxr_audit.evaluate.pipeline import evaluate

    m = evaluate(checkpoint, data, artifact=artifact, artifact_class_name=positive, device=device, seed=seed).metrics["model"]
    worst = min(m["worst_group_accuracy"], m["victims_inserted_accuracy"])
    return {"clean": m["accuracy"], "inserted": m["artifact_inserted_accuracy"], "worst": worst}


def parse_variant(method: str) -> tuple[str, dict]:
    """``"rrclarc:layer=layer4,lambda_=1e5,per_position=0"`` -> ``("rrclarc", {"layer": "layer4",
    "lambda_": 100000.0, "options": {"per_position": 0.0}})``: a method with `unlearn` keyword
    arguments other than its defaults; keys that are not `unlearn` options are the method's own
    (``--option``); numbers parsed."""
    from dataclasses import fields

    from cxr_audit.unlearn.pipeline import UnlearnOptions

    name, _, rest = method.partition(":")
    settings, own = {}, {}
    known = {f.name for f in fields(UnlearnOptions)}
    for pair in filter(None, rest.split(",")):
        key, _, value = pair.partition("=")
        for number in (int, float):
            try:
                value = number(value)
                break
            except ValueError:
                pass
        (settings if key in known else own)[key] = value
    return name, {**settings, "options": own} if own else settings


def run_cell(kind: str, arch: str, seed: int, args) -> list[dict]:
    """Every method on one (data set, architecture, seed); one row per method."""
    from cxr_audit.unlearn.pipeline import input_at_chance, refusal, unlearn

    positive = "disease" if kind == "phantoms" else "lesion"
    artifact = getattr(args, "artifact", "text")
    work, cached = cell_folder(kind, arch, seed, artifact, args)
    cell = json.loads(cached.read_text()) if cached.is_file() else None  # --work: an earlier run's shortcut model
    if cell is None:
        print(f"[{kind} {arch} seed {seed}] building the data, training and scanning the shortcut model in {work}",
              file=sys.stderr, flush=True)
        data = build_data(kind, work, seed, args.size, args.prevalence, artifact)
        base = shortcut_model(data, work, arch, args.size, seed, args.epochs, args.device)
        cell = {"data": str(data), "base": str(base)}
    masking = default_masking()
    if cell.get("masking") != masking:  # new, or annotated under other defaults
        print(f"[{kind} {arch} seed {seed}] annotating", file=sys.stderr, flush=True)
        annotations, annotated, quality = annotate_cell(work, args.device)
        cell.update(annotations=str(annotations), annotated=str(annotated), quality=quality, masking=masking)
        cached.write_text(json.dumps(cell))
    data, base, annotations, annotated, quality = _read_cell(cell)
    reference = measure(base, data, positive, args.device, seed, artifact)
    rows = [{"dataset": kind, "arch": arch, "seed": seed, "method": "(trained)", **reference,
             "mask_iou": quality.get("mask_iou", float("nan")), "mask_iou_across": quality["mask_iou_across"]}]
    print(json.dumps(rows[0]), flush=True)
    plain = None
    for method in args.methods:
        name, settings = parse_variant(method)
        print(f"[{kind} {arch} seed {seed}] {method}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        r = unlearn(base, annotated, work / f"{method.replace(':', '_').replace(',', '_')}.pt", name,
                    annotations=annotations, epochs=args.unlearn_epochs, device=args.device, seed=seed,
                    keep_worse=True, **settings)
        seconds = time.perf_counter() - start
        plain = seconds if method == "none" else plain
        m = measure(r.checkpoint, data, positive, args.device, seed, artifact)
        gap0, gap = reference["clean"] - reference["inserted"], m["clean"] - m["inserted"]
        rows.append({"dataset": kind, "arch": arch, "seed": seed, "method": method, **m, "seconds": seconds,
                     "closed": 1 - gap / gap0 if gap0 > 0 else float("nan"), "clean_delta": m["clean"] - reference["clean"],
                     "worst_delta": m["worst"] - reference["worst"], "strength": r.lambda_,
                     "refused": refusal(r.before, r.after, 2) is not None,
                     "input_at_chance": input_at_chance(r.before, 2),
                     "improved": bool(r.before) and r.after["objective"] > r.before["objective"]})
        print(json.dumps(rows[-1]), flush=True)
    rows += default_chain(rows)
    for row in rows[1:]:
        row["cost"] = row["seconds"] / plain if plain else float("nan")
    return rows


def cell_folder(kind: str, arch: str, seed: int, artifact: str, args) -> tuple[Path, Path]:
    """``(folder, cache file)`` of one cell: a new temporary folder, or with ``--work`` one named
    by the cell and every option that shapes its shortcut model, so a later run reuses the model."""
    if args.work is None:
        work = Path(tempfile.mkdtemp(prefix=f"mit-{kind}-{arch}-{seed}-"))
    else:
        name = f"{kind}-{arch}-{artifact}-s{seed}-{args.size}px-p{args.prevalence}-e{args.epochs}"
        work = Path(args.work) / name
        work.mkdir(parents=True, exist_ok=True)
    return work, work / "cell.json"


def _read_cell(cell: dict):
    return (Path(cell["data"]), Path(cell["base"]), Path(cell["annotations"]), Path(cell["annotated"]),
            cell["quality"])


def default_chain(rows: list[dict]) -> list[dict]:
    """The row of what a user of the defaults gets — `augment`, else the first of `unlearn`'s
    fallbacks (:data:`~cxr_audit.unlearn.pipeline.DEFAULT_FALLBACK`) that is not refused, none
    when the input has no signal beyond the artifact — from the methods' rows of one cell; when
    every result is refused, nothing is written and the user keeps the trained model (closed 0).
    Empty unless the default and every fallback ran with their defaults."""
    from cxr_audit.unlearn.pipeline import DEFAULT_FALLBACK, DEFAULT_METHOD

    chain = [DEFAULT_METHOD, *DEFAULT_FALLBACK.split(",")]
    by = {r["method"]: r for r in rows}
    if not set(chain) <= set(by):
        return []
    first, trained = by[DEFAULT_METHOD], by["(trained)"]
    tried = chain[:1] if first["refused"] and first["input_at_chance"] else chain
    used, seconds = None, 0.0
    for name in tried:
        seconds += by[name]["seconds"]
        # a fallback must improve on the input (`unlearn` refuses one that changes nothing)
        if not by[name]["refused"] and (name == DEFAULT_METHOD or by[name].get("improved", True)):
            used = by[name]
            break
    kept = {k: trained[k] for k in ("clean", "inserted", "worst")}
    label = f"default ({', else '.join(chain)})"
    row = {**(used or {**first, **kept, "closed": 0.0, "clean_delta": 0.0, "worst_delta": 0.0}),
           "method": label, "seconds": seconds, "refused": used is None, "used": used["method"] if used else None}
    return [row]


def summarise(rows: list[dict]) -> str:
    """A Markdown table: mean ± sd over seeds per (data set, architecture, method)."""
    def ms(values, pct=False):
        v = np.array([x for x in values if x is not None and np.isfinite(x)], float)
        if not len(v):
            return "–"
        scale, unit = (100, " %") if pct else (1, "")
        return f"{v.mean() * scale:.{0 if pct else 3}f} ± {v.std() * scale:.{0 if pct else 3}f}{unit}"

    lines = ["| data | arch | method | clean acc. | inserted acc. | gap closed | clean Δ | worst-group Δ | cost × plain "
             "| refused | mask IoU (across-class CAV) | seeds |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = list(dict.fromkeys(r["method"] for r in rows))  # "(trained)" first, then as run
    keys = sorted({(r["dataset"], r["arch"], r["method"]) for r in rows}, key=lambda k: (k[0], k[1], order.index(k[2])))
    for key in keys:
        group = [r for r in rows if (r["dataset"], r["arch"], r["method"]) == key]
        trained = key[2] == "(trained)"
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {ms([r['clean'] for r in group])} | "
                     f"{ms([r['inserted'] for r in group])} | "
                     + ("| | | | |" if trained else
                        f"{ms([r['closed'] for r in group], True)} | {ms([r['clean_delta'] for r in group])} | "
                        f"{ms([r['worst_delta'] for r in group])} | {ms([r.get('cost') for r in group])} | "
                        f"{sum(r['refused'] for r in group)}/{len(group)} |")
                     + (f" {ms([r.get('mask_iou') for r in group])} ({ms([r.get('mask_iou_across') for r in group])}) |"
                        if trained else " |")
                     + f" {len(group)} |")
    return "\n".join(lines)


def table_from(paths: list[Path]) -> str:
    """The summary table of earlier runs' ``--json`` files (e.g. one per architecture)."""
    return summarise([row for p in paths for row in json.loads(Path(p).read_text())])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["real", "phantoms", "pure"])
    parser.add_argument("--archs", nargs="+", default=["resnet18", "vgg11"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--prevalence", type=float, default=0.85)
    parser.add_argument("--artifact", default="text", help="the planted artifact (any registered: text, marker, ...)")
    parser.add_argument("--epochs", type=int, default=10, help="training the shortcut model")
    parser.add_argument("--unlearn-epochs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the runs (default: a temporary one); a cell already there (same data set, "
                        "architecture, artifact, seed, size, prevalence, epochs) reuses its trained, scanned and "
                        "annotated model")
    parser.add_argument("--json", type=Path, default=None, help="also write every row here")
    parser.add_argument("--table", type=Path, nargs="+", default=None, help="only print the table of these --json files")
    args = parser.parse_args()
    if args.table:
        print(table_from(args.table))
        return
    if "none" not in args.methods:
        args.methods = ["none", *args.methods]  # the cost baseline

    import torch

    torch.set_num_threads(2)
    rows = []
    for kind in args.datasets:
        for arch in args.archs:
            for seed in args.seeds:
                rows += run_cell(kind, arch, seed, args)
                if args.json:
                    args.json.write_text(json.dumps(rows, indent=1))
    print(f"\n{args.size} px, {args.artifact} artifact in {args.prevalence:.0%} of the positive class's training/validation images, "
          f"{args.epochs} training epochs, {args.unlearn_epochs} unlearning epochs, device {args.device}\n")
    print(summarise(rows))


if __name__ == "__main__":
    main()
