"""ProtoPNet (Chen et al., 2019): architecture, costs, the three training steps and the projection."""

import math

import numpy as np
import pytest
import torch
from cxr_audit.cli.main import app
from cxr_audit.models.architectures import build_model
from cxr_audit.models.protopnet import SIMILARITY_EPS
from cxr_audit.models.registry import load_checkpoint, preprocessing_of
from cxr_audit.training.protopnet import CLUSTER_COST, SEPARATION_COST, PrototypeCosts
from typer.testing import CliRunner

runner = CliRunner()


def test_forward_is_distances_similarity_max_and_a_class_connected_last_layer():
    torch.manual_seed(0)
    model = build_model("protopnet:resnet18", 3, 1, 64).eval()
    x = torch.randn(2, 1, 64, 64)
    logits = model(x)
    z = model.latent(x)  # (N, D, h, w), in [0, 1] after the sigmoid
    assert z.shape[1] == 128 and z.min() >= 0 and z.max() <= 1
    p = model.prototypes.vectors[:, :, 0, 0]  # (P, D)
    naive = ((z.permute(0, 2, 3, 1)[:, :, :, None, :] - p) ** 2).sum(-1)  # (N, h, w, P)
    naive_min = naive.flatten(1, 2).amin(1)
    torch.testing.assert_close(model.min_distances(x), naive_min, rtol=1e-4, atol=1e-4)
    import copy

    copy.deepcopy(model)  # no tensor of a forward pass stays on the model
    scores = torch.log((naive_min + 1) / (naive_min + SIMILARITY_EPS))  # max similarity = min distance
    torch.testing.assert_close(logits, scores @ model.last_layer.weight.T, rtol=1e-4, atol=1e-4)
    w = model.last_layer.weight  # (K, P): 10 prototypes per class, +1 own class, -0.5 others
    assert w.shape == (3, 30) and model.last_layer.bias is None
    assert torch.equal(w[1, 10:20], torch.ones(10)) and torch.equal(w[1, :10], torch.full((10,), -0.5))


