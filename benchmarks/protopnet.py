"""ProtoPNet per training mix: accuracy, flagged prototypes, stamped projections, PRP faithfulness.

Gautam et al. (2022, ISBI) train ProtoPNet on mixes in which x % of the positive class comes from
source H1 and show the prototypes latching onto H1's cues. Here, per mix and seed: a
``protopnet:ARCH`` is trained (`train`'s three steps), evaluated on the clean test split, the
training images are scanned and revealed (:mod:`cxr_audit.reveal.prototypes`), and the table
gives the test accuracy, the share of each class's prototypes flagged (source-linked or with PRP
relevance densely outside the lungs), the share projected onto a stamped patch — ``stamped_cell``:
the projected feature cell overlaps the injected stamp's mask; ``stamped_prp``: the prototype's PRP
map on its projected image is at least :data:`~cxr_audit.reveal.prototypes.ENRICHMENT` times denser
on the stamp than elsewhere (:func:`stamp_enrichment` says why the cell misleads) —
``stamped_near``: the same PRP test, mean over the prototype's :data:`NEAR_STAMPED` nearest
stamped training images (a prototype projected onto an unstamped image has no stamp to look at
there, whatever it encodes), whether one of
the class's PRP-stamped prototypes is also flagged (``caught``: the issue's acceptance, 1 = in
every seed; ``caught_near`` with ``stamped_near``), ``overlap`` (mean Jaccard of the prototypes'
nearest-image sets within the class: how far they are duplicates), ``reliance`` (`evaluate`'s
``artifact_inserted_drop``: test accuracy lost when the stamp is drawn on every image of the other
class — a model that does not use the stamp *should* have no stamped prototype) and Average Drop of
PRP vs the upsampled similarity maps (`evaluate`); mean ± sd over seeds. ``--disease-strength``
(phantom opacity brightness, default 0.15; lower = harder, so the stamp becomes the easier cue)
sweeps how attractive the shortcut is.

Data: ``phantoms`` (two alternating sources; a text stamp on every H1 = ``site0`` image; the
positive class ``disease``) at mixes ``--mixes`` (default 50 and 90 % of disease from H1; the
healthy images 50/50 as in Gautam et al., or ``--healthy-h1 10``: H1 carries most of the disease
and H2 most of the healthy images, the issue's acceptance case), and
``covid`` (``../shared/data/covid-two-source``: every COVID image from Hannover, every normal from
the NIH — the 100/0 extreme, the only mix its sources allow; no lung masks, so no outside flag).

    .venv/bin/python benchmarks/protopnet.py [--data phantoms covid] [--seeds 0 1 2] [--size 128] [--epochs 10]
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import numpy as np
from cxr_audit.reveal.prototypes import ENRICHMENT

#: stamped images among a prototype's nearest on which ``stamped_near`` reads its PRP maps
NEAR_STAMPED = 4
COVID = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "covid-two-source" / "manifest.csv"


def phantom_mix(work: Path, n: int, size: int, seed: int, x: int, y: int = 50, strength: float = 0.15) -> Path:
    """Phantoms with a stamp on every ``site0`` image, ``x`` % of the disease images and ``y`` % of
    the healthy images from ``site0`` (images of the source in excess dropped, per class)."""
    from cxr_audit.data.inject import inject
    from cxr_audit.data.phantom import generate_phantoms

    stamped = work / "stamped" / "manifest.csv"
    if not stamped.exists():
        phantoms = generate_phantoms(work / "ph", n=n, size=size, seed=seed, sources=2, disease_strength=strength)
        stamped = inject(phantoms, work / "stamped", "text", {"site0": 1.0}, by="source", seed=seed)
    rows = list(csv.DictReader(open(stamped)))
    drop = set()
    for label, share in (("disease", x), ("healthy", y)):
        h1 = [i for i, r in enumerate(rows) if r["label"] == label and r["source"] == "site0"]
        h2 = [i for i, r in enumerate(rows) if r["label"] == label and r["source"] == "site1"]
        # keep as many images as the mix allows: all of the scarcer source's share, part of the other
        keep = min(len(h1) * 100 / max(share, 1e-9), len(h2) * 100 / max(100 - share, 1e-9))
        drop |= set(h1[round(keep * share / 100):]) | set(h2[round(keep * (100 - share) / 100):])
    out = work / f"mix{x}_{y}.csv"
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        for i, r in enumerate(rows):
            if i not in drop:
                writer.writerow({k: (str((stamped.parent / v).resolve()) if k in ("path", "mask", "artifact_mask") and v
                                     else v) for k, v in r.items()})
    return out


def stamped_projection(record: dict, artifact_masks: dict) -> bool:
    """Whether a prototype's projected feature cell (its box) overlaps the injected stamp of its image."""
    from cxr_audit.data.io import read_image

    mask_path = artifact_masks.get(record.get("sample"))
    if not mask_path:
        return False
    y0, x0, y1, x1 = record["box"]
    return bool((read_image(mask_path)[y0:y1, x0:x1] > 0.5).any())


