"""Reveal at scale: the landmark SpRAy, the sampled embedding, block-wise scan reads, and a whole
reveal on a planted store where the scaled paths are forced (benchmarks/reveal_scale.py builds
the store and measures 1k-100k)."""

from pathlib import Path

import cxr_audit.reveal.embedding as embedding_module
import cxr_audit.reveal.pipeline as revealing_module
import cxr_audit.reveal.spray as spray_module
import cxr_audit.store.h5 as h5_module
import h5py
import numpy as np
import pytest
from cxr_audit.reveal.embedding import embed, stratified_sample
from cxr_audit.reveal.pipeline import reveal
from cxr_audit.reveal.spray import landmark_weights, spray
from cxr_audit.store.h5 import read_rows
from sklearn.metrics import adjusted_rand_score, roc_auc_score

from benchmark_files import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


def _planted_benchmark():
    return load_benchmark("reveal_scale")


def _clusters(n, shares, noise, seed=0, dim=64):
    rng = np.random.default_rng(seed)
    truth = rng.choice(len(shares), n, p=shares)
    centres = rng.random((len(shares), dim))
    x = centres[truth] + noise * rng.random((n, dim))
    return x / x.sum(1, keepdims=True), truth


def test_landmark_spray_recovers_planted_clusters_with_a_small_minority():
    x, truth = _clusters(3000, [0.6, 0.3, 0.1], noise=0.8)
    result = spray(x, exact_max=1000)
    assert result.method == "landmark" and result.k == 3
    assert adjusted_rand_score(truth, result.labels) > 0.95
    assert np.all(np.diff(result.eigenvalues) >= -1e-9) and result.eigenvalues.min() > -1e-6
    assert result.eigenvalues.max() <= 1 + 1e-6 and result.embedding.shape == (3000, 2)


def test_landmark_and_exact_spray_agree_where_both_run():
    x, truth = _clusters(1500, [0.5, 0.35, 0.15], noise=1.2, seed=1)
    exact, scaled = spray(x), spray(x, exact_max=500)
    assert exact.method == "exact" and scaled.method == "landmark"
    assert exact.k == scaled.k == 3
    assert adjusted_rand_score(exact.labels, scaled.labels) > 0.9 and adjusted_rand_score(truth, scaled.labels) > 0.9


