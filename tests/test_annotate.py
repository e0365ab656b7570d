import h5py
import numpy as np
import pytest
import torch
from cxr_audit.annotate.masks import binarise
from cxr_audit.annotate.pipeline import MaskOptions, annotate
from cxr_audit.cli.main import app
from cxr_audit.errors import UsageError
from cxr_audit.numerics.cav import SignalCAV, make_cav
from cxr_audit.numerics.threshold import otsu_threshold
from cxr_audit.scan.pipeline import scan
from cxr_audit.store.h5 import StoredRows
from typer.testing import CliRunner


def test_signal_cav_recovers_the_concept_direction_despite_correlated_noise():
    rng = np.random.default_rng(0)
    n, c = 400, 20
    y = rng.integers(0, 2, n)
    concept = np.zeros(c)
    concept[3] = 1.0
    distractor = rng.normal(size=(n, 1)) * np.r_[0, 0, 0, 1.0, 1.0, np.zeros(c - 5)]  # shared noise on ch 3, 4
    X = 2.0 * y[:, None] * concept + distractor + 0.1 * rng.normal(size=(n, c))
    for name in ("signal", "svm", "ridge", "logistic"):
        cav = make_cav(name).fit(X, y)
        assert np.linalg.norm(cav.direction_) == pytest.approx(1.0, abs=1e-5)
        scores = cav.score(X)
        assert scores[y == 1].mean() > scores[y == 0].mean()
    # the signal CAV points at the concept's channel, not at the noise-cancelling contrast 3 - 4
    signal = SignalCAV().fit(X, y).direction_
    assert abs(signal[3]) > 0.9 and abs(signal[4]) < 0.2


@pytest.mark.parametrize("name", ["signal", "svm", "ridge", "logistic"])
def test_within_class_cav_ignores_the_class_evidence_a_shortcut_correlates_with(name):
    """The artifact (channel 1) is in 85 % of class 1 and never in class 0; the class's own
    evidence (channel 0) is strong. Across classes the CAV leans on channel 0, within class not."""
    rng = np.random.default_rng(1)
    n = 600
    cls = rng.integers(0, 2, n)
    art = (cls == 1) & (rng.random(n) < 0.85)
    X = np.c_[4.0 * cls, 1.0 * art, rng.normal(size=(n, 6))] + 0.3 * rng.normal(size=(n, 8))
    across = make_cav(name).fit(X, art).direction_
    within = make_cav(name).fit(X, art, groups=cls).direction_
    assert abs(within[1]) > 0.9 and abs(within[0]) < 0.1, within
    if name == "signal":  # the pattern CAV is where the confound shows most
        assert abs(across[0]) > 0.5, across
    multi_hot = np.c_[cls, 1 - cls]  # (N, K) keys group by row
    assert np.allclose(make_cav(name).fit(X, art, groups=multi_hot).direction_, within, atol=1e-5)
    with pytest.raises(UsageError, match="nothing to contrast"):
        make_cav(name).fit(X, cls, groups=cls)


def _naive_signal_direction(X, y, groups=None):
    """The signal CAV written out in memory: (group-centred) X against (group-centred) y."""
    X, y = np.asarray(X, float), np.asarray(y, float)
    if groups is not None:
        for g in np.unique(groups):
            X[groups == g] -= X[groups == g].mean(0)
            y[groups == g] -= y[groups == g].mean()
    else:
        y = y - y.mean()
    w = (X - X.mean(0)).T @ y
    return w / np.linalg.norm(w)


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_streamed_signal_cav_equals_the_in_memory_formula_for_any_block(chunk):
    rng = np.random.default_rng(3)
    X = rng.gamma(2.0, size=(300, 9))
    y, groups = rng.integers(0, 2, 300), rng.integers(0, 3, 300)
    rows = np.sort(rng.choice(300, 200, replace=False))
    for g in (None, groups):
        fitted = SignalCAV().fit_rows(StoredRows(X, chunk=chunk), rows, y[rows], None if g is None else g[rows])
        expected = _naive_signal_direction(X[rows], y[rows], None if g is None else g[rows])
        np.testing.assert_allclose(fitted.direction_, expected, atol=1e-6)
        np.testing.assert_allclose(fitted.score_rows(StoredRows(X, chunk=chunk)), X @ fitted.direction_, rtol=1e-5, atol=1e-5)


