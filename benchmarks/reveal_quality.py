"""Reveal quality: does a top-3 revealed concept or cluster retrieve the artifact samples?

For each artifact type and architecture: phantoms with the artifact in a share of the *disease*
training images, a small CNN trained on them, scan, reveal; prints the best retrieval AUROC among
the top-3 concepts (score = the concept's max-pooled activation; "member CAV": a signal CAV at
the earliest scanned layer fitted on the concept's members, as `annotate` would) and among the
top-3 SpRAy clusters (score = membership), the top suspicion score, whether the calibrated alarm
was raised (by any concept), and the reveal time per 1,000 samples. "model" says "1-class" when
the trained model predicts one class for every validation image (it learned nothing to audit).
The `none` row is the no-artifact control (its AUROC is undefined; it should raise no alarm).

    .venv/bin/python benchmarks/reveal_quality.py [--archs resnet18 vgg11] [--artifacts text marker frame]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["resnet18", "vgg11"])
    parser.add_argument("--artifacts", nargs="+", default=["text", "marker", "frame"])
    parser.add_argument("--prevalence", type=float, default=0.5)
    parser.add_argument("--n", type=int, default=240)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs (default: 8 for resnet18, 20 for vgg11, which learns nothing in 8)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: 1e-3; 1e-4 for VGGs)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[11],
                        help="phantom/injection/training seeds; several show the spread of the scores")
    args = parser.parse_args()

    import torch
    from cxr_audit.data.inject import inject
    from cxr_audit.data.phantom import generate_phantoms
    from cxr_audit.models.architectures import spec_of
    from cxr_audit.reveal.pipeline import reveal
    from cxr_audit.scan.pipeline import scan
    from cxr_audit.training.pipeline import train
    from sklearn.metrics import roc_auc_score

    torch.set_num_threads(2)
    root = Path(tempfile.mkdtemp())
    rows = []
    for seed, arch, artifact in ((s, a, x) for s in args.seeds for a in args.archs for x in args.artifacts + ["none"]):
        work = root / f"seed{seed}"
        phantoms = generate_phantoms(work / "ph", n=args.n, size=args.size, seed=seed) \
            if not (work / "ph" / "manifest.csv").exists() else work / "ph" / "manifest.csv"
        if artifact == "none":
            data = phantoms
        else:
            data = inject(phantoms, work / artifact, artifact, {"disease": args.prevalence},
                          splits=["train", "val"], seed=seed)
        lr = spec_of(arch).recommended_lr  # slower-learning architectures train longer
        trained = train(data, work / f"{arch}-{artifact}.pt", arch, size=args.size,
                        epochs=args.epochs or (20 if lr < 1e-3 else 8), lr=args.lr or lr,
                        batch_size=16, seed=seed)
        ckpt, learned = trained.checkpoint, "1-class" if trained.warnings else "ok"
        s = scan(ckpt, data, work / f"{arch}-{artifact}.h5", device="cpu").path
        start = time.perf_counter()
        result = reveal(s, work / f"r-{arch}-{artifact}", references=False)
        secs = time.perf_counter() - start
        with h5py.File(s) as f:
            lookup = dict(zip(f["samples/index"][:].tolist(), f["samples/artifact"][:].tolist()))
        truth = np.array([lookup[i] for i in result["sample_ids"]]) == 1
        concept_auc = cav_auc = cluster_auc = float("nan")
        if truth.any():
            concept_auc = max(roc_auc_score(truth, c["scores"]["activation_max"]) for c in result["concepts"][:3])
            cav_auc = max(roc_auc_score(truth, c["scores"]["cav"]) for c in result["concepts"][:3] if "cav" in c["scores"])
            ids = np.array(result["sample_ids"])
            cluster_auc = max(roc_auc_score(truth, np.isin(ids, c["members"])) for c in result["clusters"][:3])
        top = result["concepts"][0]
        rows.append((seed, arch, artifact, learned, concept_auc, cav_auc, cluster_auc, top["suspicion"], result["alarm"]["raised"],
                     top["contrast"], top["minority"], top["importance"], top.get("outside_lungs", float("nan")),
                     1000 * secs / len(result["sample_ids"])))
        print("done:", rows[-1], flush=True)
    print(f"\nreveal quality ({args.size}px phantoms, artifact in {args.prevalence:.0%} of disease train images)")
    header = (f"{'seed':>4} {'arch':9} {'artifact':9} {'model':7} {'concept AUROC':>13} {'member CAV':>10} {'cluster AUROC':>13} {'suspicion':>9} "
              f"{'alarm':>5} {'contrast':>8} {'minority':>8} {'import.':>7} {'outside':>7} {'s/1000':>7}")
    print(header)
    print("-" * len(header))
    for seed, arch, artifact, learned, c_auc, v_auc, k_auc, susp, alarm, con, mino, imp, outside, per_k in rows:
        print(f"{seed:4d} {arch:9} {artifact:9} {learned:7} {c_auc:13.3f} {v_auc:10.3f} {k_auc:13.3f} {susp:9.3f} {str(alarm):>5} {con:8.3f} "
              f"{mino:8.3f} {imp:7.3f} {outside:7.3f} {per_k:7.1f}")


if __name__ == "__main__":
    main()
