"""Peak memory and time of `evaluate` as the test set grows (it streams 256 images at a time).

Phantom test sets of each size (64 px by default, lung masks, so `activation_precision` runs
too), a resnet18 trained for one epoch on a separate small phantom set, and
`evaluate --artifact text --artifact-class disease` in a fresh process per size, which reports its wall time and peak
resident memory (`VmHWM`; see `peak_memory.py`). `--code-root DIR` runs another checkout of cxr-audit (e.g. a
`git worktree` of a commit before the streaming) for the baseline in the same run. Slope: the
least-squares growth of peak memory per 1,000 test images.

    .venv/bin/python benchmarks/evaluate_memory.py [--sizes 2000 5000 20000] [--code-root /tmp/old]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from peak_memory import peak_rss_mb  # benchmarks/ is the script's folder


def _subset(manifest: Path, n: int, out: Path) -> Path:
    """The first ``n`` rows of ``manifest``, paths made absolute."""
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))[:n]
    for row in rows:
        for key in ("path", "mask"):
            if row.get(key):
                row[key] = str((manifest.parent / row[key]).resolve())
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def _child(model: str, data: str) -> None:
    import torch
    from cxr_audit.evaluate.pipeline import evaluate

    torch.set_num_threads(2)
    start = time.perf_counter()
    metrics = evaluate(model, data, split=None, artifact="text", artifact_class_name="disease", device="cpu",
                       batch_size=64).metrics["model"]
    print(json.dumps({"seconds": time.perf_counter() - start,
                      "peak_mb": peak_rss_mb(),
                      "accuracy": metrics["accuracy"], "inserted": metrics["artifact_inserted_accuracy"]}))


def _run(model: Path, data: Path, code_root: Path | None) -> dict:
    env = dict(os.environ)
    if code_root:
        env["PYTHONPATH"] = str(code_root)
    done = subprocess.run([sys.executable, __file__, "--child", str(model), str(data)], capture_output=True,
                          text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[2000, 5000, 20000])
    parser.add_argument("--size", type=int, default=64, help="image size in pixels")
    parser.add_argument("--code-root", type=Path, default=None, help="another checkout to run as the baseline")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return
    from cxr_audit.data.phantom import generate_phantoms
    from cxr_audit.training.pipeline import train

    work = args.work or Path(tempfile.mkdtemp(prefix="evaluate-memory-"))
    model = work / "model.pt"
    if not model.exists():
        small = generate_phantoms(work / "train", n=200, size=args.size, seed=1)
        train(small, model, "resnet18", size=args.size, epochs=1, seed=0, device="cpu")
    test = work / "test" / "manifest.csv"
    if not test.exists():
        generate_phantoms(work / "test", n=max(args.sizes), size=args.size, seed=2, split_fractions=(0.0, 0.0, 1.0))
    rows = []
    for code, root in [("streamed", None)] + ([("baseline", args.code_root)] if args.code_root else []):
        for n in args.sizes:
            figures = _run(model, _subset(test, n, work / f"test-{n}.csv"), root)
            rows.append({"code": code, "n": n, **figures})
            print("done:", rows[-1], flush=True)
    print(f"\nevaluate --artifact text, resnet18 at {args.size} px, CPU (2 threads)")
    print(f"{'code':9} {'test images':>11} {'seconds':>8} {'peak MB':>8}")
    for r in rows:
        print(f"{r['code']:9} {r['n']:11d} {r['seconds']:8.1f} {r['peak_mb']:8.0f}")
    for code in sorted({r["code"] for r in rows}):
        g = [r for r in rows if r["code"] == code]
        if len(g) > 1:
            slope = np.polyfit([r["n"] / 1000 for r in g], [r["peak_mb"] for r in g], 1)[0]
            print(f"{code}: peak memory grows {slope:.1f} MB per 1,000 test images")


if __name__ == "__main__":
    main()
