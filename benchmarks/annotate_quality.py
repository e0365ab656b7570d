"""Annotation quality: artifact retrieval (AUROC, AP on held-out rows) and mask IoU per artifact,
architecture, CAV estimator and layer, from 5 seed positives.

    .venv/bin/python benchmarks/annotate_quality.py [--archs resnet18 vgg11] [--artifacts text marker frame ruler]
        [--mask-rules upsample intensity] [--mask-thresholds peak peak:0.3 otsu]
        [--mask-references clean none] [--mask-completions none saturated]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from itertools import product
from pathlib import Path

import h5py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["resnet18", "vgg11"])
    parser.add_argument("--artifacts", nargs="+", default=["text", "marker", "frame", "ruler"])
    parser.add_argument("--cavs", nargs="+", default=["signal", "svm"])
    parser.add_argument("--mask-thresholds", nargs="+", default=["peak", "otsu"])
    parser.add_argument("--mask-rules", nargs="+", default=["upsample", "intensity"])
    parser.add_argument("--mask-references", nargs="+", default=["clean"])
    parser.add_argument("--mask-completions", nargs="+", default=["saturated"])
    parser.add_argument("--blur", type=float, default=None, help="mask blur sigma in px (default: annotate's)")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch
    from cxr_audit.annotate.pipeline import MaskOptions, annotate
    from cxr_audit.data.inject import inject
    from cxr_audit.data.phantom import generate_phantoms
    from cxr_audit.explain.methods import default_layers
    from cxr_audit.models.architectures import build_model, spec_of
    from cxr_audit.scan.pipeline import scan
    from cxr_audit.training.pipeline import train

    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp())
    phantoms = generate_phantoms(work / "ph", n=args.n, size=args.size, seed=7)
    rows = []
    for arch in args.archs:
        layers = list(spec_of(arch).early_layers) + default_layers(arch, build_model(arch, 2, 1, args.size))
        for artifact in args.artifacts:
            data = inject(phantoms, work / f"{artifact}", artifact, {"disease": 0.9}, splits=["train", "val"], seed=7)
            ckpt = train(data, work / f"{arch}-{artifact}.pt", arch, size=args.size, epochs=args.epochs,
                         batch_size=16, device=args.device).checkpoint
            s = scan(ckpt, data, work / f"{arch}-{artifact}.h5", layers=layers, device=args.device).path
            with h5py.File(s) as f:
                seeds = f["samples/index"][:][f["samples/artifact"][:] == 1][:5].tolist()
            for cav in args.cavs:
                for layer in layers:
                    for thr, rule, ref, comp in product(args.mask_thresholds, args.mask_rules,
                                                        args.mask_references, args.mask_completions):
                        start = time.perf_counter()
                        masking = MaskOptions(layer=layer, threshold=thr, rule=rule, reference=ref, complete=comp,
                                              blur=args.blur)
                        r = annotate(s, work / "a.h5", seeds=seeds, layer=layer, method=cav, masking=masking,
                                     device=args.device)
                        q = r.quality
                        rows.append((arch, artifact, cav, layer, f"{thr}/{rule}/{ref}/{comp}",
                                     q["retrieval_held_out"]["auroc"], q["retrieval_held_out"]["ap"],
                                     q.get("mask_iou", float("nan")), q.get("pointing_game", float("nan")),
                                     time.perf_counter() - start))
    print(f"\nannotation quality from 5 seeds ({args.size}px phantoms, artifact in 90% of disease train images)")
    header = (f"{'arch':9} {'artifact':9} {'cav':7} {'layer':12} {'mask thr/rule/ref/complete':34} {'AUROC':>6} {'AP':>6} {'IoU':>6} "
              f"{'point':>6} {'s':>5}")
    print(header)
    print("-" * len(header))
    for arch, artifact, cav, layer, thr, auroc, ap, miou, point, secs in rows:
        print(f"{arch:9} {artifact:9} {cav:7} {layer:12} {thr:34} {auroc:6.3f} {ap:6.3f} {miou:6.3f} {point:6.2f} "
              f"{secs:5.1f}")


if __name__ == "__main__":
    main()
