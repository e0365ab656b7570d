from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from cxr_audit.data.dataset import Preprocessing
from cxr_audit.errors import BadInputError, UsageError
from cxr_audit.evaluate.relevance import scan_artifact_share
from cxr_audit.models.registry import build_model, save_checkpoint
from cxr_audit.scan.pipeline import scan
from cxr_audit.store import open_scan, read_meta, validate

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "covid-two-source"


@pytest.fixture(scope="module")
def full_scan(shortcut_model, poisoned, tmp_path_factory):
    out = tmp_path_factory.mktemp("scan") / "full.h5"
    return scan(shortcut_model, poisoned, out, batch_size=16, targets=("pred", "true"), device="cpu").path


def test_scan_file_follows_the_schema(full_scan, poisoned):
    with h5py.File(full_scan) as f:
        validate(f)
        meta = read_meta(f)
        n = f["samples/index"].shape[0]
        assert n == 240 and f["done"][:].all()
        assert meta["arch"] == "resnet18" and meta["layers"] == ["layer2", "layer3", "layer4"]
        assert len(meta["checkpoint_sha256"]) == 64 and "torch" in meta["versions"]
        assert f["heatmaps/pred"].shape == (n, 64, 64) and f["heatmaps/pred"].dtype == np.float16
        assert f["relevances/layer3"].shape == (n, 256) and f["activations/layer4/max"].shape == (n, 512)
        # stored predictions agree with the logits, and "true" explains the label
        assert (f["outputs/pred"][:] == f["outputs/logits"][:].argmax(1)).all()
        assert (f["targets/true"][:] == f["samples/label"][:]).all()
        # stored heatmaps keep the conservation of the input relevance (sum-pooled, not averaged)
        logit = f["outputs/logits"][:][np.arange(n), f["targets/pred"][:]]
        heat_sum = f["heatmaps/pred"][:].astype(np.float64).sum((1, 2))
        assert np.corrcoef(logit, heat_sum)[0, 1] > 0.9
        assert set(np.unique(f["samples/artifact"][:])) == {0, 1}


def test_heatmaps_of_a_shortcut_model_concentrate_on_the_artifact(full_scan):
    share = scan_artifact_share(full_scan)
    assert share["n"] >= 30
    # positive relevance inside the stamp is far above the stamp's share of the image
    assert share["share"] > 3 * share["mask_area"], share


def test_resume_equals_uninterrupted(shortcut_model, poisoned, full_scan, tmp_path):
    out = tmp_path / "resumed.h5"
    calls = []

    def kill_after_two_batches(done, total, status=""):
        calls.append(done)
        if len(calls) == 3:  # first call reports 0, then one per batch
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        scan(shortcut_model, poisoned, out, batch_size=16, targets=("pred", "true"), device="cpu",
             on_progress=kill_after_two_batches)
    with h5py.File(out) as f:
        assert f["done"][:].sum() == 32
    summary = scan(shortcut_model, poisoned, out, batch_size=16, targets=("pred", "true"), device="cpu")
    assert summary.resumed_from == 32 and summary.done == 240
    with h5py.File(out) as a, h5py.File(full_scan) as b:
        for name in ("outputs/logits", "heatmaps/pred", "heatmaps/true", "relevances/layer2",
                     "activations/layer4/mean", "done"):
            np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)


def test_existing_file_with_other_options_is_not_overwritten(shortcut_model, poisoned, full_scan, tmp_path):
    out = tmp_path / "copy.h5"
    out.write_bytes(full_scan.read_bytes())
    with pytest.raises(UsageError, match="other options"):
        scan(shortcut_model, poisoned, out, heatmap_size=32, device="cpu")
    with h5py.File(out) as f:
        assert f["done"][:].all()  # untouched
    # a scan with identical options and all rows done does no work
    summary = scan(shortcut_model, poisoned, out, batch_size=16, targets=("pred", "true"), device="cpu")
    assert summary.resumed_from == 240


def test_split_layers_and_method_options(shortcut_model, poisoned, tmp_path):
    s = scan(shortcut_model, poisoned, tmp_path / "t.h5", split="test", layers=["layer1"], method="gradcam",
             heatmap_size=16, device="cpu")
    with h5py.File(s.path) as f:
        idx = f["samples/index"][:]
        assert len(idx) == s.n < 240 and np.all(np.diff(idx) > 0)
        assert f["heatmaps/pred"].shape[1:] == (16, 16) and "relevances/layer1" in f
    with pytest.raises(UsageError, match="no layer 'layer9'"):
        scan(shortcut_model, poisoned, tmp_path / "u.h5", layers=["layer9"], device="cpu")


