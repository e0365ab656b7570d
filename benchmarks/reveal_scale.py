"""Reveal at data-set scale: time, peak memory and planted-concept retrieval from 1k to 100k samples.

Scans of 100,000 real images take a GPU-day, so the stores here are *planted*: synthetic scan
files in the real schema (`cxr_audit.store`), built block by block, whose numbers carry known
structure (see `build_planted_store`):

- two classes (50/50) and two sources; class 1's source A shares 60 % of the class;
- an artifact in 60 % of class 1's source-A images and 5 % of its source-B images (the
  ground truth, `/samples/artifact`): one channel per layer carries `2.5 × strength` more
  activation (over gamma noise of sd 0.35) and is relevant for the predicted disease, and their
  heatmaps carry a corner blob of `strength` times a lesion's height (`--strength`, default 0.3:
  the exact method's retrieval is then below 1);
- real signal: four "disease" channels on for every class-1 sample, four "healthy" ones
  relevant for class 0, and a lesion in the left or right lung (50/50) in class-1 heatmaps —
  two anatomical heatmap modes that are *not* the artifact;
- gamma noise on every channel, Gaussian noise on every heatmap pixel, 5 % prediction flips.

Each `reveal` (with `--no-references`: the planted store has no model) runs in its own process,
which reports its wall time and peak resident memory (`VmHWM`; see `peak_memory.py`). Retrieval: the best AUROC
among the top-3 concepts (score: the member CAV, `scores.cav`, what `annotate` labels from) and
among the top-3 clusters (score: membership) against the planted artifact. The `exact` rows rerun
reveal on a 5k store with the dense SpRAy forced at every size (the method at scale is judged
against it); the growth exponent is log(t(100k)/t(10k)) / log(10).

    .venv/bin/python benchmarks/reveal_scale.py [--sizes 1000 10000 100000] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LAYERS = {"layer1": 32, "layer2": 64, "layer3": 128}
WIDE_LAYERS = {"layer2": 512, "layer3": 1024, "layer4": 2048}  # a ResNet-50's last three stages
ARTIFACT_CHANNEL = 5
DISEASE_CHANNELS = [0, 1, 2, 3]
HEALTHY_CHANNELS = [6, 7, 8, 9]
CLASS_NAMES = ["healthy", "disease"]


def _basis_maps(size: int) -> dict[str, np.ndarray]:
    """``(S, S)`` maps: both lungs, a lesion in the left or the right lung, a corner stamp."""
    yy, xx = np.mgrid[0:size, 0:size] / size

    def blob(cy, cx, sy, sx):
        return np.exp(-0.5 * (((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2))

    return {"lungs": blob(0.5, 0.3, 0.2, 0.1) + blob(0.5, 0.7, 0.2, 0.1),
            "left": blob(0.45, 0.3, 0.06, 0.06), "right": blob(0.45, 0.7, 0.06, 0.06),
            "corner": blob(0.08, 0.1, 0.04, 0.07)}


def _planted_truth(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    label = (rng.random(n) < 0.5).astype(np.int64)
    source_a = rng.random(n) < np.where(label == 1, 0.6, 0.4)
    artifact = (label == 1) & (rng.random(n) < np.where(source_a, 0.6, 0.05))
    pred = np.where(rng.random(n) < 0.05, 1 - label, label)
    return {"label": label, "source_a": source_a, "artifact": artifact, "left": rng.random(n) < 0.5, "pred": pred}


def _block_layers(t: dict, rng: np.random.Generator, strength: float, layers: dict) -> dict[str, tuple]:
    """Per layer ``(max, mean, relevance)`` for one block of the planted truth ``t``."""
    out = {}
    m = len(t["label"])
    for layer, c in layers.items():
        acts = rng.gamma(2.0, 0.25, (m, c)).astype(np.float32)
        acts[:, DISEASE_CHANNELS] += 1.5 * t["label"][:, None]
        acts[:, ARTIFACT_CHANNEL] += 2.5 * strength * t["artifact"]
        weight = np.full((m, c), 0.05, np.float32)
        weight[np.ix_(t["pred"] == 1, DISEASE_CHANNELS)] = 0.5
        weight[np.ix_(t["pred"] == 1, [ARTIFACT_CHANNEL])] = 0.6
        weight[np.ix_(t["pred"] == 0, HEALTHY_CHANNELS)] = 0.5
        rel = acts * weight + 0.02 * rng.standard_normal((m, c)).astype(np.float32)
        out[layer] = (acts, 0.4 * acts, rel)
    return out


def _block_heatmaps(t: dict, basis: dict, rng: np.random.Generator, strength: float) -> np.ndarray:
    size = basis["lungs"].shape[0]
    m = len(t["label"])
    heat = 0.3 * basis["lungs"][None] * rng.uniform(0.5, 1.5, (m, 1, 1))
    lesion = np.where(t["left"][:, None, None], basis["left"][None], basis["right"][None])
    heat += (t["pred"] == 1)[:, None, None] * lesion * rng.uniform(0.8, 1.6, (m, 1, 1))
    heat += strength * t["artifact"][:, None, None] * basis["corner"][None] * rng.uniform(0.8, 1.6, (m, 1, 1))
    heat += 0.05 * rng.standard_normal((m, size, size))
    return (heat / size).astype(np.float16)


def build_planted_store(path: Path, n: int, seed: int = 0, heatmap_size: int = 64, block: int = 10000,
                        strength: float = 0.3, layers: dict | None = None) -> Path:
    """Write a planted scan file of ``n`` samples to ``path`` (module docstring), ``block`` rows
    at a time; ``/samples/artifact`` holds the truth. Paths, model and data do not exist."""
    from cxr_audit.store.h5 import create_scan_file

    rng = np.random.default_rng(seed)
    layers = layers or LAYERS
    truth = _planted_truth(n, rng)
    meta = {"arch": "planted", "checkpoint": str(path.with_suffix(".missing.pt")), "checkpoint_sha256": "",
            "data": str(path.with_suffix(".missing.csv")), "class_names": CLASS_NAMES,
            "preprocessing": {"size": heatmap_size, "channels": 1, "mean": 0.5, "std": 0.25, "resize": "squash"},
            "layers": list(layers), "method": "lrp", "targets": ["pred"], "heatmap_size": heatmap_size,
            "init": "planted", "split": "all", "options": {"seed": seed, "strength": strength}, "created": "planted"}
    basis = _basis_maps(heatmap_size)
    with create_scan_file(path, n, meta, layers, 2, ["pred"], heatmap_size, False, chunk_rows=256) as f:
        for start in range(0, n, block):
            rows = slice(start, min(n, start + block))
            t = {key: value[rows] for key, value in truth.items()}
            f["samples/index"][rows] = np.arange(rows.start, rows.stop)
            f["samples/path"][rows] = [f"planted/{i:06d}.png" for i in range(rows.start, rows.stop)]
            f["samples/label"][rows] = t["label"]
            f["samples/source"][rows] = np.where(t["source_a"], "A", "B").astype(object)
            f["samples/split"][rows] = np.full(len(t["label"]), "test", object)
            f["samples/artifact"][rows] = t["artifact"].astype(np.int8)
            f["samples/error"][rows] = np.full(len(t["label"]), "", object)
            logit = (2.0 * t["pred"] - 1) * 2 + 0.5 * rng.standard_normal(len(t["pred"]))
            f["outputs/logits"][rows] = np.stack([-logit, logit], 1).astype(np.float32)
            f["outputs/pred"][rows] = t["pred"]
            f["targets/pred"][rows] = t["pred"]
            f["heatmaps/pred"][rows] = _block_heatmaps(t, basis, rng, strength)
            for layer, (acts, mean, rel) in _block_layers(t, rng, strength, layers).items():
                f[f"activations/{layer}/max"][rows] = acts
                f[f"activations/{layer}/mean"][rows] = mean
                f[f"relevances/{layer}"][rows] = rel
            f["done"][rows] = True
    return path


def retrieval(result: dict, store: Path) -> tuple[float, float]:
    """Best AUROC of the top-3 concepts' member CAV and of the top-3 clusters' membership
    against the planted artifact."""
    import h5py
    from sklearn.metrics import roc_auc_score

    with h5py.File(store) as f:
        artifact = f["samples/artifact"][:] == 1
    ids = np.asarray(result["sample_ids"])
    truth = artifact[ids]
    concept = max(roc_auc_score(truth, c["scores"]["cav"]) for c in result["concepts"][:3] if "cav" in c["scores"])
    cluster = max(roc_auc_score(truth, np.isin(ids, c["members"])) for c in result["clusters"][:3])
    return float(concept), float(cluster)


def _child(store: str, out: str, exact: bool) -> None:
    """Run one reveal in this process and print its figures as JSON (the parent's row)."""
    import cxr_audit.reveal.spray as spray_module
    from cxr_audit.reveal.pipeline import reveal

    from peak_memory import peak_rss_mb  # benchmarks/ is the script's folder (tests load this file alone)

    if exact:  # the reference: the dense method at every size
        spray_module.EXACT_MAX = 10 ** 9
    start = time.perf_counter()
    result = reveal(store, out, references=False)
    seconds = time.perf_counter() - start
    concept, cluster = retrieval(result, Path(store))
    print(json.dumps({"seconds": seconds, "peak_mb": peak_rss_mb(),
                      "concept_auroc": concept, "cluster_auroc": cluster,
                      "json_mb": (Path(out) / "reveal.json").stat().st_size / 2 ** 20,
                      "clustering": sorted({c["clustering"] for c in result["clusters"]}),
                      "alarm": result["alarm"]["raised"]}))


def _run(store: Path, out: Path, exact: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", str(store), str(out)] + (["--exact"] if exact else [])
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mean_sd(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[1000, 10000, 100000])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--exact-n", type=int, default=5000, help="store size of the exact reference rows")
    parser.add_argument("--largest-seeds", type=int, default=1, help="seeds run at the largest size (it takes minutes)")
    parser.add_argument("--strength", type=float, default=0.3, help="planted artifact strength (module docstring)")
    parser.add_argument("--wide", action="store_true",
                        help="ResNet-50-wide layers (512/1024/2048 channels) instead of 32/64/128")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--exact", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child, args.exact)
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="reveal-scale-"))
    rows = []
    plan = [(n, s, False) for n in args.sizes for s in (args.seeds if n < max(args.sizes) else args.seeds[:args.largest_seeds])]
    plan += [(args.exact_n, s, True) for s in args.seeds]
    for n, seed, exact in plan:
        store = work / f"planted-{n}-{seed}-s{args.strength}{'-wide' if args.wide else ''}.h5"
        if not store.exists():
            build_planted_store(store, n, seed, strength=args.strength, layers=WIDE_LAYERS if args.wide else LAYERS)
        figures = _run(store, work / f"reveal-{store.stem}-{'exact' if exact else 'scaled'}", exact)
        rows.append({"n": n, "seed": seed, "method": "exact" if exact else "scaled", **figures})
        print("done:", rows[-1], flush=True)
    _print_table(rows)