def test_estimator_cavs_fit_a_stratified_sample_past_fit_max(monkeypatch):
    import cxr_audit.numerics.cav as cav_module

    rng = np.random.default_rng(4)
    n = 2000
    cls = rng.integers(0, 2, n)
    art = (cls == 1) & (rng.random(n) < 0.1)  # a rare stratum: artifact samples of class 1
    X = np.c_[3.0 * cls, 2.0 * art, rng.normal(size=(n, 4))]
    full = make_cav("ridge").fit_rows(StoredRows(X, chunk=64), np.arange(n), art, cls)
    assert full.n_fit_ == n
    monkeypatch.setattr(cav_module, "FIT_MAX", 200)
    sampled = make_cav("ridge").fit_rows(StoredRows(X, chunk=64), np.arange(n), art, cls)
    assert 150 <= sampled.n_fit_ <= 210
    assert abs(sampled.direction_[1]) > 0.9  # the rare stratum was kept: still the artifact channel
    assert SignalCAV().fit_rows(StoredRows(X, chunk=64), np.arange(n), art, cls).n_fit_ == n  # signal streams all


def test_cav_needs_both_classes_and_known_method():
    with pytest.raises(UsageError):
        SignalCAV().fit(np.ones((4, 3)), np.ones(4))
    with pytest.raises(UsageError, match="unknown CAV"):
        make_cav("pca")


def test_otsu_separates_two_modes_and_binarise_finds_a_blob():
    rng = np.random.default_rng(0)
    values = np.r_[rng.normal(0, 1, 500), rng.normal(10, 1, 100)]
    assert 2 < otsu_threshold(values) < 8
    heat = np.zeros((64, 64))
    heat[10:20, 40:50] = 1.0
    heat += 0.01 * rng.random((64, 64))
    truth = np.zeros((64, 64), bool)
    truth[10:20, 40:50] = True
    for threshold in ("peak", "otsu"):
        mask = binarise(heat, blur_sigma=1.0, threshold=threshold)
        assert (mask & truth).sum() / (mask | truth).sum() > 0.6
    with pytest.raises(UsageError):
        binarise(heat, 1.0, threshold="magic")
    # a lower peak fraction keeps the fainter of two blobs too
    heat[40:50, 10:20] = 0.4
    assert binarise(heat, 1.0, "peak")[45, 15] == 0 and binarise(heat, 1.0, "peak:0.3")[45, 15] == 1
    for bad in ("peak:x", "peak:1.5", "otsu:0.3"):
        with pytest.raises(UsageError):
            binarise(heat, 1.0, threshold=bad)


@pytest.fixture(scope="module")
def scanned(shortcut_model, poisoned, tmp_path_factory):
    return scan(shortcut_model, poisoned, tmp_path_factory.mktemp("ann") / "scan.h5", device="cpu").path


def _seeds(scan_path, k=5):
    with h5py.File(scan_path) as f:
        art, idx = f["samples/artifact"][:], f["samples/index"][:]
    return idx[art == 1][:k].tolist()


def test_five_seeds_retrieve_artifacts_and_masks_overlap_truth(scanned, tmp_path):
    seeds = _seeds(scanned)
    result = annotate(scanned, tmp_path / "ann.h5", seeds=seeds, masks_dir=tmp_path / "masks", device="cpu")
    q = result.quality
    assert q["retrieval_held_out"]["auroc"] >= 0.95, q
    # the default peak:0.7 masks hug the glyphs, so against the glyphs' bounding box they score
    # below the 0.5 of half-peak masks (0.46 here; docs/annotate.md "Mask threshold")
    assert q["mask_iou"] >= 0.4 and q["pointing_game"] >= 0.8, q
    with h5py.File(result.path) as f:
        fit_rows = set(f["fit_rows"][:].tolist())
        seed_rows = {int(np.flatnonzero(f["samples/index"][:] == s)[0]) for s in seeds}
        assert seed_rows <= fit_rows and f["labels"][:][sorted(seed_rows)].all()
        n = f["samples/index"].shape[0]
        # retrieval is measured only on rows never used to fit the CAV
        assert q["retrieval_held_out"]["n"] == n - len(fit_rows)
        assert f["masks"].shape[0] == f["labels"][:].sum() and f["masks"].shape[1:] == (64, 64)
    assert (tmp_path / "masks" / "contact_sheet.png").stat().st_size > 1000
    from cxr_audit.data.manifest import load_manifest
    annotated = load_manifest(tmp_path / "masks" / "annotated.csv")
    flagged = [s for s in annotated.samples if s.artifact == 1]
    assert len(flagged) == result.n_labelled and all(s.artifact_mask.is_file() for s in flagged)