def stamp_enrichment(ckpt: Path, manifest, prototypes: list[dict], images: list[list[int]]) -> list[float | None]:
    """Per prototype, how much denser its PRP relevance is inside the injected stamp than elsewhere
    (:func:`cxr_audit.reveal.prototypes.outside_enrichment` with the stamp for the outside), mean
    over ``images[j]`` (manifest ids; those without a stamp are skipped; ``None`` when none has
    one); ``manifest``: the trained-on data. The feature cell is not where a prototype looks: a
    1x1 prototype on a ResNet trunk sees the whole image from every cell, so on these phantoms the
    disease prototypes projected onto lung cells while their PRP maps lit up the stamp in the
    corner (Gautam et al., 2023: PRP, not the cell or the upsampled similarity, shows it)."""
    import torch
    from cxr_audit.data.dataset import CxrDataset, collate
    from cxr_audit.data.io import read_image
    from cxr_audit.explain.prp import prototype_explainer
    from cxr_audit.models.architectures import spec_of
    from cxr_audit.models.registry import load_checkpoint, preprocessing_of
    from cxr_audit.reveal.location import outside_share
    from cxr_audit.reveal.prototypes import outside_enrichment
    from PIL import Image

    net, config = load_checkpoint(ckpt)
    prep = preprocessing_of(config)
    dataset = CxrDataset(manifest, prep, with_masks=False)
    position = {smp.index: k for k, smp in enumerate(manifest.samples)}
    out = []
    with prototype_explainer(net.eval(), config["arch"], prep, spec_of(config["arch"]).prototype_layer) as explain:
        for p, ids in zip(prototypes, images):
            ids = [i for i in ids if manifest.samples[position[i]].artifact_mask]
            if not ids:
                out.append(None)
                continue
            batch = collate([dataset[position[i]] for i in ids])
            maps = explain(batch["image"], index=torch.full((len(ids), 1), p["prototype"])).prp[:, 0].numpy()
            stamps = np.stack([np.asarray(Image.fromarray(read_image(manifest.samples[position[i]].artifact_mask) > 0.5)
                                          .resize(maps.shape[:0:-1], Image.NEAREST)) for i in ids]).astype(float)
            # the share on the stamp is the share "outside" the stamp's complement, as the audit reads the lungs
            out.append(outside_enrichment(1 - outside_share(maps, 1 - stamps), float(stamps.mean())))
    return out


def neighbour_overlap(prototypes: list[dict]) -> float:
    """Mean Jaccard overlap of the nearest-image sets of every pair of ``prototypes`` (reveal's
    ``nearest``): 1 = duplicates that respond to the same images, 0 = each its own images."""
    sets = [set(p["nearest"]) for p in prototypes]
    pairs = [len(a & b) / len(a | b) for i, a in enumerate(sets) for b in sets[i + 1:] if a | b]
    return float(np.mean(pairs)) if pairs else float("nan")