def _print_table(rows: list[dict]) -> None:
    print("\nreveal --no-references on planted stores (2 cores); mean ± sd over seeds")
    header = f"{'N':>7} {'method':7} {'seeds':>5} {'seconds':>16} {'peak MB':>16} {'concept AUROC':>15} {'cluster AUROC':>15} {'JSON MB':>8} clustering"
    print(header)
    print("-" * len(header))
    groups = sorted({(r["n"], r["method"]) for r in rows}, key=lambda g: (g[1] != "scaled", g[0]))
    for n, method in groups:
        g = [r for r in rows if r["n"] == n and r["method"] == method]
        print(f"{n:7d} {method:7} {len(g):5d} {_mean_sd([r['seconds'] for r in g]):>16} "
              f"{_mean_sd([r['peak_mb'] for r in g]):>16} {_mean_sd([r['concept_auroc'] for r in g]):>15} "
              f"{_mean_sd([r['cluster_auroc'] for r in g]):>15} {np.mean([r['json_mb'] for r in g]):8.1f} "
              f"{'/'.join(sorted({m for r in g for m in r['clustering']}))}")
    scaled = {n: np.mean([r["seconds"] for r in rows if r["n"] == n and r["method"] == "scaled"])
              for n, m in groups if m == "scaled"}
    sizes = sorted(scaled)
    if len(sizes) >= 2:
        a, b = sizes[-2], sizes[-1]
        print(f"growth exponent {a} -> {b}: {np.log(scaled[b] / scaled[a]) / np.log(b / a):.2f}")


if __name__ == "__main__":
    main()