def test_from_column_and_concept_sources(scanned, tmp_path):
    col = annotate(scanned, tmp_path / "c.h5", from_column="artifact", masks=False)
    assert col.n_labelled > 0
    with h5py.File(scanned) as f:
        rel = f["relevances/layer3"][:]
        art = f["samples/artifact"][:]
    # the channel whose relevance best separates artifact samples is a concept for the stamp
    gap = rel[art == 1].mean(0) - rel[art == 0].mean(0)
    concept = annotate(scanned, tmp_path / "k.h5", concept=f"layer3:{int(np.argmax(gap))}", masks=False)
    assert concept.quality["retrieval_held_out"]["auroc"] > 0.9


def test_masks_are_completed_by_default_and_none_turns_it_off(scanned, tmp_path):
    from cxr_audit.store.h5 import read_meta

    options = dict(from_column="artifact", device="cpu")
    default = annotate(scanned, tmp_path / "default.h5", masking=MaskOptions(max_masks=8), **options)
    plain = annotate(scanned, tmp_path / "plain.h5", masking=MaskOptions(complete="none", max_masks=8), **options)
    with h5py.File(default.path) as a, h5py.File(plain.path) as b:
        assert read_meta(a)["options"]["mask_complete"] == "saturated"
        assert read_meta(b)["options"]["mask_complete"] == "none"
        completed, painted = a["masks"][:].astype(bool), b["masks"][:].astype(bool)
    assert (completed | painted == completed).all()  # completion only adds
    with pytest.raises(UsageError, match="completion"):
        annotate(scanned, tmp_path / "bad.h5", masking=MaskOptions(complete="everything"), **options)


def test_annotations_do_not_depend_on_the_read_block_size(scanned, tmp_path, monkeypatch):
    """Activations are read a block of rows at a time; 5-row blocks give the same file."""
    import cxr_audit.store.h5 as h5_module

    options = dict(from_column="artifact", refine=1, device="cpu", masking=MaskOptions(max_masks=8))
    whole = annotate(scanned, tmp_path / "whole.h5", **options)
    monkeypatch.setattr(h5_module, "READ_CHUNK", 5)
    blocked = annotate(scanned, tmp_path / "blocked.h5", **options)
    with h5py.File(whole.path) as a, h5py.File(blocked.path) as b:
        np.testing.assert_allclose(a["scores"][:], b["scores"][:], rtol=1e-5, atol=1e-6)
        assert np.array_equal(a["labels"][:], b["labels"][:]) and a["labels"][:].sum() > 0
        assert np.array_equal(a["masks"][:], b["masks"][:])
        np.testing.assert_allclose(a[f"cav/{whole.layer}"][:], b[f"cav/{whole.layer}"][:], atol=1e-6)


def test_cli_annotate_and_its_errors(scanned, tmp_path):
    runner = CliRunner()
    seeds = ",".join(map(str, _seeds(scanned)))
    r = runner.invoke(app, ["annotate", str(scanned), "--out", str(tmp_path / "a.h5"), "--seeds", seeds, "--no-masks"])
    assert r.exit_code == 0, r.output
    assert "retrieval_held_out auroc" in r.output
    r = runner.invoke(app, ["annotate", str(scanned), "--out", str(tmp_path / "b.h5")])
    assert r.exit_code == 2 and "exactly one of" in r.output
    r = runner.invoke(app, ["annotate", str(scanned), "--out", str(tmp_path / "b.h5"), "--seeds", "99999,1"])
    assert r.exit_code == 2 and "not in the scan" in r.output
    r = runner.invoke(app, ["annotate", str(scanned), "--out", str(tmp_path / "b.h5"), "--seeds", seeds,
                            "--model", str(tmp_path / "gone.pt")])
    assert r.exit_code == 1 and "gone.pt is missing" in r.output


# the mask recipe for bright artifacts documented in docs/annotate.md (benchmarks/annotate_quality.py)
BRIGHT_ARTIFACT_MASKS = {"resnet18": {"mask_rule": "intensity", "mask_threshold": "peak:0.3", "blur": 1.0,
                                      "mask_complete": "saturated"},
                         "vgg11": {"mask_rule": "intensity", "mask_complete": "saturated"}}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "vgg11"])
