"""Annotate at data-set scale: time, peak memory and retrieval from 10k to 100k samples.

Uses the planted scan stores of `benchmarks/reveal_scale.py` (real schema, a known artifact in
`/samples/artifact`; `--wide` gives ResNet-50 widths, 512/1024/2048 channels). Each `annotate`
runs in its own process (wall time, its own peak RSS, `VmHWM`), without masks (a planted store has no model
or images; masks are painted batch by batch and capped by `--max-masks` anyway), in two modes:

- `seeds`: 5 artifact samples as seeds (the CAV is fitted on ~55 rows, every row is scored);
- `column`: `--from-column artifact --refine 1` (CAVs fitted on every row: the N-sized fits).

`--method` picks the CAV (`signal` streams sums over every row; the estimator CAVs fit at most
`FIT_MAX` stratified rows). `--code-root DIR` runs another checkout (e.g. a `git worktree` of the
previous commit) as the baseline, in the same run. AUROC: the final scores against the planted
artifact over every row (in-sample for `column`; it checks that both codes agree).

    .venv/bin/python benchmarks/annotate_scale.py [--sizes 10000 100000] [--wide] [--code-root /tmp/old]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_memory import peak_rss_mb  # noqa: E402  (benchmarks/ is the script's folder)
from reveal_scale import LAYERS, WIDE_LAYERS, build_planted_store  # noqa: E402

MODES = {"seeds": {}, "column": {"from_column": "artifact", "refine": 1}}


def _child(store: str, out: str, mode: str, method: str) -> None:
    """Run one annotate in this process and print its figures as JSON (the parent's row)."""
    import h5py
    import numpy as np
    from cxr_audit.annotate.pipeline import annotate

    options = dict(MODES[mode])
    with h5py.File(store, "r") as f:
        artifact, index = f["samples/artifact"][:], f["samples/index"][:]
    if mode == "seeds":
        options["seeds"] = index[artifact == 1][:5].tolist()
    start = time.perf_counter()
    result = annotate(store, out, method=method, masks=False, **options)
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    from sklearn.metrics import roc_auc_score

    with h5py.File(out, "r") as f:
        scores = f["scores"][:]
    print(json.dumps({"seconds": seconds, "peak_mb": peak, "auroc": float(np.round(roc_auc_score(artifact, scores), 4)),
                      "labelled": result.n_labelled}))


def _run(store: Path, out: Path, mode: str, method: str, code_root: Path | None) -> dict:
    env = dict(os.environ)
    if code_root:
        env["PYTHONPATH"] = str(code_root)
    cmd = [sys.executable, __file__, "--child", str(store), str(out), mode, method]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[10000, 100000])
    parser.add_argument("--wide", action="store_true", help="ResNet-50 widths (512/1024/2048 channels)")
    parser.add_argument("--method", default="signal", help="CAV: signal, ridge, svm, logistic")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--code-root", type=Path, default=None, help="another checkout to run as the baseline")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return
    work = Path(tempfile.mkdtemp())
    codes = [("streamed", None)] + ([("baseline", args.code_root)] if args.code_root else [])
    print(f"\nannotate at scale ({'wide' if args.wide else 'narrow'} layers, CAV {args.method}, no masks)")
    header = f"{'N':>7} {'mode':7} {'code':9} {'s':>7} {'peak MB':>8} {'AUROC':>6} {'labelled':>9}"
    print(header)
    print("-" * len(header))
    for n in args.sizes:
        store = build_planted_store(work / f"planted_{n}.h5", n, args.seed, layers=WIDE_LAYERS if args.wide else LAYERS)
        for mode in args.modes:
            for code, root in codes:
                row = _run(store, work / f"ann_{n}_{mode}_{code}.h5", mode, args.method, root)
                print(f"{n:7d} {mode:7} {code:9} {row['seconds']:7.1f} {row['peak_mb']:8.0f} {row['auroc']:6.3f} "
                      f"{row['labelled']:9d}", flush=True)
        store.unlink()


if __name__ == "__main__":
    main()
