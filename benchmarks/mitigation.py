"""Mitigation benchmark: does each `unlearn` method remove a planted shortcut, what does it cost?

Phantoms with a text stamp in ``--prevalence`` of the *disease* training/validation images; a
model trained on them; scan → annotate (artifact labels + masks from the CAV, the pipeline a user
runs) → unlearn with every method (λ by the built-in sweep unless ``--lambda`` is given) →
evaluate on the clean test split and the artifact-inserted test split (stamp drawn on every
healthy test image). Prints one row per method: clean and artifact-inserted accuracy, the
clean/inserted gap and how much of the plain model's gap is closed, artifact relevance share,
the chosen λ, and the cost per training step relative to plain fine-tuning measured in the same
run; then the acceptance checks of issue #5.

    .venv/bin/python benchmarks/mitigation.py [--methods none rrr rrclarc ...] [--arch resnet18] [--device cpu]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

ALL = ["none", "balance", "rrr", "rrclarc", "pclarc", "aclarc", "isnet", "exbl"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=ALL)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--prevalence", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=8, help="training the shortcut model")
    parser.add_argument("--unlearn-epochs", type=int, default=4)
    parser.add_argument("--layer", default="layer2", help="CAV layer for the ClArC methods")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from cxr_audit.annotating import annotate
    from cxr_audit.data.inject import inject
    from cxr_audit.data.phantom import generate_phantoms
    from cxr_audit.evaluating import evaluate
    from cxr_audit.models.architectures import build_model, spec_of
    from cxr_audit.scanning import scan
    from cxr_audit.training import train
    from cxr_audit.unlearning import unlearn

    torch.set_num_threads(2)
    work = args.out or Path(tempfile.mkdtemp())
    spec = spec_of(args.arch)
    phantoms = generate_phantoms(work / "phantoms", n=args.n, size=args.size, seed=1)
    data = inject(phantoms, work / "poisoned", "text", {"disease": args.prevalence}, splits=["train", "val"], seed=1)
    base = train(data, work / "base.pt", args.arch, size=args.size, epochs=args.epochs, seed=args.seed,
                 device=args.device).checkpoint
    scan_file = scan(base, data, work / "scan.h5", split="train", overwrite=True, device=args.device,
                     layers=list(spec.early_layers) + spec.scan_layers(build_model(args.arch, 2, 1, args.size)) or None).path
    ann = annotate(scan_file, work / "annotations.h5", from_column="artifact", masks_dir=work / "masks",
                   device=args.device, layer=args.layer if spec.early_layers else None)
    annotated = ann.files["manifest"]
    print(f"annotation: mask IoU {ann.quality.get('mask_iou', float('nan')):.2f}; training data {annotated}")

    def measure(ckpt):
        m = evaluate(ckpt, data, artifact="text", artifact_class_name="disease", device=args.device,
                     seed=args.seed).metrics["model"]
        return m

    reference = measure(base)
    rows, plain_step = [], None
    for method in args.methods:
        r = unlearn(base, annotated, work / f"{method}.pt", method, annotations=work / "annotations.h5",
                    layer=args.layer if spec.early_layers else None, epochs=args.unlearn_epochs,
                    device=args.device, seed=args.seed)
        if method == "none":
            plain_step = r.seconds_per_step
        rows.append((method, r, measure(r.checkpoint)))

    gap0 = reference["accuracy"] - reference["artifact_inserted_accuracy"]
    header = (f"{'method':<9} {'clean':>6} {'inserted':>8} {'gap':>6} {'closed':>7} {'LRP share':>9} "
              f"{'G×I share':>9} {'λ':>8} {'s/step':>7} {'× plain':>7}")
    print(f"\n{args.arch}@{args.size}px, text stamp in {args.prevalence:.0%} of disease train images, "
          f"{args.unlearn_epochs} fine-tuning epochs, device {args.device}")
    print(header)
    print("-" * len(header))
    print(f"{'(trained)':<9} {reference['accuracy']:6.3f} {reference['artifact_inserted_accuracy']:8.3f} "
          f"{gap0:6.3f} {'':>7} {reference['artifact_relevance_share']:9.3f} {reference['artifact_gradient_share']:9.3f}")
    for method, r, m in rows:
        gap = m["accuracy"] - m["artifact_inserted_accuracy"]
        ratio = r.seconds_per_step / plain_step if plain_step and r.seconds_per_step else float("nan")
        lam = f"{r.lambda_:g}" if r.lambda_ else "-"
        print(f"{method:<9} {m['accuracy']:6.3f} {m['artifact_inserted_accuracy']:8.3f} {gap:6.3f} "
              f"{1 - gap / gap0 if gap0 > 0 else float('nan'):7.0%} {m['artifact_relevance_share']:9.3f} "
              f"{m['artifact_gradient_share']:9.3f} "
              f"{lam:>8} {r.seconds_per_step:7.3f} {ratio:7.2f}")
    print("\nacceptance (issue #5):")
    print(f"  plain model loses >= 20 points on the artifact-inserted test: {gap0 * 100:.1f} -> "
          f"{'PASS' if gap0 >= 0.2 else 'FAIL'}")
    for method, _run, m in rows:
        if method not in ("rrr", "rrclarc"):
            continue
        gap = m["accuracy"] - m["artifact_inserted_accuracy"]
        checks = {"gap shrinks >= 50%": gap <= 0.5 * gap0,
                  "clean drop <= 3 points": reference["accuracy"] - m["accuracy"] <= 0.03,
                  "LRP share falls >= 50%": m["artifact_relevance_share"] <= 0.5 * reference["artifact_relevance_share"],
                  "G×I share falls >= 50%": m["artifact_gradient_share"] <= 0.5 * reference["artifact_gradient_share"]}
        print(f"  {method}: " + ", ".join(f"{k}: {'PASS' if v else 'FAIL'}" for k, v in checks.items()))


if __name__ == "__main__":
    main()
