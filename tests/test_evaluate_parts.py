"""evaluate's building blocks: metrics on known arrays, the attack sets, and the two-source protocol."""

import numpy as np
import pytest
from cxr_audit.data.attack import artifact_class, inject_attack, paste_attack, victims
from cxr_audit.data.dataset import Preprocessing
from cxr_audit.data.manifest import load_manifest
from cxr_audit.errors import UsageError
from cxr_audit.evaluate import metrics as M


def test_metrics_on_known_arrays():
    assert M.accuracy(np.array([0, 1, 1]), np.array([0, 1, 0])) == pytest.approx(2 / 3)
    assert M.auroc(np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6]]), np.array([0, 1, 1])) == 1.0
    assert np.isnan(M.auroc(np.array([[0.9, 0.1]]), np.array([0])))
    groups = M.group_accuracy(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), ["a", "a", "b", "b"])
    assert groups == {"a": 0.5, "b": 1.0}
    heat = np.zeros((1, 10, 10))
    heat[0, :2, :] = 1.0  # the top 20 pixels
    mask = np.zeros((1, 10, 10))
    mask[0, :1, :] = 1
    assert M.activation_precision(heat, mask, top=0.1) == pytest.approx([1.0])
    assert M.activation_precision(heat, mask, top=0.2) == pytest.approx([0.5])


def test_balanced_two_source_draws_equally():
    src = np.array(["H1"] * 30 + ["H2"] * 10)
    rows = M.balanced_two_source(src, "H1", "H2", np.random.default_rng(0))
    assert (src[rows] == "H1").sum() == (src[rows] == "H2").sum() == 10


def test_attacks_put_the_artifact_where_the_mask_says(poisoned):
    manifest = load_manifest(poisoned)
    target = artifact_class(manifest)
    assert manifest.class_names[target] == "disease"
    test = victims(manifest.subset("test"), target)
    assert test.samples and all(s.label != target for s in test.samples)
    prep = Preprocessing(size=64)
    drawn = inject_attack(test, prep, "marker", seed=0)
    pasted = paste_attack(test, manifest.subset("train"), prep, seed=0)
    for attack in (drawn, pasted):
        changed = (attack.images - attack.clean).abs().sum(1, keepdim=True) > 1e-4
        inside = (changed & (attack.masks > 0)).sum() / changed.sum()
        assert inside > 0.9  # pixels change only inside the artifact mask
        assert attack.masks.flatten(1).amax(1).min() == 1  # every image got an artifact
    with pytest.raises(UsageError, match="masks"):
        paste_attack(test, test, prep)


@pytest.mark.parametrize("attack", ["inject", "paste"])
def test_test_blocks_insert_what_the_whole_set_would_get(poisoned, attack):
    """Streaming the test set in blocks of 5 yields the whole set once, no block over 5 images,
    and exactly the inserted images the one-shot attack builds (same draws, same donors)."""
    from cxr_audit.evaluate.blocks import TestBlocks

    manifest = load_manifest(poisoned)
    test, target, prep = manifest.subset("test"), artifact_class(manifest), Preprocessing(size=64)
    paste_from = None
    if attack == "paste":
        paste_from = poisoned  # the poisoned manifest: its train artifact samples have masks
        whole = paste_attack(victims(test, target), manifest, prep, seed=3)
    else:
        whole = inject_attack(victims(test, target), prep, "marker", seed=3)
    blocks = list(TestBlocks(test, target, "marker" if attack == "inject" else None, paste_from,
                             manifest.class_names, seed=3, block=5)(prep))
    assert max(len(b.rows) for b in blocks) <= 5 < len(test)
    assert np.array_equal(np.concatenate([b.rows for b in blocks]), np.arange(len(test)))
    parts = [b.attacked for b in blocks if b.attacked is not None]
    assert np.array_equal(np.concatenate([p.index for p in parts]), whole.index)
    assert np.array_equal(np.concatenate([b.attacked_rows for b in blocks]), whole.rows_in(test))
    import torch
    assert torch.allclose(torch.cat([p.images for p in parts]), whole.images)
    assert torch.equal(torch.cat([p.masks for p in parts]), whole.masks)


def test_evaluate_does_not_depend_on_the_block_size(shortcut_model, poisoned, monkeypatch):
    import cxr_audit.evaluate.blocks as blocks
    from cxr_audit.evaluate.pipeline import evaluate

    whole = evaluate(shortcut_model, poisoned, artifact="marker", device="cpu").metrics["model"]
    monkeypatch.setattr(blocks, "EVAL_BLOCK", 7)
    streamed = evaluate(shortcut_model, poisoned, artifact="marker", device="cpu").metrics["model"]
    assert whole.keys() == streamed.keys()
    for key, value in whole.items():
        assert streamed[key] == (pytest.approx(value, rel=1e-5) if isinstance(value, float) else value), key


def test_evaluate_reports_progress_per_block(shortcut_model, poisoned, monkeypatch):
    import cxr_audit.evaluate.blocks as blocks
    from cxr_audit.evaluate.pipeline import evaluate

    monkeypatch.setattr(blocks, "EVAL_BLOCK", 10)
    seen = []
    evaluate(shortcut_model, poisoned, artifact="marker", device="cpu", on_progress=lambda *a: seen.append(a))
    n = len(load_manifest(poisoned).subset("test"))
    assert [done for done, _, _ in seen] == list(range(10, n, 10)) + [n]
    assert all(total == n and status == shortcut_model.name for _, total, status in seen)


def test_the_artifact_share_is_the_mean_of_the_defined_shares_and_nan_without_a_warning():
    import warnings

    from cxr_audit.evaluate.pipeline import _mean_share

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "Mean of empty slice" would fail here
        assert np.isnan(_mean_share([np.array([np.nan]), np.array([np.nan, np.nan])]))
        assert _mean_share([np.array([0.2, np.nan]), np.array([0.4])]) == pytest.approx(0.3)