def test_cluster_and_separation_costs_match_a_naive_loop():
    torch.manual_seed(1)
    model = build_model("protopnet:resnet18", 2, 1, 32)
    x, labels = torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 1, 0])
    costs = PrototypeCosts()
    costs.prepare(model, None, [])
    _, penalty = costs.forward(model, {"label": labels}, x)
    costs.finish(model)
    assert not model.prototypes._forward_hooks
    d = model.min_distances(x)
    cluster = sum(min(d[i, j] for j in range(20) if j // 10 == labels[i]) for i in range(4)) / 4
    separation = sum(min(d[i, j] for j in range(20) if j // 10 != labels[i]) for i in range(4)) / 4
    torch.testing.assert_close(penalty, CLUSTER_COST * cluster - SEPARATION_COST * separation)
    assert penalty.requires_grad


@pytest.fixture(scope="module")
def protopnet_model(phantoms, tmp_path_factory):
    out = tmp_path_factory.mktemp("protopnet") / "pp.pt"
    r = runner.invoke(app, ["train", str(phantoms), "--out", str(out), "--arch", "protopnet:resnet18", "--size",
                            "64", "--epochs", "2", "--batch-size", "16", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "last layer" in r.output and "joint" in r.output  # the table shows the steps
    return out


def test_three_steps_project_every_prototype_onto_a_training_patch_of_its_class(protopnet_model, phantoms):
    from cxr_audit.data.dataset import CxrDataset
    from cxr_audit.data.manifest import load_manifest

    payload = torch.load(protopnet_model, weights_only=True)
    records = payload["extra"]["prototypes"]
    model, config = load_checkpoint(protopnet_model)
    manifest = load_manifest(phantoms, config["class_names"])
    dataset = CxrDataset(manifest, preprocessing_of(config), with_masks=False)
    by_index = {s.index: s for s in manifest.samples}
    assert len(records) == 20 and all(r["sample"] is not None for r in records)
    for cls in config["class_names"]:  # no duplicates: a class's prototypes lie on ten different images
        assert len({r["sample"] for r in records if r["class"] == cls}) == 10
    with torch.no_grad():
        for r in records:
            sample = by_index[r["sample"]]
            assert sample.split == "train" and config["class_names"][sample.label] == r["class"] == r["label"]
            assert r["source"] == sample.source and r["path"] == str(sample.path)
            z = model.latent(dataset[r["sample"]]["image"][None])  # (1, D, h, w)
            row, col = r["patch"]
            patch = z[0, :, row, col]
            # projection: the prototype *is* that patch's feature (distance 0)
            assert float(((patch - model.prototypes.vectors[r["prototype"], :, 0, 0]) ** 2).sum()) < 1e-6
            y0, x0, y1, x1 = r["box"]
            assert 0 <= y0 < y1 <= 64 and 0 <= x0 < x1 <= 64
    # step 3 pushed the wrong-class connections from -0.5 towards 0 and left the own-class ones
    w = payload["state_dict"]["last_layer.weight"]
    own = torch.arange(20)[None, :] // 10 == torch.arange(2)[:, None]
    assert w[~own].abs().mean() < 0.5 and w[own].mean() > 0.5
    history = payload["extra"]["history"]
    assert [h["stage"] for h in history] == ["joint"] * 2 + ["last layer"] * 5


def test_projection_candidates_are_each_prototypes_nearest_images_of_its_class(phantoms):
    from cxr_audit.data.dataset import CxrDataset, Preprocessing
    from cxr_audit.data.manifest import load_manifest
    from cxr_audit.training.protopnet import _nearest_images

    torch.manual_seed(3)
    model = build_model("protopnet:resnet18", 2, 1, 64).eval()
    manifest = load_manifest(phantoms).subset("train")
    prep = Preprocessing(size=64)
    candidates = _nearest_images(model, manifest, prep, torch.device("cpu"), batch_size=7)
    dataset = CxrDataset(manifest, prep, with_masks=False)
    with torch.no_grad():  # naive: every image's closest patch to every prototype, one image at a time
        closest = {s.index: model.prototypes(model.latent(dataset[k]["image"][None]))[0].flatten(1).min(1)
                   for k, s in enumerate(manifest.samples)}
    position = {s.index: k for k, s in enumerate(manifest.samples)}
    for j in (0, 7, 13):
        cls = int(model.prototype_class[j])
        own = sorted((float(closest[s.index][0][j]), s.index) for s in manifest.samples if s.label == cls)
        assert [c["sample"] for c in candidates[j]] == [i for _, i in own[:10]]
        np.testing.assert_allclose([c["distance_before"] for c in candidates[j]], [d for d, _ in own[:10]], rtol=1e-4)
        first = candidates[j][0]  # the recorded vector is that image's closest patch
        with torch.no_grad():
            z = model.latent(dataset[position[first["sample"]]]["image"][None])[0]
        row, col = first["patch"]
        assert int(closest[first["sample"]][1][j]) == row * z.shape[2] + col
        torch.testing.assert_close(first["vector"], z[:, row, col])


def test_distinct_images_gives_the_closest_pairs_first_and_reuses_only_when_images_run_out():
    from cxr_audit.training.protopnet import distinct_images

    def cand(*pairs):
        return [{"sample": s, "distance_before": d} for s, d in pairs]

    classes = torch.tensor([0, 0, 0, 1, 1])
    candidates = [cand(("a", 0.1), ("b", 0.5), ("d", 0.6)), cand(("a", 0.05), ("c", 0.9)),
                  cand(("a", 0.2), ("b", 0.3)), cand(("x", 1.0)), cand(("x", 2.0))]
    chosen = [c["sample"] for c in distinct_images(candidates, classes)]
    # pairs by distance: 1-a (0.05) taken; 0-a, 2-a refused; 2-b (0.3); 0-b refused; 0-d (0.6)
    assert chosen[:3] == ["d", "a", "b"]
    assert chosen[3:] == ["x", "x"]  # class 1 has one image for two prototypes: the second reuses it
    candidates[0] = candidates[0][:2]  # 0's candidates all taken: it keeps its nearest
    assert [c["sample"] for c in distinct_images(candidates, classes)][:3] == ["a", "a", "b"]


def test_scan_of_a_protopnet_stores_per_prototype_similarities(protopnet_model, phantoms, tmp_path):
    import h5py

    r = runner.invoke(app, ["scan", str(phantoms), "--model", str(protopnet_model), "--out", str(tmp_path / "s.h5"),
                            "--split", "test", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    model, _ = load_checkpoint(protopnet_model)
    with h5py.File(tmp_path / "s.h5") as f:
        assert "activations/similarity/max" in f and f["activations/similarity/max"].shape[1] == 20
        similarity = f["activations/similarity/max"][:]
        index = f["samples/index"][:]
    from cxr_audit.data.dataset import CxrDataset
    from cxr_audit.data.manifest import load_manifest

    _, config = load_checkpoint(protopnet_model)
    dataset = CxrDataset(load_manifest(phantoms, config["class_names"]), preprocessing_of(config), with_masks=False)
    with torch.no_grad():
        d = model.min_distances(dataset[int(index[0])]["image"][None])
    expected = torch.log((d + 1) / (d + SIMILARITY_EPS))[0]
    torch.testing.assert_close(torch.from_numpy(similarity[0]).float(), expected, rtol=1e-3, atol=1e-3)
    assert not math.isnan(float(similarity.sum()))
    with h5py.File(tmp_path / "s.h5") as f:  # PRP maps of the predicted class's top-3 prototypes
        top, score = f["prototypes/index"][:], f["prototypes/score"][:]
        prp, act, pred = f["prototypes/prp"][:].astype(float), f["prototypes/activation"][:], f["outputs/pred"][:]
    assert top.shape == (len(index), 3) and prp.shape == act.shape == (len(index), 3, 64, 64)
    assert (top // 10 == pred[:, None]).all()  # each belongs to the predicted class
    np.testing.assert_allclose(score, np.take_along_axis(similarity, top, 1), rtol=1e-5)
    assert (np.diff(score, axis=1) <= 1e-6).all()  # ranked by score
    # relevance starts at the score; the add-on's positive biases take a share, nothing is created
    assert (prp.sum((2, 3)) > 0).all() and (prp.sum((2, 3)) <= score * 1.02 + 1e-3).all()


def test_prp_distance_rule_matches_a_naive_loop_and_conserves():
    from cxr_audit.explain.prp import prototype_relevance

    torch.manual_seed(2)
    z, p, rel = torch.rand(2, 5, 3, 4), torch.rand(20, 5, 1, 1), torch.rand(2, 20, 3, 4)
    out = prototype_relevance(z, p, rel)
    naive = torch.zeros_like(z)
    for n in range(2):
        for i in range(3):
            for j in range(4):
                for k in range(20):
                    close = [1 / ((z[n, c, i, j] - p[k, c, 0, 0]) ** 4 + 1e-12) for c in range(5)]
                    for c in range(5):
                        naive[n, c, i, j] += rel[n, k, i, j] * close[c] / sum(close)
    torch.testing.assert_close(out, naive)
    torch.testing.assert_close(out.sum(1), rel.sum(1))  # conserved at every position
    # the channel where the patch equals the prototype takes (nearly) all of that prototype's relevance
    z[0, 3, 0, 0] = p[7, 3, 0, 0]
    only = torch.zeros_like(rel)
    only[0, 7, 0, 0] = 1.0
    assert prototype_relevance(z, p, only)[0, 3, 0, 0] > 0.999


def test_prp_conserves_the_score_down_to_the_pixels_through_the_prp_rule():
    from cxr_audit.explain.prp import prototype_explanations, prototype_relevance

    from test_explain import _bias_free, _explain

    arch = "protopnet:resnet18"
    model = _bias_free(arch)
    x = torch.randn(3, 1, 64, 64)
    expl, attribution, capture = _explain(model, arch, x, layers=["add_on", "similarity"])
    logit = expl.logits.gather(1, expl.targets["pred"][:, None])[:, 0]
    torch.testing.assert_close(expl.heatmaps["pred"].sum((1, 2)), logit, rtol=1e-3, atol=1e-5)  # PRP of the logit
    with attribution.rules(), capture.attached(attribution.model):
        pe = prototype_explanations(attribution, capture, x, "similarity", 1)
        start = torch.zeros_like(capture.outputs["similarity"])
        flat = capture.outputs["similarity"].detach().flatten(2)
        for n in range(3):
            j = int(pe.index[n, 0])
            start.view(3, flat.shape[1], -1)[n, j, flat[n, j].argmax()] = pe.score[n, 0]
        z = capture.outputs["add_on"].detach()
        at_latent = capture.grads["add_on"]
    assert (model.prototype_class[pe.index[:, 0]] == expl.logits.argmax(1)).all()
    torch.testing.assert_close(pe.score[:, 0], flat.amax(2).gather(1, pe.index)[:, 0])
    # the relevance reaching the add-on is the PRP distance rule's, not the plain gradient's
    torch.testing.assert_close(at_latent, prototype_relevance(z, model.prototypes.vectors, start), rtol=1e-4,
                               atol=1e-7)
    torch.testing.assert_close(pe.prp.sum((2, 3)), pe.score, rtol=1e-3, atol=1e-5)
    assert pe.activation.shape == (3, 1, 64, 64) and pe.prp.std() > 0


def test_protopnet_refuses_multilabel_data_in_one_line(tmp_path, phantoms):
    import csv

    rows = list(csv.DictReader(open(phantoms)))
    for r in rows:
        r["label"] = r["label"] + "|extra" if r["label"] == "disease" else r["label"]
        r["path"] = str((phantoms.parent / r["path"]).resolve())
        r["mask"] = str((phantoms.parent / r["mask"]).resolve()) if r.get("mask") else ""
    with open(tmp_path / "m.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    r = runner.invoke(app, ["train", str(tmp_path / "m.csv"), "--out", str(tmp_path / "m.pt"), "--arch",
                            "protopnet:resnet18", "--size", "32", "--epochs", "1", "--device", "cpu"])
    assert r.exit_code == 2 and "single-label" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "m.pt").exists()


def test_average_drop_and_increase_follow_their_formulas_and_masking_keeps_the_top_half():
    from cxr_audit.evaluate.faithfulness import average_drop_increase, keep_most_relevant

    before, after = np.array([2.0, 1.0, 4.0, 1.0]), np.array([1.0, 1.5, 4.0, 0.0])
    ad, ai = average_drop_increase(before, after)
    assert ad == pytest.approx(100 * (0.5 + 0 + 0 + 1.0) / 4) and ai == pytest.approx(25.0)
    torch.manual_seed(0)
    images, maps = torch.randn(2, 1, 8, 8), torch.randn(2, 8, 8)
    masked = keep_most_relevant(images, maps, torch.tensor([-1.0]), torch.tensor([2.0]), torch.Generator().manual_seed(0))
    kept = masked == images
    for n in range(2):
        top = maps[n].flatten().argsort(descending=True)[:32]
        assert kept[n, 0].flatten()[top].all() and kept[n].sum() == 32  # the 50 % most relevant pixels, only
    noise = masked[~kept]
    assert noise.min() >= -1 and noise.max() <= 2 and noise.std() > 0.5  # uniform over the input range


def test_evaluate_compares_prp_with_the_upsampled_maps_by_average_drop(protopnet_model, phantoms, tmp_path):
    import json

    r = runner.invoke(app, ["evaluate", "--model", str(protopnet_model), "--data", str(phantoms), "--out",
                            str(tmp_path / "ev"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())["metrics"]["model"]
    for key in ("prp_average_drop", "prp_average_increase", "activation_average_drop", "activation_average_increase"):
        assert 0 <= metrics[key] <= 100, key
    # PRP keeps what the prototype responds to: masking the rest costs less of the score (Gautam et al.)
    assert metrics["prp_average_drop"] <= metrics["activation_average_drop"]
    assert "prp_average_drop" in (tmp_path / "ev" / "metrics.md").read_text()


def test_reveal_audits_every_prototype_and_flags_one_whose_nearest_patches_share_a_source(
        protopnet_model, phantoms, tmp_path):
    import csv
    import json

    import h5py
    from cxr_audit.store.h5 import read_meta

    # the same images, now from two sources: site1 gives 7 of 8 healthy images and 1 of 8 disease images
    rows = list(csv.DictReader(open(phantoms)))
    seen = {"healthy": 0, "disease": 0}
    for r in rows:
        seen[r["label"]] += 1
        site1 = (seen[r["label"]] % 8 != 0) == (r["label"] == "healthy")
        r.update(source=f"site{int(site1)}", path=str((phantoms.parent / r["path"]).resolve()),
                 mask=str((phantoms.parent / r["mask"]).resolve()))
    data = tmp_path / "two.csv"
    with open(data, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    scan = tmp_path / "s.h5"
    r = runner.invoke(app, ["scan", str(data), "--model", str(protopnet_model), "--out", str(scan), "--device", "cpu",
                            "--prototype-maps", "1"])
    assert r.exit_code == 0, r.output
    with h5py.File(scan, "r+") as f:
        sources, labels = f["samples/source"].asstr()[:], f["samples/label"][:]
        scores = f["activations/similarity/max"][:]
        rng = np.random.default_rng(0)
        scores[:] = rng.random(scores.shape)  # no source, no class
        site1, disease = sources == "site1", labels == read_meta(f)["class_names"].index("disease")
        scores[:, 3] += site1 * 10 + (site1 & disease) * 5  # the source's cue, in either class (a stamp)
        scores[:, 5] += (site1 & ~disease) * 10  # a healthy cue that site1's healthy images carry
        f["activations/similarity/max"][:] = scores
    r = runner.invoke(app, ["reveal", str(scan), "--out", str(tmp_path / "rev"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "rev" / "reveal.json").read_text())
    audits = {p["prototype"]: p for p in result["prototypes"]}
    assert sorted(audits) == list(range(20))
    three, five = audits[3], audits[5]
    assert three["top_source"] == "site1" and three["top_source_share"] == 1.0 and three["source_linked"]
    assert three["flagged"] and result["prototypes"][0]["flagged"]  # flagged ones come first
    assert not any(p["source_linked"] for j, p in audits.items() if j not in (3, 5))
    # both are source-linked; only the stamp-like one follows the source beyond what its class explains
    assert five["source_linked"] and five["top_source_share"] == 1.0
    assert three["beyond_class"] and three["source_p_within_class"] < 1e-6
    assert not five["beyond_class"] and five["source_p_within_class"] > 0.05
    # within each class site1's images outscore site0's on the stamp-like prototype: source-specific
    assert three["separating_source"] == "site1" and three["source_auroc"] == 1.0 and three["source_specific"]
    assert not any(p["source_specific"] for j, p in audits.items() if j not in (3, 5))
    for p in audits.values():
        assert len(p["nearest"]) == 16 and 0 <= p["outside_lungs"] <= 1 and p["projected"]["sample"] is not None
    # prototype similarities are ranked like channels
    assert any(c["layer"] == "similarity" for c in result["concepts"])
    html_text = (tmp_path / "rev" / "report.html").read_text()
    assert "<h2>Prototypes</h2>" in html_text and "prototypes.png" in html_text
    assert html_text.count("(beyond class)") == 1
    assert (tmp_path / "rev" / "prototypes.png").stat().st_size > 1000


def test_within_group_auroc_compares_pairs_within_groups_only_and_its_p_is_mann_whitney():
    from cxr_audit.reveal.prototypes import best_separating_source, within_group_auroc
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(4)
    scores, member, group = rng.normal(size=60), rng.random(60) < 0.3, rng.integers(0, 3, 60)
    scores[member & (group == 1)] += 1.0
    auroc, p = within_group_auroc(scores, member, group)
    pairs = [(a > b) + 0.5 * (a == b) for g in range(3) for a in scores[member & (group == g)]
             for b in scores[~member & (group == g)]]
    assert auroc == pytest.approx(np.mean(pairs))
    one = group == 1  # a single group: the plain one-sided Mann-Whitney test (no ties)
    _, p_one = within_group_auroc(scores[one], member[one], np.zeros(one.sum(), int))
    expected = mannwhitneyu(scores[one][member[one]], scores[one][~member[one]], alternative="greater",
                            method="asymptotic", use_continuity=False).pvalue
    assert p_one == pytest.approx(expected, rel=1e-6)
    # a source that is a class's only source is never compared: nothing to separate
    assert within_group_auroc(scores, group == 0, group) == (None, None)
    # a cue of one source in both classes, beside class differences, is found for that source
    sources = np.where(member, "h1", "h2")
    shifted = scores + 5 * (group == 2) + 2 * member
    source, auroc, p = best_separating_source(shifted, sources, group)
    assert source == "h1" and auroc > 0.9 and p < 1e-4


def test_poisson_binomial_tail_is_the_enumerated_one():
    import itertools

    from cxr_audit.reveal.prototypes import class_shares, poisson_binomial_sf

    probs = np.array([0.9, 0.1, 0.5, 0.3, 0.75])
    for k in range(len(probs) + 1):
        naive = sum(np.prod(np.where(o, probs, 1 - probs)) for o in itertools.product([0, 1], repeat=len(probs))
                    if sum(o) >= k)
        assert poisson_binomial_sf(k, probs) == pytest.approx(naive)
    np.testing.assert_allclose(class_shares(np.array([1, 0, 1, 1, 0], bool), np.array([0, 0, 1, 1, 1])), [0.5, 2 / 3])


def test_outside_share_and_enrichment_follow_their_formulas():
    from cxr_audit.reveal.location import outside_share
    from cxr_audit.reveal.prototypes import outside_enrichment

    lungs = np.zeros((1, 4, 4))
    lungs[0, :, :2] = 1  # left half is lung
    relevance = np.zeros((1, 4, 4))
    relevance[0, 0, 3], relevance[0, 0, 0], relevance[0, 1, 1] = 3.0, 1.0, -5.0  # negative relevance ignored
    assert outside_share(relevance, lungs) == pytest.approx(0.75)
    assert outside_enrichment(0.75, 0.5) == pytest.approx(3.0)
    assert outside_enrichment(0.3, 0.3) == pytest.approx(1.0)  # spread evenly
