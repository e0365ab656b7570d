"""Scan memory against the number of images: is the peak set by the batch, not by N?

Builds one phantom set of ``--unique`` images at ``--size`` px and hard-links it up to the largest
N (different paths, same pixels: the scan's cost per image does not depend on the content), then
scans the first N rows for each N in ``--n``, each in its own spawned process. Reports wall time,
steady-state images/s, the process's own peak RSS (VmHWM) and its RSS sampled at 25/50/100 % of
the rows, and the growth exponent of the peak from the smallest to the largest N (0 = flat).

    .venv/bin/python benchmarks/scan_memory.py [--arch resnet18] [--size 224] [--n 1000 20000]
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_memory import peak_rss_mb  # noqa: E402  (benchmarks/ is the script's folder)
from scan_throughput import _measure  # noqa: E402  (one spawned process per measurement)


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _scan_child(ckpt: str, manifest: str, batch: int, workers: int, threads: int, queue) -> None:
    import torch
    from cxr_audit.scan.pipeline import scan

    torch.set_num_threads(threads)
    out = Path(tempfile.mkdtemp()) / "scan.h5"
    marks: list[tuple[float, int, float]] = []
    start = time.perf_counter()
    scan(ckpt, manifest, out, batch_size=batch, num_workers=workers, device="cpu", overwrite=True,
         on_progress=lambda done, total: marks.append((time.perf_counter(), done, _rss_mb())))
    wall = time.perf_counter() - start
    (t0, n0, _), (t1, n1, _) = next(m for m in marks if m[1] > 0), marks[-1]
    total = marks[-1][1]
    sampled = [next(m[2] for m in marks if m[1] >= q * total) for q in (0.25, 0.5, 1.0)]
    peak = peak_rss_mb()
    queue.put((wall, (n1 - n0) / (t1 - t0), peak, sampled, out.stat().st_size / 2**20))
    out.unlink()


def _tiled_manifests(work: Path, unique: int, size: int, sizes: list[int]) -> dict[int, str]:
    """One manifest per N over hard links to ``unique`` phantoms (rows alternate the classes)."""
    from cxr_audit.data.phantom import generate_phantoms

    base = generate_phantoms(work / "unique", n=unique, size=size)
    with open(base, newline="") as handle:
        rows = list(csv.DictReader(handle))
    tiled = work / "tiled"
    tiled.mkdir()
    all_rows = []
    for i in range(max(sizes)):
        row = dict(rows[i % unique])
        link = tiled / f"img_{i:06d}.png"
        os.link(base.parent / row["path"], link)
        row.update(path=str(link), mask="", split="test")
        all_rows.append(row)
    manifests = {}
    for n in sizes:
        path = work / f"manifest_{n}.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(all_rows[0]))
            writer.writeheader()
            writer.writerows(all_rows[:n])
        manifests[n] = str(path)
    return manifests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 20000])
    parser.add_argument("--unique", type=int, default=256, help="distinct phantom images behind the links")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from cxr_audit.data.dataset import Preprocessing
    from cxr_audit.models.registry import build_model, save_checkpoint

    work = Path(tempfile.mkdtemp())
    sizes = sorted(set(args.n))
    manifests = _tiled_manifests(work, args.unique, args.size, sizes)
    ckpt = str(save_checkpoint(work / "model.pt", build_model(args.arch, 2, 1, args.size), args.arch,
                               ["disease", "healthy"], Preprocessing(size=args.size)))
    print(f"\nscan memory, {args.arch} {args.size}px, batch {args.batch_size}, {args.workers} workers, "
          f"{args.threads} threads, CPU")
    header = f"{'N':>7} {'wall s':>8} {'img/s':>7} {'peak MiB':>9} {'RSS @25/50/100 % MiB':>22} {'store MiB':>10}"
    print(header)
    print("-" * len(header))
    peaks = {}
    for n in sizes:
        wall, rate, peak, sampled, store = _measure(_scan_child, ckpt, manifests[n], args.batch_size, args.workers, args.threads)
        peaks[n] = peak
        rss = "/".join(f"{v:.0f}" for v in sampled)
        print(f"{n:7d} {wall:8.1f} {rate:7.1f} {peak:9.0f} {rss:>22} {store:10.0f}", flush=True)
    if len(sizes) > 1:
        lo, hi = sizes[0], sizes[-1]
        print(f"peak-memory growth exponent {lo} -> {hi}: "
              f"{math.log(peaks[hi] / peaks[lo]) / math.log(hi / lo):.3f} (0 = flat)")


if __name__ == "__main__":
    main()