@pytest.mark.parametrize("artifact", ["text", "marker", "frame", "ruler"])
def test_acceptance_grid(arch, artifact, phantoms, tmp_path):
    """Issue #4 acceptance: each artifact x architecture, 5 seeds -> AUROC >= 0.95, IoU >= 0.5."""
    from cxr_audit.data.inject import inject
    from cxr_audit.training.pipeline import train

    data = inject(phantoms, tmp_path / "d", artifact, {"disease": 0.9}, splits=["train", "val"], seed=2)
    ckpt = train(data, tmp_path / "m.pt", arch, size=64, epochs=8, batch_size=16, seed=0, device="cpu").checkpoint
    s = scan(ckpt, data, tmp_path / "s.h5", device="cpu").path
    result = annotate(s, tmp_path / "a.h5", seeds=_seeds(s), device="cpu", **BRIGHT_ARTIFACT_MASKS[arch])
    assert result.quality["retrieval_held_out"]["auroc"] >= 0.95, result.quality
    assert result.quality["mask_iou"] >= 0.5, result.quality


def test_start_relevance_keeps_only_the_presence_above_the_reference():
    from cxr_audit.annotate.masks import concept_presence, start_relevance

    act = torch.ones(1, 2, 4, 4)
    act[0, 0, 1, 2] = 3.0  # the concept channel fires harder at one position (the artifact)
    v = torch.tensor([1.0, 0.0])
    raw = start_relevance(act, v)
    assert (raw[0, 0] > 0).all()  # without a reference every position starts relevance
    reference = concept_presence(torch.ones(5, 2, 4, 4), v).median(dim=0).values
    r = start_relevance(act, v, reference)
    assert r[0, 0, 1, 2] == pytest.approx(2.0) and r.sum() == pytest.approx(2.0)  # only the excess 3 - 1
    tokens = start_relevance(act.flatten(2).transpose(1, 2), v, reference.flatten())  # ViT layout (N, T, C)
    assert torch.allclose(tokens.transpose(1, 2).reshape(1, 2, 4, 4), r)


def test_complete_saturated_adds_the_rest_of_a_frame_but_not_large_regions():
    from cxr_audit.annotate.masks import complete_saturated

    rng = np.random.default_rng(0)
    image = rng.uniform(0.2, 0.6, (64, 64))
    frame = np.zeros((64, 64), bool)
    frame[:2], frame[-2:], frame[:, :2], frame[:, -2:] = True, True, True, True
    image[frame] = 1.0
    seen = np.zeros_like(frame)
    seen[:3, :20] = True  # relevance covered a piece of the top side only
    done = complete_saturated(image, seen)
    assert done[frame].all() and (done & ~frame).sum() == (seen & ~frame).sum()
    # a mask without saturated pixels is left alone
    image[30:34, 30:34] = 0.4
    assert (complete_saturated(image, np.pad(np.ones((4, 4), bool), 30)) == np.pad(np.ones((4, 4), bool), 30)).all()
    # a saturated region larger than max_area (anatomy, background) is not added
    image[10:60, 10:60] = 1.0
    blob_seed = np.zeros_like(frame)
    blob_seed[30, 30] = True
    assert complete_saturated(image, blob_seed).sum() == 1


def test_complete_saturated_adds_thin_strokes_but_not_thick_clipped_anatomy():
    from cxr_audit.annotate.masks import complete_saturated, thin_radius

    rng = np.random.default_rng(0)
    image = rng.uniform(0.2, 0.6, (128, 128))
    assert thin_radius(image.shape) == 3 and thin_radius((224, 224)) == 5
    ring = np.zeros((128, 128), bool)  # a marker's outline, 2 px wide: within 3 px of its edge everywhere
    ring[20:40, 20:40], ring[22:38, 22:38] = True, False
    belly = np.zeros_like(ring)  # clipped-white abdomen: 30 x 40 px, 7 % of the image, well under max_area
    belly[90:120, 40:80] = True
    image[ring | belly] = 1.0
    seen = np.zeros_like(ring)
    seen[19:23, 19:30] = True  # the relevance touched one corner of the ring ...
    seen[88:92, 50:55] = True  # ... and the belly's top edge
    done = complete_saturated(image, seen)
    assert done[ring].all()
    assert not (done & belly & ~seen).any()
