"""CUDA paths (run with `-m gpu` on a machine with a GPU)."""

import h5py
import numpy as np
import pytest
import torch
from cxr_audit.scan.pipeline import scan
from cxr_audit.training.pipeline import train

pytestmark = pytest.mark.gpu

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (selected with -m gpu)")


@requires_cuda
def test_cuda_scan_matches_cpu_scan(shortcut_model, poisoned, tmp_path):
    cpu = scan(shortcut_model, poisoned, tmp_path / "cpu.h5", device="cpu").path
    gpu = scan(shortcut_model, poisoned, tmp_path / "gpu.h5", device="cuda").path
    with h5py.File(cpu) as a, h5py.File(gpu) as b:
        np.testing.assert_allclose(a["outputs/logits"][:], b["outputs/logits"][:], atol=2e-2, rtol=2e-2)
        ha, hb = a["heatmaps/pred"][:].astype(np.float32), b["heatmaps/pred"][:].astype(np.float32)
        corr = [np.corrcoef(x.ravel(), y.ravel())[0, 1] for x, y in zip(ha, hb)]
        assert np.median(corr) > 0.95


@requires_cuda
def test_cuda_amp_training_and_amp_scan(poisoned, tmp_path):
    summary = train(poisoned, tmp_path / "m.pt", "resnet18", size=64, epochs=2, device="cuda", amp=True)
    assert np.isfinite(summary.final["train_loss"])
    s = scan(summary.checkpoint, poisoned, tmp_path / "amp.h5", device="cuda", amp=True)
    with h5py.File(s.path) as f:
        assert f["done"][:].all() and np.isfinite(f["heatmaps/pred"][:].astype(np.float32)).all()


@requires_cuda
@pytest.mark.parametrize("method", ["rrr", "rrclarc", "isnet", "exbl", "aclarc", "pclarc", "rpclarc", "augment", "dfr",
                                    "jtt"])
def test_cuda_amp_unlearn_every_method(shortcut_model, poisoned, tmp_path, method):
    """bf16 autocast with double backprop on CUDA: finite losses, a loadable checkpoint."""
    from cxr_audit.annotate.pipeline import annotate
    from cxr_audit.evaluate.pipeline import evaluate
    from cxr_audit.unlearn.pipeline import unlearn

    s = scan(shortcut_model, poisoned, tmp_path / "s.h5", split="train", device="cuda").path
    annotate(s, tmp_path / "a.h5", from_column="artifact", masks=False, device="cuda")
    r = unlearn(shortcut_model, poisoned, tmp_path / "u.pt", method, annotations=tmp_path / "a.h5", lambda_=10.0,
                epochs=1, device="cuda", amp=True, keep_worse=True)
    assert all(np.isfinite(h["train_loss"]) for h in r.history)
    m = evaluate(r.checkpoint, poisoned, artifact="text", artifact_class_name="disease", device="cuda").metrics["model"]
    assert 0 <= m["artifact_relevance_share"] <= 1
