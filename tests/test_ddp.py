"""DDP on CPU with gloo: two processes train exactly what one process trains (same global
batches, averaged gradients), for plain fine-tuning and a double-backprop mitigation."""

import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from cxr_audit.data.dataset import Preprocessing
from cxr_audit.data.manifest import load_manifest
from cxr_audit.models.registry import build_model
from cxr_audit.training.engine import fit
from cxr_audit.unlearn import Context, get_mitigation

PREP = Preprocessing(size=32)


def _train(data, method: str) -> dict:
    torch.manual_seed(0)
    # no BatchNorm (per-process batch statistics would differ; LayerNorm is per sample), and small: the
    # gloo all-reduce of vgg11's 130 M parameters made these two tests take 200 s of the suite
    model = build_model("vit_tiny", 2, 1, 32)
    for m in model.modules():  # nor dropout: each process draws its own masks
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    manifest = load_manifest(data).subset("train")
    fit(model, manifest, PREP, torch.device("cpu"), mitigation=get_mitigation(method),
        context=Context(num_classes=2, has_artifact_masks=True), lambda_=10.0, epochs=1, batch_size=8, lr=1e-3,
        seed=0)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _worker(rank, world, port, data, method, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        state = _train(data, method)
        if rank == 0:
            torch.save(state, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from cxr_audit.data.inject import inject
    from cxr_audit.data.phantom import generate_phantoms

    ph = generate_phantoms(tmp_path_factory.mktemp("ph"), n=40, size=32, seed=3)
    return inject(ph, tmp_path_factory.mktemp("inj"), "marker", {"disease": 0.8}, splits=["train"], seed=3)


@pytest.mark.parametrize("method", ["none", "rrr"])
def test_two_gloo_processes_match_one(small, method, tmp_path):
    single = _train(small, method)
    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(2, _free_port(), small, method, out), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    init = _init_state()
    moved = sum((single[k] - init[k]).pow(2).sum() for k in single).sqrt()
    apart = sum((single[k] - ddp[k]).pow(2).sum() for k in single).sqrt()
    # Adam turns float-reduction-order noise in near-zero gradients into small steps, so compare
    # the distance between the two runs with how far training moved the weights
    assert moved > 0
    assert apart / moved < 0.02, f"DDP and single-process runs differ by {apart / moved:.1%} of the update"


def _init_state() -> dict:
    torch.manual_seed(0)
    return build_model("vit_tiny", 2, 1, 32).state_dict()


def test_same_seed_same_weights(small):
    a, b = _train(small, "rrr"), _train(small, "rrr")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_torchrun_unlearn_on_cpu(small, tmp_path):
    """The CLI under torchrun joins a gloo group by itself and rank 0 writes the checkpoint."""
    import subprocess
    import sys

    from cxr_audit.training.pipeline import train

    base = train(small, tmp_path / "m.pt", "vgg11", size=32, epochs=1, device="cpu").checkpoint
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "cxr_audit.cli.main", "unlearn", "--model", str(base), "--data", str(small), "--out",
           str(tmp_path / "u.pt"), "--method", "rrr", "--lambda", "10", "--epochs", "1", "--device", "cpu", "--keep-worse"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert torch.load(tmp_path / "u.pt", weights_only=True)["extra"]["unlearn"]["method"] == "rrr"


def _scan_worker(rank, world, port, model, data, out, skip_bad):
    import torch.distributed as dist
    from cxr_audit.scan.pipeline import scan

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        scan(model, data, out, batch_size=3, device="cpu", skip_bad=skip_bad, targets=("pred", "true"))
    finally:
        dist.destroy_process_group()


def _scan_datasets(path) -> dict:
    import h5py

    out = {}
    with h5py.File(path) as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[:]) if isinstance(obj, h5py.Dataset) else None)
    return out


def test_two_gloo_processes_scan_into_one_store_equal_to_one_process(small, tmp_path):
    """Rows sharded across two ranks, gathered and written by rank 0: the same store as a
    single-process scan, also for a sample that cannot be read (--skip-bad)."""
    import csv

    from cxr_audit.scan.pipeline import scan
    from cxr_audit.training.pipeline import train

    model = train(small, tmp_path / "m.pt", "resnet18", size=32, epochs=1, device="cpu").checkpoint
    with open(small, newline="") as f:
        rows = list(csv.DictReader(f))
    rows[4]["path"] = "missing.png"  # one unreadable sample
    data = small.parent / "with-a-missing-image.csv"  # beside the manifest: its relative paths still hold
    with open(data, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    single = scan(model, data, tmp_path / "one.h5", batch_size=5, device="cpu", skip_bad=True,
                  targets=("pred", "true"))
    mp.spawn(_scan_worker, args=(2, _free_port(), model, data, tmp_path / "two.h5", True), nprocs=2, join=True)
    one, two = _scan_datasets(single.path), _scan_datasets(tmp_path / "two.h5")
    assert one.keys() == two.keys() and two["done"].all()
    assert (two["samples/error"] != b"").sum() == 1
    for name, values in one.items():
        if values.dtype.kind in "fc":
            assert np.allclose(values.astype(np.float64), two[name].astype(np.float64), rtol=1e-3, atol=1e-5,
                               equal_nan=True), name
        else:
            assert np.array_equal(values, two[name]), name
