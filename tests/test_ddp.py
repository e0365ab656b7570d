"""DDP on CPU with gloo: two processes train exactly what one process trains (same global
batches, averaged gradients), for plain fine-tuning and a double-backprop mitigation."""

import socket

import pytest
import torch
import torch.multiprocessing as mp

from cxr_audit.data.dataset import Preprocessing
from cxr_audit.data.manifest import load_manifest
from cxr_audit.models.registry import build_model
from cxr_audit.unlearn import Context, get_mitigation
from cxr_audit.unlearn.engine import fit

PREP = Preprocessing(size=32)


def _train(data, method: str) -> dict:
    torch.manual_seed(0)
    model = build_model("vgg11", 2, 1, 32)  # no BatchNorm: per-process batch statistics would differ
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
    return build_model("vgg11", 2, 1, 32).state_dict()


def test_same_seed_same_weights(small):
    a, b = _train(small, "rrr"), _train(small, "rrr")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_torchrun_unlearn_on_cpu(small, tmp_path):
    """The CLI under torchrun joins a gloo group by itself and rank 0 writes the checkpoint."""
    import subprocess
    import sys

    from cxr_audit.training import train

    base = train(small, tmp_path / "m.pt", "vgg11", size=32, epochs=1, device="cpu").checkpoint
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "cxr_audit.cli.main", "unlearn", "--model", str(base), "--data", str(small), "--out",
           str(tmp_path / "u.pt"), "--method", "rrr", "--lambda", "10", "--epochs", "1", "--device", "cpu", "--keep-worse"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert torch.load(tmp_path / "u.pt", weights_only=True)["extra"]["unlearn"]["method"] == "rrr"