def test_relative_data_path_still_resolves_from_another_directory(shortcut_model, poisoned, tmp_path,
                                                                   monkeypatch):
    """Reports and masks read images through the scan's stored paths, from wherever they run."""
    from cxr_audit.report.figures import heatmap_grid

    monkeypatch.chdir(poisoned.parent.parent)
    relative = Path(poisoned.parent.name) / poisoned.name
    s = scan(shortcut_model, relative, tmp_path / "rel.h5", split="test", layers=["layer1"], device="cpu")
    monkeypatch.chdir(tmp_path)
    with h5py.File(s.path) as f:
        assert all(Path(p).is_absolute() for p in f["samples/path"].asstr()[:])
    assert heatmap_grid(s.path, [0, 1], tmp_path / "grid.png").is_file()


def test_skip_bad_records_the_error(shortcut_model, poisoned, tmp_path):
    lines = poisoned.read_text().splitlines()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    header, first = lines[0], lines[1].split(",")
    first[0] = str(broken)
    (tmp_path / "m.csv").write_text("\n".join([header, ",".join(first)] + [
        ",".join([str((poisoned.parent / l.split(",")[0]).resolve())] + l.split(",")[1:]) for l in lines[2:6]]))
    with pytest.raises(BadInputError, match="broken.png"):
        scan(shortcut_model, tmp_path / "m.csv", tmp_path / "strict.h5", device="cpu")
    summary = scan(shortcut_model, tmp_path / "m.csv", tmp_path / "lenient.h5", device="cpu", skip_bad=True,
                   overwrite=True)
    assert [i for i, _ in summary.skipped] == [0] and summary.done == 5
    with h5py.File(summary.path) as f:
        assert "broken.png" in f["samples/error"][0].decode() and np.isnan(f["outputs/logits"][0]).all()
        assert f["samples/error"][1].decode() == ""


def test_nan_model_is_a_clear_error(poisoned, tmp_path):
    model = build_model("resnet18", 2, 1, 64)
    with torch.no_grad():
        model.fc.weight.fill_(float("nan"))
    ckpt = save_checkpoint(tmp_path / "nan.pt", model, "resnet18", ["disease", "healthy"], Preprocessing(size=64))
    with pytest.raises(BadInputError, match="non-finite relevance"):
        scan(ckpt, poisoned, tmp_path / "nan.h5", device="cpu")


def test_open_scan_rejects_foreign_files(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("x", data=[1])
    with pytest.raises(BadInputError, match="not a cxr-audit scan"):
        open_scan(tmp_path / "other.h5")
    (tmp_path / "junk.h5").write_bytes(b"junk")
    with pytest.raises(BadInputError, match="corrupt or not HDF5"):
        open_scan(tmp_path / "junk.h5")


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data/covid-two-source not present")
def test_scan_reads_real_two_hospital_images(tmp_path):
    import csv

    rows = list(csv.DictReader(open(SHARED_DATA / "manifest.csv")))
    pick = [r for r in rows if r["source"] == "hannover"][:4] + [r for r in rows if r["source"] == "nih"][:4]
    with open(tmp_path / "m.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in pick:
            writer.writerow({**r, "path": str(SHARED_DATA / r["path"])})
    ckpt = save_checkpoint(tmp_path / "m.pt", build_model("resnet18", 2, 1, 64), "resnet18", ["covid", "normal"],
                           Preprocessing(size=64))
    summary = scan(ckpt, tmp_path / "m.csv", tmp_path / "real.h5", device="cpu")
    assert summary.done == 8
    with h5py.File(summary.path) as f:
        assert set(f["samples/source"].asstr()[:]) == {"hannover", "nih"}
        assert np.isfinite(f["heatmaps/pred"][:].astype(np.float32)).all()


def test_bf16_scan_on_cpu_agrees_with_fp32(shortcut_model, poisoned, full_scan, tmp_path, monkeypatch):
    """``--amp`` on a CPU with bf16 kernels: the same predictions and nearly the same heatmaps;
    on a CPU without them, a clear refusal before any file is written."""
    import cxr_audit.runtime as runtime

    if runtime.cpu_has_fast_bf16():
        out = scan(shortcut_model, poisoned, tmp_path / "bf16.h5", device="cpu", amp=True).path
        with h5py.File(out) as f, h5py.File(full_scan) as ref:
            assert read_meta(f)["options"]["amp"] is True
            same = f["outputs/pred"][:] == ref["outputs/pred"][:]
            a = f["heatmaps/pred"][:].astype(np.float64).reshape(len(same), -1)[same]
            b = ref["heatmaps/pred"][:].astype(np.float64).reshape(len(same), -1)[same]
        assert same.mean() > 0.97  # a near-tie may flip, and then the heatmap explains the other class
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
        assert np.median(cos) > 0.95 and cos.min() > 0.5, (np.median(cos), cos.min())
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: False)
    with pytest.raises(UsageError, match="bf16"):
        scan(shortcut_model, poisoned, tmp_path / "refused.h5", device="cpu", amp=True)
    assert not (tmp_path / "refused.h5").exists()