def test_landmark_weights_are_a_sparse_stochastic_nearest_centre_map():
    rng = np.random.default_rng(0)
    x, centres = rng.random((500, 8)).astype(np.float32), rng.random((40, 8)).astype(np.float32)
    z = landmark_weights(x, centres, nearest=5, chunk=64)
    assert z.shape == (500, 40) and np.allclose(np.asarray(z.sum(1)).ravel(), 1)
    assert (np.diff(z.indptr) == 5).all()
    nearest = ((x[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
    assert (np.asarray(z.argmax(1)).ravel() == nearest).all()  # the nearest centre weighs most


def test_read_rows_equals_fancy_indexing_for_any_block_size(tmp_path):
    data = np.random.default_rng(0).random((1000, 3, 3)).astype(np.float32)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.create_dataset("d", data=data, chunks=(16, 3, 3))
    rows_sets = [np.arange(1000), np.arange(100, 900, 3), np.array([2, 500, 999]), np.array([], int)]
    with h5py.File(tmp_path / "x.h5") as f:
        for rows in rows_sets:
            for chunk in (1, 7, 4096):
                assert np.array_equal(read_rows(f["d"], rows, chunk=chunk), data[rows])
                summed = read_rows(f["d"], rows, lambda b: b.sum((1, 2)), chunk=chunk)
                assert summed.shape == (len(rows),) and np.allclose(summed, data[rows].sum((1, 2)))


def test_sampled_embedding_keeps_every_cluster_and_places_the_rest_beside_its_own():
    x, truth = _clusters(1200, [0.9, 0.1], noise=0.5, seed=2, dim=16)
    sample = stratified_sample(truth, 200)
    assert np.isin([0, 1], truth[sample]).all() and (truth[sample] == 1).sum() >= embedding_module.MIN_PER_STRATUM
    result = embed(x, "tsne", strata=truth, fit_max=200)
    assert result.fitted == len(sample) < 1200 and np.isfinite(result.xy).all()
    # a placed point's nearest fitted neighbour in 2-D belongs to its own planted cluster
    placed = np.setdiff1d(np.arange(1200), sample)
    d = ((result.xy[placed, None] - result.xy[None, sample]) ** 2).sum(-1)
    assert np.mean(truth[sample][d.argmin(1)] == truth[placed]) > 0.95


@pytest.fixture(scope="module")
def planted_store(tmp_path_factory):
    return _planted_benchmark().build_planted_store(tmp_path_factory.mktemp("planted") / "scan.h5", 1200, seed=3,
                                                    heatmap_size=32, block=500, strength=1.0)


def test_block_reads_do_not_change_reveal(planted_store, tmp_path, monkeypatch):
    whole = reveal(planted_store, tmp_path / "whole", references=False)
    monkeypatch.setattr(h5_module, "READ_CHUNK", 37)
    blocks = reveal(planted_store, tmp_path / "blocks", references=False)
    assert [(c["layer"], c["channel"], c["members"]) for c in whole["concepts"]] == \
        [(c["layer"], c["channel"], c["members"]) for c in blocks["concepts"]]
    assert [c["members"] for c in whole["clusters"]] == [c["members"] for c in blocks["clusters"]]


def test_reveal_with_the_scaled_paths_finds_the_planted_artifact(planted_store, tmp_path, monkeypatch):
    monkeypatch.setattr(spray_module, "EXACT_MAX", 200)
    monkeypatch.setattr(embedding_module, "FIT_MAX", 150)
    monkeypatch.setattr(revealing_module, "VIRELAY_AUTO_MAX", 100)
    result = reveal(planted_store, tmp_path / "r", references=False)
    assert {c["clustering"] for c in result["clusters"]} == {"landmark"}
    with h5py.File(planted_store) as f:
        truth = (f["samples/artifact"][:] == 1)[result["sample_ids"]]
    assert result["alarm"]["raised"]
    assert max(roc_auc_score(truth, c["scores"]["cav"]) for c in result["concepts"][:3]) > 0.95
    ids = np.asarray(result["sample_ids"])
    assert max(roc_auc_score(truth, np.isin(ids, c["members"])) for c in result["clusters"][:3]) > 0.9
    fitted, total = result["embedding_fitted"]["disease"]
    assert fitted < total
    report = (tmp_path / "r" / "report.html").read_text()
    assert "nearest embedded samples" in report and "concept_0.png" in report  # galleries despite missing images
    assert "pass --virelay" in result["virelay"]["skipped"]


def test_blockwise_channel_statistics_equal_the_whole_array_ones(monkeypatch):
    """The concept ranking's per-channel sums over blocks of samples: LOF on cosine distances
    from the blocked Gram matrix equals sklearn's cosine LOF on the whole profiles, and the
    positive mean equals the one-shot mean."""
    import cxr_audit.reveal.concepts as concepts
    from sklearn.neighbors import LocalOutlierFactor

    rng = np.random.default_rng(0)
    rel = rng.standard_normal((3000, 40)).astype(np.float32)
    rel[:, 3] *= 5
    rel[:, 7] = rel[:, 8] + 0.1 * rel[:, 9]
    profiles = rel.T.astype(np.float64)
    profiles /= np.linalg.norm(profiles, axis=1, keepdims=True)
    expected = -LocalOutlierFactor(n_neighbors=20, metric="cosine").fit(profiles).negative_outlier_factor_
    monkeypatch.setattr(concepts, "BLOCK_ROWS", 700)
    assert np.allclose(concepts.concept_outliers(rel), expected, atol=1e-9)
    rows = np.arange(0, 3000, 3)
    assert np.allclose(concepts.positive_mean(rel, rows), np.clip(rel[rows], 0, None).mean(0), atol=1e-6)
    assert np.allclose(revealing_module.profile_features(rel).sum(1), 1, atol=1e-5)
