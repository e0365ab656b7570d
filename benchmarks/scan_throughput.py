"""Scan throughput: forward-only vs `cxr_audit.scan` vs a naive one-image-at-a-time LRP loop.

Each mode runs in its own subprocess so peak memory (max RSS on CPU, max allocated on CUDA) is
per mode. All are measured in the same run, on the same machine, so the ratios are fair, and
all at steady state: each mode's first batch (or image) is a warm-up outside the timing.
Forward-only and the scan both run channels_last (the faster layout for oneDNN and cuDNN); the
ratios compare fp32 with fp32. Where bf16 kernels exist (CUDA, AVX-512/AMX CPUs) a `scan --amp`
column is added, reported separately and never used in the ratios' fp32 columns.

    .venv/bin/python benchmarks/scan_throughput.py [--archs resnet50 vgg16] [--size 128] [--n 64]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

from peak_memory import peak_rss_mb  # benchmarks/ is the script's folder


def _peak_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


def _forward_only(ckpt: str, data: str, n: int, batch: int, device: str, threads: int, queue) -> None:
    import torch
    from cxr_audit.models.registry import load_checkpoint

    torch.set_num_threads(threads)
    model, config = load_checkpoint(ckpt)
    model = model.to(device).to(memory_format=torch.channels_last)
    size = config["preprocessing"]["size"]
    x = torch.randn(batch, 1, size, size, device=device).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        model(x)  # warm-up
        _sync(device)
        start = time.perf_counter()
        for _ in range(n // batch):
            model(x)
        _sync(device)
    queue.put(((n // batch) * batch / (time.perf_counter() - start), _peak_mb(device)))


def _our_scan(ckpt: str, data: str, n: int, batch: int, device: str, threads: int, amp: bool, queue) -> None:
    import torch
    from cxr_audit.scan.pipeline import scan

    torch.set_num_threads(threads)
    out = Path(tempfile.mkdtemp()) / "bench.h5"
    marks: list[tuple[float, int]] = []
    scan(ckpt, data, out, batch_size=batch, device=device, overwrite=True, amp=amp,
         on_progress=lambda done, total: (_sync(device), marks.append((time.perf_counter(), done))))
    # steady state, like the forward-only mode: from the end of the first batch (warm-up) to the end
    (t0, n0), (t1, n1) = next(m for m in marks if m[1] > 0), marks[-1]
    queue.put(((n1 - n0) / (t1 - t0), _peak_mb(device)))


def _naive_loop(ckpt: str, data: str, n: int, batch: int, device: str, threads: int, queue) -> None:
    """What a research script typically does: per image, zennit's stock EpsilonPlusFlat with
    canonizers through a fresh `Gradient` attributor (heatmap only, no activations/relevances)."""
    import torch
    from cxr_audit.data.dataset import CxrDataset
    from cxr_audit.data.manifest import load_manifest
    from cxr_audit.explain import create_method
    from cxr_audit.models.registry import load_checkpoint, preprocessing_of
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlusFlat

    torch.set_num_threads(threads)
    model, config = load_checkpoint(ckpt)
    model = model.to(device)
    prep = preprocessing_of(config)
    dataset = CxrDataset(load_manifest(data, config["class_names"]), prep, with_masks=False)
    canonizers = create_method("lrp-zennit", model, config["arch"], prep)._canonizers()
    composite = EpsilonPlusFlat(canonizers=canonizers)
    count = min(n, 17)
    for i in range(count):
        if i == 1:  # the first image is the warm-up, as in the other modes
            _sync(device)
            start = time.perf_counter()
        x = dataset[i]["image"][None].to(device)
        with Gradient(model, composite) as attributor:
            out, relevance = attributor(x, lambda y: torch.eye(y.shape[1], device=y.device)[y.argmax(1)] * y)
    _sync(device)
    queue.put(((count - 1) / (time.perf_counter() - start), _peak_mb(device)))


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _measure(fn, *args) -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=fn, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["resnet50", "vgg16"])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--n", type=int, default=64, help="images per mode (naive loop uses at most 17, the first as warm-up)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from cxr_audit.data.dataset import Preprocessing
    from cxr_audit.data.phantom import generate_phantoms
    from cxr_audit.models.registry import build_model, save_checkpoint
    from cxr_audit.runtime import cpu_has_fast_bf16

    with_bf16 = args.device.startswith("cuda") or cpu_has_fast_bf16()
    work = Path(tempfile.mkdtemp())
    data = str(generate_phantoms(work / "data", n=args.n, size=args.size))
    rows = []
    for arch in args.archs:
        ckpt = str(save_checkpoint(work / f"{arch}.pt", build_model(arch, 2, 1, args.size), arch,
                                   ["disease", "healthy"], Preprocessing(size=args.size)))
        common = (ckpt, data, args.n, args.batch_size, args.device, args.threads)
        fwd = _measure(_forward_only, *common)
        ours = _measure(_our_scan, *common, False)
        bf16 = _measure(_our_scan, *common, True) if with_bf16 else None
        naive = _measure(_naive_loop, *common)
        rows.append((arch, fwd, ours, naive, bf16))

    print(f"\nscan throughput, {args.size}px, batch {args.batch_size}, device {args.device}, "
          f"{args.threads} threads (images/s; peak MiB)")
    header = f"{'arch':10} {'forward':>9} {'scan':>9} {'naive':>9} {'scan cost vs fwd':>17} " \
             f"{'scan speed-up vs naive':>23} {'peak fwd/scan/naive MiB':>24}" + \
             (f" {'scan --amp (bf16)':>18} {'bf16 vs naive':>14}" if with_bf16 else "")
    print(header)
    print("-" * len(header))
    for arch, fwd, ours, naive, bf16 in rows:
        extra = f" {bf16[0]:18.2f} {bf16[0] / naive[0]:13.2f}x" if bf16 else ""
        print(f"{arch:10} {fwd[0]:9.2f} {ours[0]:9.2f} {naive[0]:9.2f} {fwd[0] / ours[0]:16.2f}x "
              f"{ours[0] / naive[0]:22.2f}x {fwd[1]:8.0f}/{ours[1]:.0f}/{naive[1]:.0f}{extra}")


if __name__ == "__main__":
    main()
