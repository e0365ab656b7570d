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
    artifact_free_share,
    at_chance,
    at_most_expected_clean,
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


def test_validation_rows_are_capped_at_the_artifact_free_share_of_their_class(shortcut_model, poisoned,
                                                                             train_annotations):
    """With the training split's shares, a class labels no more of its validation rows artifact-free
    than its share allows, and keeps the lowest-scoring ones; a class without a share is as before."""
    net, config = load_checkpoint(shortcut_model)
    manifest = load_manifest(poisoned, class_names=config["class_names"])
    val = manifest.subset("val")
    batch = load_batch(val, preprocessing_of(config), with_masks=False)
    classes = batch["label"].tolist()
    disease = manifest.class_names.index("disease")
    plain = cav_labels(net, val, batch["image"], train_annotations, 16, known={})
    clean_disease = [s.index for s in val.samples if s.label == disease and plain[s.index] == 0]
    assert len(clean_disease) >= 2  # else the cap below has nothing to cut
    share = {disease: (len(clean_disease) - 1) / classes.count(disease)}  # one fewer than the CAV labels clean
    capped = cav_labels(net, val, batch["image"], train_annotations, 16, {}, classes, share)
    dropped = [i for i in plain if plain[i] != capped[i]]
    assert len(dropped) == 1 and capped[dropped[0]] == 1 and dropped[0] in clean_disease
    others = [s.index for s in val.samples if s.label != disease]
    assert all(capped[i] == plain[i] for i in others)
    none_clean = cav_labels(net, val, batch["image"], train_annotations, 16, {}, classes, {disease: 0.0})
    assert all(none_clean[s.index] == 1 for s in val.samples if s.label == disease)


def test_at_most_expected_clean_keeps_the_lowest_scores_of_each_capped_class():
    rng = np.random.default_rng(0)
    scores, classes = rng.normal(size=40), np.repeat([0, 1], 20)
    labels = (scores > 0.5).astype(int)
    capped = at_most_expected_clean(labels, scores, classes, {1: 0.15})
    assert (capped[classes == 0] == labels[classes == 0]).all()  # no share given: untouched
    clean = np.flatnonzero((capped == 0) & (classes == 1))
    assert len(clean) == min(3, int(((labels == 0) & (classes == 1)).sum()))  # floor(0.15 * 20)
    ones = np.flatnonzero(classes == 1)
    assert set(clean) == set(ones[np.argsort(scores[ones])][:3])  # the three lowest of the class
    assert (capped >= labels).all()  # only ever adds the artifact label
    assert (at_most_expected_clean(labels, scores, classes, {0: 1.0, 1: 1.0}) == labels).all()


def test_artifact_free_share_counts_the_labelled_samples_of_each_class(poisoned):
    manifest = load_manifest(poisoned)
    train = manifest.subset("train")
    disease = manifest.class_names.index("disease")
    labelled = {s.index: int(s.artifact) for s in train.samples}
    share = artifact_free_share(train, labelled)
    rows = [s for s in train.samples if s.label == disease]
    assert share[disease] == pytest.approx(np.mean([not s.artifact for s in rows]))
    assert share[disease] < 0.5 < share[1 - disease]  # the stamp is on the disease class
    first = train.samples[0]
    assert artifact_free_share(train, {first.index: 1}) == {first.label: 0.0}  # unlabelled samples do not count
    binary = artifact_free_share(train, labelled, finding=disease)  # multi-label: has the finding or not
    assert binary[1] == pytest.approx(share[disease])


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


@pytest.mark.parametrize("tries", [2, 7])
def test_the_bound_for_the_best_of_several_tries_is_the_95th_percentile_of_their_maximum(tries):
    """A sweep keeps its luckiest run: the bound (Šidák) is re-derived from the maximum of
    ``tries`` independent chance-level scores."""
    rng = np.random.default_rng(1)
    counts = [38, 7]
    recalls = np.stack([rng.binomial(n, 0.5, size=(20000, tries)) / n for n in counts])  # (K, draws, tries)
    p95 = np.quantile(recalls.mean(0).max(1), 0.95)
    assert at_chance(p95 - 0.02, counts, 2, tries) and not at_chance(p95 + 0.03, counts, 2, tries)
    assert not at_chance(p95 - 0.02, counts, 2)  # the one-measurement bound would take the luck for signal


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
