"""Building blocks of `reveal` (the command itself is not built yet; see issue #3 notes)."""

import numpy as np
from cxr_audit.reveal.concepts import concept_outliers, rank_concepts, split_quality
from cxr_audit.reveal.spray import prepare_heatmaps, spray


def _blob_heatmaps(n, centre, rng, size=32):
    yy, xx = np.mgrid[0:size, 0:size]
    maps = []
    for _ in range(n):
        cy, cx = np.array(centre) + rng.normal(0, 1.0, 2)
        maps.append(np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 8.0) + 0.02 * rng.random((size, size)))
    return np.array(maps, np.float32)


def test_spray_finds_the_explanation_strategies_and_their_number():
    rng = np.random.default_rng(0)
    heat = np.concatenate([_blob_heatmaps(40, (8, 8), rng), _blob_heatmaps(15, (24, 24), rng),
                           _blob_heatmaps(25, (8, 24), rng)])
    truth = np.repeat([0, 1, 2], [40, 15, 25])
    result = spray(prepare_heatmaps(heat), max_k=6)
    assert result.k == 3
    # each found cluster is one strategy
    for c in range(3):
        members = truth[result.labels == c]
        assert len(set(members)) == 1
    assert result.embedding.shape == (80, 2)


def test_prepare_heatmaps_normalises_positive_mass():
    heat = np.random.default_rng(0).normal(size=(3, 64, 64)).astype(np.float32)
    flat = prepare_heatmaps(heat, size=16)
    assert flat.shape == (3, 256) and np.allclose(flat.sum(1), 1.0) and (flat >= 0).all()


def test_split_quality_prefers_two_groups_over_one():
    rng = np.random.default_rng(0)
    bimodal = np.r_[rng.normal(0, 0.1, 60), rng.normal(3, 0.1, 40)]
    unimodal = rng.normal(1, 0.5, 100)
    eta_b, contrast_b, cut = split_quality(bimodal)
    eta_u, _, _ = split_quality(unimodal)
    assert eta_b > 0.9 and eta_u < 0.2 and 0.5 < cut < 2.5
    assert contrast_b > 0.9  # the low group is (nearly) off
    assert split_quality(np.ones(10))[0] == 0.0


def test_rank_concepts_flags_a_subset_concept_above_a_class_concept():
    rng = np.random.default_rng(1)
    n = 200
    classes = np.repeat([0, 1], n // 2)
    artifact = (classes == 0) & (rng.random(n) < 0.5)
    acts = rng.normal(0, 0.1, (n, 6)).clip(0)
    acts[:, 0] += 2.0 * (classes == 0)  # the real class feature: on for the whole class
    acts[:, 1] += 2.0 * artifact  # the shortcut: on for half of class 0 only
    relevance = acts.copy()
    findings = rank_concepts("layer", acts, relevance, classes, top=3)
    assert findings[0].channel == 1 and findings[0].class_index == 0
    members = np.zeros(n, bool)
    members[findings[0].member_rows] = True
    assert (members == artifact).mean() > 0.95


def test_concept_outliers_single_out_an_odd_profile():
    rng = np.random.default_rng(0)
    base = rng.random(100)
    rel = np.stack([base + 0.05 * rng.random(100) for _ in range(30)], 1)
    rel[:, 7] = rng.random(100) * (rng.random(100) < 0.2)
    scores = concept_outliers(rel, n_neighbors=10)
    assert int(np.argmax(scores)) == 7


def test_the_reveal_report_template_escapes_every_user_string():
    from cxr_audit.report.html import render
    from cxr_audit.reveal.records import ClusterRecord, ConceptRecord

    evil = "<script>alert(1)</script>"
    concept = ConceptRecord(evil, 3, 0, suspicion=0.5, contrast=1.0, eta=0.5, minority=0.2, importance=0.1,
                            outlier=1.0, bimodality_z=4.0, members=[1, 2], source_association={},
                            source_cramers_v=0.4, source_p_value=1e-4, label_p_value=None, source_linked=True,
                            alarm=True).to_json()
    prototype = {"prototype": 0, "class": evil, "projected": {"sample": 1, "source": evil, "label": evil},
                 "projected_file": evil, "top_source": evil, "top_source_share": 1.0, "source_p": 1e-5,
                 "source_p_within_class": 1e-4, "beyond_class": True, "outside_lungs": None, "flagged": True,
                 "separating_source": evil, "source_auroc": 0.9, "source_auroc_p": 1e-6, "source_specific": True}
    cluster = ClusterRecord(evil, 0, 5, share_of_class=0.1, distinctness=0.3, suspicion=0.2, members=[1],
                            k_of_class=2, clustering=evil).to_json()
    page = render("reveal.html", scan=evil, prevalence={"warning": True, "max_difference": 0.5}, alarm=evil,
                  names=[evil], concepts=[concept], concept_figures=[], prototypes=[prototype], prototype_png=None,
                  source_share=0.8, source_auroc=0.64, embedding={"method": "t-SNE", "sentence": evil}, clusters=[cluster],
                  cluster_figures=[])
    assert "<script>" not in page and page.count("&lt;script&gt;") >= 10
    assert "(linked)" in page and "(beyond class)" in page and "50%" in page and "0.90 (1.0e-06) specific" in page
