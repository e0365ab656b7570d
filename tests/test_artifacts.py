import numpy as np
import pytest
from cxr_audit.data.artifacts import ARTIFACTS, get_artifact
from cxr_audit.data.inject import inject, parse_prevalence
from cxr_audit.data.io import read_image, read_mask
from cxr_audit.data.manifest import load_manifest
from cxr_audit.data.phantom import make_phantom
from cxr_audit.errors import UsageError


@pytest.mark.parametrize("name", sorted(ARTIFACTS))
def test_artifact_changes_pixels_only_inside_its_mask(name):
    rng = np.random.default_rng(0)
    image = make_phantom(96, False, rng).image
    out, mask = get_artifact(name).apply(image, rng)
    assert out.shape == image.shape and mask.shape == image.shape and mask.dtype == bool
    assert mask.any()
    changed = np.abs(out - image) > 1e-6
    assert changed[mask].mean() > 0.3  # the artifact is visible inside its mask
    assert not changed[~mask].any()  # and nothing changes outside it


def test_phantom_has_lungs_and_disease_brightens_them():
    rng = np.random.default_rng(0)
    healthy = [make_phantom(64, False, rng) for _ in range(10)]
    sick = [make_phantom(64, True, rng) for _ in range(10)]
    assert all(0.05 < p.lung_mask.mean() < 0.4 for p in healthy + sick)
    def lung_mean(ps):
        return np.mean([p.image[p.lung_mask].mean() for p in ps])

    assert lung_mean(sick) > lung_mean(healthy) + 0.01


def test_parse_prevalence():
    assert parse_prevalence("disease=0.5, healthy=0") == {"disease": 0.5, "healthy": 0.0}
    assert parse_prevalence("0.3") == {"*": 0.3}
    with pytest.raises(UsageError):
        parse_prevalence("disease=1.5")
    with pytest.raises(UsageError):
        parse_prevalence("disease=lots")


def test_inject_exact_prevalence_per_class_and_split(phantoms, tmp_path):
    out = inject(phantoms, tmp_path / "inj", "marker", "disease=0.5", splits=["train"], seed=3)
    m = load_manifest(out)
    disease = m.class_names.index("disease")
    train_disease = [s for s in m.samples if s.split == "train" and s.label == disease]
    hit = [s for s in m.samples if s.artifact == 1]
    assert len(hit) == round(0.5 * len(train_disease))
    assert all(s.split == "train" and s.label == disease for s in hit)
    for s in hit[:3]:
        mask = read_mask(s.artifact_mask)
        assert mask.shape == read_image(s.path).shape and mask.any()
    # clean rows still point to the original images (nothing copied)
    clean = next(s for s in m.samples if s.artifact == 0)
    assert clean.path.resolve().parent == phantoms.parent.resolve() / "images"


def test_inject_rejects_unknown_group(phantoms, tmp_path):
    with pytest.raises(UsageError, match="unknown label"):
        inject(phantoms, tmp_path / "x", "text", "zebra=0.5")
    with pytest.raises(UsageError, match="unknown artifact"):
        inject(phantoms, tmp_path / "x", "sticker", "0.5")


def test_inject_per_source_and_class_cell(tmp_path):
    from collections import Counter

    from cxr_audit.data.phantom import generate_phantoms

    data = generate_phantoms(tmp_path / "ph", n=160, size=32, seed=2, sources=2)
    out = inject(data, tmp_path / "grid", "text", "site0:disease=1,site0:*=0.5,*:healthy=0.25", by="source:label",
                 seed=1)
    m = load_manifest(out)
    sizes = Counter((s.source, m.class_names[s.label]) for s in m.samples)
    hits = Counter((s.source, m.class_names[s.label]) for s in m.samples if s.artifact == 1)
    # the most specific key wins: site0:disease=1, site0:healthy -> site0:*=0.5, site1:healthy -> *:healthy
    assert hits[("site0", "disease")] == sizes[("site0", "disease")]
    assert hits[("site0", "healthy")] == round(0.5 * sizes[("site0", "healthy")])
    assert hits[("site1", "healthy")] == round(0.25 * sizes[("site1", "healthy")])
    assert hits[("site1", "disease")] == 0


def test_inject_cell_keys_are_checked(tmp_path):
    from cxr_audit.data.phantom import generate_phantoms

    data = generate_phantoms(tmp_path / "ph", n=20, size=32, seed=2, sources=2)
    with pytest.raises(UsageError, match="need --by source:label"):
        inject(data, tmp_path / "x", "text", "site0:disease=1")
    with pytest.raises(UsageError, match="unknown source or class"):
        inject(data, tmp_path / "x", "text", "site7:disease=1", by="source:label")
    with pytest.raises(UsageError, match="SOURCE:CLASS"):
        inject(data, tmp_path / "x", "text", "disease=1", by="source:label")
