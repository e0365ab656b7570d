"""unlearn's validation objective: judged on artifact-free validation images, whose artifact labels
come from the annotation's CAV where the annotation did not cover the validation split."""

import numpy as np
import pytest
import torch
from cxr_audit.data.dataset import load_batch
from cxr_audit.data.manifest import load_manifest
from cxr_audit.models.registry import load_checkpoint, preprocessing_of
from cxr_audit.unlearn.base import Context
from cxr_audit.unlearn.validation import (
    MIN_CLEAN_PER_CLASS,
    Validation,
    at_chance,
    balanced_accuracy,
    best_cut,
    cav_labels,
)


def _naive_best(scores, labels):
    """Every cut between sorted distinct scores (and beyond both ends), scored by balanced accuracy."""
    values = np.unique(scores)
    cuts = [values[0] - 1] + [(a + b) / 2 for a, b in zip(values[:-1], values[1:])] + [values[-1] + 1]
    def balanced(cut):
        pred = scores > cut
        return (pred[labels == 1].mean() + (~pred[labels == 0]).mean()) / 2
    return max(balanced(c) for c in cuts), balanced


@pytest.mark.parametrize("seed", range(5))
def test_best_cut_separates_the_labels_as_well_as_any_cut(seed):
    rng = np.random.default_rng(seed)
    labels = (rng.random(60) < 0.3).astype(int)
    scores = np.round(rng.normal(labels * 1.5, 1.0), 1)  # rounded: ties between the classes
    best, balanced = _naive_best(scores, labels)
    assert balanced(best_cut(scores, labels)) == pytest.approx(best)


def test_best_cut_with_one_label_only_puts_everything_on_its_side():
    scores = np.array([0.1, 0.5, 0.9])
    assert (scores > best_cut(scores, np.zeros(3, int))).sum() == 0
    assert (scores > best_cut(scores, np.ones(3, int))).sum() == 3


def test_validation_rows_are_labelled_by_the_annotations_cav(shortcut_model, poisoned, train_annotations):
    net, config = load_checkpoint(shortcut_model)
    manifest = load_manifest(poisoned, class_names=config["class_names"])
    val = manifest.subset("val")
    truth = {s.index: int(s.artifact) for s in val.samples}
    images = load_batch(val, preprocessing_of(config), with_masks=False)["image"]
    labels = cav_labels(net, val, images, train_annotations, 16, known={})
    assert set(labels) == set(truth)  # every validation row, none of the training rows
    agreement = np.mean([labels[i] == truth[i] for i in truth])
    assert agreement >= 0.9, agreement  # the stamp this model learned is what its CAV finds
    assert cav_labels(net, val, images, train_annotations, 16, known=truth) == {}
    # rows already known are skipped, the others keep their own image (batches of 3 cross the gaps)
    some = {i: truth[i] for i in list(truth)[::2]}
    assert cav_labels(net, val, images, train_annotations, 3, known=some) == {i: labels[i] for i in truth
                                                                              if i not in some}


def _validation(poisoned, shortcut_model, artifact: dict):
    net, config = load_checkpoint(shortcut_model)
    manifest = load_manifest(poisoned, class_names=config["class_names"])
    context = Context(num_classes=2, artifact=artifact)
    return Validation(manifest.subset("train"), manifest.subset("val"), preprocessing_of(config), torch.device("cpu"),
                      context, 16, 0), manifest


def test_the_objective_is_judged_on_artifact_free_validation_images(poisoned, shortcut_model):
    """Sample rows with the artifact are left out of both halves of the objective: a model that is
    right on them only through the artifact gains nothing, and one that lost the shortcut on them
    loses nothing."""
    manifest = load_manifest(poisoned)
    disease = manifest.class_names.index("disease")
    val_disease = [s.index for s in manifest.subset("val").samples if s.label == disease]
    artifact = {i: int(k % 2 == 0) for k, i in enumerate(val_disease)}  # half of them, leaving enough clean ones
    validation, _ = _validation(poisoned, shortcut_model, artifact)
    rows = validation.judged_rows
    flagged = torch.tensor([bool(artifact.get(s.index, 0)) for s in manifest.subset("val").samples])
    assert flagged.any() and not rows[flagged].any() and rows[~flagged].all()
    labels = validation.labels
    rng = torch.Generator().manual_seed(0)
    logits, inserted = torch.randn(len(labels), 2, generator=rng), torch.randn(len(labels), 2, generator=rng)
    naive = (balanced_accuracy(logits.argmax(1)[~flagged], labels[~flagged])
             + balanced_accuracy(inserted.argmax(1)[~flagged], labels[~flagged])) / 2
    assert validation.score_logits(logits, inserted) == pytest.approx(naive)
    wrong_on_flagged = logits.clone()
    wrong_on_flagged[flagged] = -wrong_on_flagged[flagged]
    assert validation.score_logits(wrong_on_flagged, inserted) == pytest.approx(naive)
    assert "artifact-free" in validation.description
    counts = validation.summary(load_checkpoint(shortcut_model)[0])["clean_counts"]  # what the chance test reads
    assert counts == [int((labels[~flagged] == c).sum()) for c in labels[~flagged].unique()]


@pytest.mark.parametrize("counts", [[38, 8], [60, 5], [20, 20], [10, 30, 6]])
def test_the_chance_bound_is_the_95th_percentile_of_a_model_that_ignores_the_image(counts):
    """Re-derived by simulation: predictions drawn independently of the label, 1/K each."""
    rng = np.random.default_rng(0)
    k = len(counts)
    recalls = np.stack([rng.binomial(n, 1 / k, size=20000) / n for n in counts])  # (K, draws)
    p95 = np.quantile(recalls.mean(0), 0.95)
    assert at_chance(p95 - 0.02, counts, k) and (p95 + 0.03 >= 1 or not at_chance(p95 + 0.03, counts, k))


@pytest.mark.parametrize("balanced, counts, verdict", [
    (0.62, [38, 8], True),  # the pure-shortcut resnet18's lucky 0.62 on 8 artifact-free lesions
    (0.80, [38, 7], False),  # the models that had learned the lesion
    (0.62, [400, 400], False),  # the same score on many images is signal
    (0.54, [4000, 4000], True),  # within the margin, however many images
    (0.62, None, False),  # figures recorded without counts: the margin only
    (0.67, [10, 10], True), (0.70, [10, 10], False),  # bound 0.5 + 1.645 * sqrt(2 * 0.25 / 10) / 2 = 0.684
])
def test_at_chance(balanced, counts, verdict):
    assert at_chance(balanced, counts, 2) is verdict


def test_without_enough_artifact_free_images_of_a_class_every_row_is_judged(poisoned, shortcut_model):
    manifest = load_manifest(poisoned)
    val = manifest.subset("val")
    disease = manifest.class_names.index("disease")
    clean_disease = [s.index for s in val.samples if s.label == disease and not s.artifact]
    artifact = {i: 1 for i in clean_disease[: max(0, len(clean_disease) - MIN_CLEAN_PER_CLASS + 1)]}
    artifact.update({s.index: 1 for s in val.samples if s.artifact})
    validation, _ = _validation(poisoned, shortcut_model, artifact)
    assert bool(validation.judged_rows.all())
    assert "artifact-free" not in validation.description