def run_cell(data: Path, work: Path, args, seed: int, positive: str) -> dict:
    """Train, evaluate, scan and reveal one ProtoPNet; its row of the table."""
    from cxr_audit.data.manifest import load_manifest
    from cxr_audit.evaluate.pipeline import evaluate
    from cxr_audit.reveal.pipeline import reveal
    from cxr_audit.scan.pipeline import scan
    from cxr_audit.training.pipeline import train

    start = time.perf_counter()
    ckpt = work / "pp.pt"
    if not ckpt.is_file():  # --work of an earlier run: its trained model (same data, seed and options) is reused
        ckpt = train(data, ckpt, f"protopnet:{args.arch}", size=args.size, epochs=args.epochs,
                     batch_size=16, seed=seed, device="cpu").checkpoint
    stamp = "text" if positive == "disease" else None  # phantoms: the stamp drawn on every healthy test image
    metrics = evaluate(ckpt, data, device="cpu", seed=seed, artifact=stamp).metrics["model"]
    s = scan(ckpt, data, work / "train.h5", split="train", device="cpu", prototype_maps=1).path
    prototypes = reveal(s, work / "reveal", references=False)["prototypes"]
    manifest = load_manifest(data)
    masks = {smp.index: smp.artifact_mask for smp in manifest.samples}
    ids = [p["prototype"] for p in prototypes]
    dense = dict(zip(ids, stamp_enrichment(ckpt, manifest, prototypes, [[p["projected"]["sample"]] for p in prototypes])))
    stamped = {smp.index for smp in manifest.samples if smp.artifact_mask}
    near = [[i for i in p["nearest"] if i in stamped][:NEAR_STAMPED] for p in prototypes]
    dense_near = dict(zip(ids, stamp_enrichment(ckpt, manifest, prototypes, near)))
    share = {}
    for cls in sorted({p["class"] for p in prototypes}):
        own = [p for p in prototypes if p["class"] == cls]
        cell = [stamped_projection(p["projected"], masks) for p in own]
        looks = [(dense[p["prototype"]] or 0.0) >= ENRICHMENT for p in own]
        looks_near = [(dense_near[p["prototype"]] or 0.0) >= ENRICHMENT for p in own]
        share[cls] = (np.mean([p["flagged"] for p in own]), np.mean(cell), np.mean(looks),
                      float(any(s and p["flagged"] for s, p in zip(looks, own))), neighbour_overlap(own),
                      np.mean(looks_near), float(any(s and p["flagged"] for s, p in zip(looks_near, own))))
    other = next(c for c in share if c != positive)
    return {"accuracy": metrics["accuracy"], "flagged_pos": share[positive][0], "flagged_other": share[other][0],
            "stamped_cell_pos": share[positive][1], "stamped_cell_other": share[other][1],
            "stamped_prp_pos": share[positive][2], "stamped_prp_other": share[other][2],
            "caught_pos": share[positive][3], "caught_other": share[other][3],
            "overlap_pos": share[positive][4], "overlap_other": share[other][4],
            "stamped_near_pos": share[positive][5], "caught_near_pos": share[positive][6],
            "reliance": metrics.get("artifact_inserted_drop", float("nan")), "ad_prp": metrics["prp_average_drop"],
            "ad_act": metrics["activation_average_drop"],
            "seconds": time.perf_counter() - start}


def _cells(args, root: Path):
    """``(data kind, mix label, seed, manifest, work folder, positive class)`` of every cell."""
    for kind in args.data:
        for seed in args.seeds:
            if kind == "covid":
                yield kind, "100/0", seed, COVID, root / f"covid{seed}", "covid"
                continue
            for strength in args.disease_strength:
                for x in args.mixes:
                    work, y = root / f"ph{seed}_{strength}", 50 if x == 50 else args.healthy_h1
                    data = phantom_mix(work, args.n, args.size, seed, x, y, strength)
                    yield kind, f"{x}/{100 - x}, healthy {y}/{100 - y}, opacity {strength}", seed, data, \
                        work / f"x{x}", "disease"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=["phantoms"], choices=["phantoms", "covid"])
    parser.add_argument("--mixes", nargs="+", type=int, default=[50, 90], help="%% of disease images from H1")
    parser.add_argument("--healthy-h1", type=int, default=50,
                        help="%% of healthy images from H1 (50: Gautam et al.'s design; 10: H1 carries disease, "
                             "H2 healthy; 50 is used for the 50 mix either way)")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--disease-strength", nargs="+", type=float, default=[0.15],
                        help="phantom opacity brightness (lower: the stamp is the easier cue)")
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--work", help="folder for data and models (default: a new temporary one); the models "
                                       "already in it are reused, so a table can be re-read with new metrics")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(2)
    root = Path(args.work) if args.work else Path(tempfile.mkdtemp())
    results: dict = {}
    for kind, mix, seed, data, work, positive in _cells(args, root):
        work.mkdir(parents=True, exist_ok=True)
        row = run_cell(data, work, args, seed, positive)
        print("done:", kind, mix, seed, {k: round(float(v), 3) for k, v in row.items()}, flush=True)
        results.setdefault((kind, mix), []).append(row)
    _print_table(results, args)


def _print_table(results: dict, args) -> None:
    keys = ["accuracy", "reliance", "flagged_pos", "flagged_other", "stamped_cell_pos", "stamped_cell_other",
            "stamped_prp_pos", "stamped_prp_other", "caught_pos", "caught_other", "overlap_pos",
            "overlap_other", "stamped_near_pos", "caught_near_pos", "ad_prp", "ad_act", "seconds"]
    print(f"\nprotopnet:{args.arch}, {args.size}px, {args.epochs} epochs; mean ± sd over seeds {args.seeds}; "
          "pos = the class over-represented in H1")
    print("| data | mix H1/H2 (pos) | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for (kind, mix), rows in results.items():
        cells = [f"{np.mean([r[k] for r in rows]):.2f} ± {np.std([r[k] for r in rows]):.2f}" for k in keys]
        print(f"| {kind} | {mix} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
