"""DFR, JTT and reactive P-ClArC (issue #15), the sweep's failure path and unlearn's refusal to
present a worse model as fixed."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from cxr_audit.cli.main import app
from cxr_audit.errors import UsageError
from cxr_audit.models.architectures import build_model, names
from cxr_audit.models.head import find_head, penultimate_features
from cxr_audit.models.projection import ConceptProjection
from cxr_audit.unlearn import MITIGATIONS, get_mitigation
from cxr_audit.unlearn.dfr import fit_head
from typer.testing import CliRunner

runner = CliRunner()


@pytest.mark.parametrize("arch", names())
def test_the_head_of_every_architecture_is_found_and_its_input_gives_the_logits(arch):
    torch.manual_seed(0)
    model = build_model(arch, 3, 1, 64).eval()
    x = torch.randn(2, 1, 64, 64)
    name, head = find_head(model, x)
    feats = penultimate_features(model, head, x, torch.device("cpu"))
    with torch.no_grad():
        assert torch.allclose(head(feats), model(x), atol=1e-5), name


def test_a_model_whose_output_is_not_a_linear_layer_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2), nn.Softmax(1))
    with pytest.raises(UsageError, match="linear layer"):
        find_head(model, torch.randn(2, 1, 4, 4))


def _shortcut_features(n=400, seed=0):
    """Feature 0 carries the class weakly, feature 1 is an artifact present in 90 % of class 1
    and (as counterfactual copies) in class 0 too; features 2.. are noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    art = (y == 1) & (rng.random(n) < 0.9)
    x = rng.normal(0, 1, (n, 6))
    x[:, 0] += 1.5 * y
    x[:, 1] += 4 * art
    # counterfactuals: every artifact-free sample again with the artifact
    clean = np.flatnonzero(~art)
    xc = x[clean].copy()
    xc[:, 1] += 4
    feats = np.concatenate([x, xc])
    labels = np.concatenate([y, y[clean]])
    groups = 2 * labels + np.concatenate([art.astype(int), np.ones(len(clean), int)])
    return torch.from_numpy(feats).float(), labels, groups


def test_dfr_head_ignores_the_artifact_once_groups_are_balanced():
    feats, labels, groups = _shortcut_features()
    weight, bias = fit_head(feats, labels, groups, c=1.0, seed=0, num_classes=2)
    direction = weight[1] - weight[0]  # the logit difference's weights
    assert direction[0] > 0.5  # the class feature is used ...
    assert abs(direction[1]) < 0.25 * direction[0]  # ... the artifact hardly
    # the same regression on the real samples alone (class-balanced; no group "class 0 with the
    # artifact" exists) leans on the artifact
    w0, _ = fit_head(feats[:400], labels[:400], labels[:400], 1.0, 0, 2)
    assert (w0[1] - w0[0])[1] > 2 * abs(direction[1])


def test_dfr_folds_the_standardisation_into_raw_feature_weights():
    """The written head gives the same decision as the regression on standardised features."""
    from sklearn.linear_model import LogisticRegression

    feats, labels, groups = _shortcut_features()
    weight, bias = fit_head(feats, labels, groups, c=0.3, seed=0, num_classes=2)
    x = feats.double().numpy()
    mean, std = x.mean(0), x.std(0)
    lr = LogisticRegression(C=0.3, l1_ratio=1.0, solver="liblinear", max_iter=2000, random_state=0)
    from cxr_audit.training.balance import balanced_weights

    lr.fit((x - mean) / std, labels, sample_weight=balanced_weights(groups))
    ours = (feats @ weight.T + bias).argmax(1).numpy()
    assert (ours == lr.predict((x - mean) / std)).mean() == 1.0


def test_reactive_projection_leaves_samples_without_the_artifact_untouched():
    v = torch.tensor([1.0, 0.0])
    hook = ConceptProjection(v, reference=0.0, threshold=1.0)
    a = torch.zeros(3, 2, 2, 2)
    a[1, 0] = 5.0  # the artifact along v in sample 1 only
    a[2, 1] = 3.0  # class evidence orthogonal to v
    out = hook(None, None, a)
    assert torch.equal(out[0], a[0]) and torch.equal(out[2], a[2])  # inert where nothing is detected
    assert float(out[1, 0].amax()) == pytest.approx(0.0)  # shifted to the clean reference
    always = ConceptProjection(v, reference=-1.0)(None, None, a)
    assert not torch.equal(always[0], a[0])  # plain P-ClArC shifts every sample


def test_every_mitigation_checks_its_options():
    for cls in MITIGATIONS.values():
        with pytest.raises(UsageError, match="no option"):
            cls(not_an_option=1)
    assert get_mitigation("dfr", C="0.5").options["C"] == 0.5
    assert get_mitigation("rrclarc", per_position="false").options["per_position"] is False
    with pytest.raises(UsageError, match="expected float"):
        get_mitigation("jtt", upweight="many")


def test_jtt_upsamples_exactly_the_error_set(shortcut_model, poisoned):
    from cxr_audit.data.manifest import load_manifest
    from cxr_audit.models.registry import load_checkpoint, preprocessing_of
    from cxr_audit.unlearn.base import Context, TrainingData
    from cxr_audit.unlearn.jtt import JTT, training_errors

    model, config = load_checkpoint(shortcut_model)
    train = load_manifest(poisoned, config["class_names"]).subset("train")
    data = TrainingData(train, preprocessing_of(config), torch.device("cpu"), 32)
    errors = training_errors(model, data)
    # a naive re-count: predictions one image at a time
    from cxr_audit.data.dataset import load_batch

    batch = load_batch(train, data.prep, with_masks=False)
    with torch.no_grad():
        naive = np.array([int(model.eval()(batch["image"][i:i + 1]).argmax()) != int(batch["label"][i])
                          for i in range(len(train))])
    assert (errors == naive).all()
    jtt = JTT(upweight="20")
    groups = jtt.training_groups(model, Context(num_classes=2, data=data))
    weights = jtt.sample_weights(groups)
    assert set(np.unique(weights[groups == 1])) <= {20.0} and set(np.unique(weights[groups == 0])) <= {1.0}


def test_dfr_from_the_cli_changes_only_the_head_and_records_its_choice(shortcut_model, poisoned, tmp_path):
    out = tmp_path / "dfr.pt"
    r = runner.invoke(app, ["unlearn", "--model", str(shortcut_model), "--data", str(poisoned), "--out", str(out),
                            "--method", "dfr", "--device", "cpu", "--keep-worse"])
    assert r.exit_code == 0, r.output
    assert "judged on" in r.output and "C sweep" in r.output
    before = torch.load(shortcut_model, weights_only=True)["state_dict"]
    payload = torch.load(out, weights_only=True)
    after, record = payload["state_dict"], payload["extra"]["unlearn"]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}
    assert record["C"] in MITIGATIONS["dfr"].C_GRID and record["counterfactual"] == "paste"
    assert set(record["before"]) >= {"objective", "clean_balanced_accuracy"} and record["after"]
    assert record["after"]["chosen_from"] == len(MITIGATIONS["dfr"].C_GRID)  # the chance test allows for the sweep
    assert "chosen_from" not in record["before"]
    counts = record["before"]["clean_counts"]  # what the chance test read, shown under the table
    assert len(counts) == 2 and min(counts) > 0
    assert f"artifact-free validation images per class: {counts[0]}/{counts[1]}" in " ".join(r.output.split())


WORSE = {"objective": -1.0, "clean_balanced_accuracy": 0.0, "inserted_balanced_accuracy": 0.0}
BETTER = {"objective": 1.0, "clean_balanced_accuracy": 1.0, "inserted_balanced_accuracy": 1.0}


def test_a_result_worse_than_its_input_is_refused_and_not_written(shortcut_model, poisoned, tmp_path, monkeypatch):
    import cxr_audit.unlearn.pipeline as unlearning

    monkeypatch.setattr(unlearning, "_after", lambda net, extra, validation: WORSE)
    out = tmp_path / "never.pt"
    r = runner.invoke(app, ["unlearn", "--model", str(shortcut_model), "--data", str(poisoned), "--out", str(out),
                            "--method", "dfr", "--option", "C=1", "--device", "cpu"])
    assert r.exit_code == 3, r.output
    assert "worse" in r.output and "nothing was written" in r.output and "Traceback" not in r.output
    assert not out.exists()


def test_a_refused_method_falls_back_to_dfr_without_annotations(shortcut_model, poisoned, tmp_path, monkeypatch):
    import cxr_audit.unlearn.pipeline as unlearning

    calls = []

    def first_worse(net, extra, validation):  # augment's result is refused, DFR's improves
        calls.append(1)
        return WORSE if len(calls) == 1 else BETTER

    monkeypatch.setattr(unlearning, "_after", first_worse)
    # the fixture's model is at chance without the stamp (no fallback then): pretend it is not
    signal = {"objective": 0.0, "clean_balanced_accuracy": 0.9, "inserted_balanced_accuracy": 0.5}
    monkeypatch.setattr(unlearning.Validation, "summary", lambda self, net: signal)
    out = tmp_path / "fallback.pt"
    base = ["unlearn", "--model", str(shortcut_model), "--data", str(poisoned), "--out", str(out), "--epochs", "1",
            "--device", "cpu"]
    r = runner.invoke(app, base + ["--option", "donors=8"])  # augment's option must not reach DFR
    assert r.exit_code == 0, r.output
    assert "augment was refused" in r.output and "trying dfr" in r.output and "after augment was refused" in r.output
    payload = torch.load(out, weights_only=True)
    record = payload["extra"]["unlearn"]
    assert record["method"] == "dfr" and record["fallback_from"] == "augment" and len(calls) == 2
    before = torch.load(shortcut_model, weights_only=True)["state_dict"]
    assert {k for k in before if not torch.equal(before[k], payload["state_dict"][k])} == {"fc.weight", "fc.bias"}

    out.unlink()
    calls.clear()
    r = runner.invoke(app, base + ["--fallback", "none"])
    assert r.exit_code == 3 and "trying" not in r.output and not out.exists(), r.output
    r = runner.invoke(app, base + ["--fallback", "bogus"])
    assert r.exit_code == 2 and "unknown --fallback 'bogus'" in r.output


def test_with_annotations_the_fallbacks_run_in_turn_until_one_is_kept(shortcut_model, poisoned, train_annotations,
                                                                    tmp_path, monkeypatch):
    import cxr_audit.unlearn.pipeline as unlearning

    signal = {"objective": 0.0, "clean_balanced_accuracy": 0.9, "inserted_balanced_accuracy": 0.5}
    calls = []

    def judged(net, extra, validation):  # augment worse, rpclarc no better than the input, DFR better
        calls.append(1)
        return [WORSE, signal, BETTER][len(calls) - 1]

    monkeypatch.setattr(unlearning, "_after", judged)
    monkeypatch.setattr(unlearning.Validation, "summary", lambda self, net: signal)
    out = tmp_path / "chain.pt"
    r = runner.invoke(app, ["unlearn", "--model", str(shortcut_model), "--data", str(poisoned), "--out", str(out),
                            "--annotations", str(train_annotations), "--epochs", "1", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "augment was refused" in r.output and "trying rpclarc" in r.output, r.output
    assert "rpclarc was refused" in r.output and "did not improve" in r.output and "trying dfr" in r.output, r.output
    record = torch.load(out, weights_only=True)["extra"]["unlearn"]
    assert record["method"] == "dfr" and record["fallback_from"] == "augment" and len(calls) == 3


def _judged_unlearn(monkeypatch, model, data, out, before: dict, after: dict, *options: str):
    """`unlearn` from the command line with the validation figures of its input (``before``) and
    of its result (``after``) set, so that only the verdict on them is tested."""
    import cxr_audit.unlearn.pipeline as unlearning

    monkeypatch.setattr(unlearning.Validation, "summary", lambda self, net: before)
    monkeypatch.setattr(unlearning, "_after", lambda net, extra, validation: after)
    return runner.invoke(app, ["unlearn", "--model", str(model), "--data", str(data), "--out", str(out),
                               "--device", "cpu", *options])


@pytest.mark.parametrize("clean, counts", [(0.5, None), (0.62, [38, 8])])  # 0.62 on 8 images: luck
def test_no_fallback_when_the_input_has_no_signal_beyond_the_artifact(shortcut_model, poisoned, tmp_path,
                                                                      monkeypatch, clean, counts):
    at_chance = {"objective": 0.5, "clean_balanced_accuracy": clean, "inserted_balanced_accuracy": 0.5,
                 **({"clean_counts": counts} if counts else {})}
    r = _judged_unlearn(monkeypatch, shortcut_model, poisoned, tmp_path / "x.pt", at_chance, WORSE, "--epochs", "1")
    assert r.exit_code == 3 and "trying" not in r.output and "--balance resample" in r.output, r.output
    assert ("on 38/8 artifact-free validation images" in " ".join(r.output.split())) == bool(counts), r.output


def test_a_result_at_chance_without_the_artifact_is_refused_even_if_the_objective_rose(
        shortcut_model, poisoned, tmp_path, monkeypatch):
    at_chance = {"objective": 0.25, "clean_balanced_accuracy": 0.5, "inserted_balanced_accuracy": 0.0}
    rose = {"objective": 0.5, "clean_balanced_accuracy": 0.5, "inserted_balanced_accuracy": 0.5}
    out = tmp_path / "x.pt"
    r = _judged_unlearn(monkeypatch, shortcut_model, poisoned, out, at_chance, rose, "--epochs", "1")
    assert r.exit_code == 3 and "at chance" in r.output and "--balance resample" in r.output, r.output
    assert not out.exists()


def _figures(objective: float, clean: float) -> dict:
    return {"objective": objective, "clean_balanced_accuracy": clean}


@pytest.mark.parametrize("after, need_gain, verdict", [
    (_figures(0.69, 0.80), False, "made the model worse"),
    (_figures(0.70, 0.80), True, "did not improve the model"),
    (_figures(0.70, 0.80), False, None),
    (_figures(0.75, 0.52), False, "at chance"),
    ({**_figures(0.75, 0.62), "clean_counts": [38, 8]}, False, "at chance"),  # 0.62 on 8 images is luck
    ({**_figures(0.75, 0.78), "clean_counts": [38, 8]}, False, None),
    # the best of DFR's 7 Cs: bound 0.5 + 2.44 sd = 0.75 instead of 0.5 + 1.645 sd = 0.67 on 38/7
    ({**_figures(0.90, 0.70), "clean_counts": [38, 7], "chosen_from": 7}, False, "at chance"),
    ({**_figures(0.90, 0.70), "clean_counts": [38, 7]}, False, None),
    ({**_figures(0.75, 0.78), "clean_counts": [38, 7], "chosen_from": 7}, False, None),
    # robustness bought with more clean accuracy than the objective gained (densenet121's rpclarc)
    (_figures(0.72, 0.63), False, "lost more accuracy without the artifact than it gained"),
    (_figures(0.80, 0.77), False, None),  # 3 points lost: within the sweep's bound
    (_figures(0.80, 0.74), False, None),  # 6 points lost for 10 gained: a trade the objective pays for
    (_figures(0.74, 0.74), False, "lost more accuracy"),  # 6 lost for 4 gained
])
def test_the_refusal_rule(after, need_gain, verdict):
    from cxr_audit.unlearn.pipeline import refusal

    before = _figures(0.70, 0.80)
    got = refusal(before, after, num_classes=2, need_gain=need_gain)
    assert (got is None) if verdict is None else (got is not None and verdict in got), got
    assert refusal({}, {}, 2) is None  # no validation split: nothing to judge on


def test_the_strength_is_the_best_objective_within_the_clean_bound():
    from cxr_audit.unlearn.choice import choose

    def row(lam, objective, clean):
        return {"lambda": lam, "objective": objective, "clean_val_accuracy": clean, "start_clean_val_accuracy": 0.80}

    sweep = [row(1.0, 0.60, 0.80), row(10.0, 0.70, 0.77), row(100.0, 0.90, 0.76)]
    assert choose(sweep) == 10.0  # 100 scores best but lost 4 points
    assert choose(sweep, bounded_only=False) == 100.0
    assert choose([row(1.0, 0.6, 0.5), row(10.0, 0.7, 0.4)]) == 10.0  # none within the bound: all judged
    assert choose([row(10.0, 0.7, 0.8), row(1.0, 0.7, 0.8)]) == 1.0  # a tie goes to the smaller λ


def test_a_result_that_pays_for_its_gain_with_clean_accuracy_is_refused(shortcut_model, poisoned, tmp_path,
                                                                       monkeypatch):
    signal = {"objective": 0.70, "clean_balanced_accuracy": 0.90, "inserted_balanced_accuracy": 0.50}
    traded = {"objective": 0.72, "clean_balanced_accuracy": 0.70, "inserted_balanced_accuracy": 0.74}
    out = tmp_path / "x.pt"
    r = _judged_unlearn(monkeypatch, shortcut_model, poisoned, out, signal, traded,
                        "--method", "dfr", "--option", "C=1", "--fallback", "none")
    assert r.exit_code == 3 and "lost more accuracy without the artifact" in r.output, r.output
    assert "0.900 → 0.700" in r.output and not out.exists()


def test_a_sweep_in_which_every_lambda_diverges_fails_loudly(shortcut_model, poisoned, tmp_path):
    out = tmp_path / "diverged.pt"
    r = runner.invoke(app, ["unlearn", "--model", str(shortcut_model), "--data", str(poisoned), "--out", str(out),
                            "--method", "rrr", "--lambdas", "1e38,1e39", "--epochs", "1", "--device", "cpu"])
    assert r.exit_code != 0 and "diverged" in r.output, r.output
    assert not out.exists()


def test_the_sweep_does_not_swallow_other_errors(shortcut_model, poisoned, tmp_path, monkeypatch):
    import cxr_audit.unlearn.sweep as sweep

    def broken(*args, **kwargs):
        raise RuntimeError("a bug, not a diverging λ")

    monkeypatch.setattr(sweep, "fit", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        from cxr_audit.unlearn.pipeline import unlearn

        unlearn(shortcut_model, poisoned, tmp_path / "x.pt", "rrr", lambdas=[1.0, 10.0], epochs=1, device="cpu")
    assert not (tmp_path / "x.pt").exists()


def test_paste_probabilities_equalise_the_artifact_prevalence_across_classes():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 3000)
    flags = (rng.random(3000) < np.array([0.05, 0.8, 0.3])[labels]).astype(int)
    from cxr_audit.unlearn.augment import paste_probabilities

    q = paste_probabilities(labels, flags, 3)
    after = flags | ((rng.random(3000) < q[labels]) & (flags == 0))  # naive simulation of the pasting
    prevalence = [after[labels == c].mean() for c in range(3)]
    assert max(prevalence) - min(prevalence) < 0.05
    assert q[np.argmax([flags[labels == c].mean() for c in range(3)])] == 0  # the artifact's class: untouched
    assert (paste_probabilities(labels, np.zeros(3000, int), 3) == 0).all()  # no artifact: nothing pasted


def test_augment_pastes_only_into_artifact_free_images_at_their_class_rate():
    from cxr_audit.unlearn.augment import Augment
    from cxr_audit.unlearn.base import Context

    aug = Augment()
    aug.context = Context(num_classes=2, artifact={0: 0, 1: 1, 2: 0, 3: 0})
    aug.q = torch.tensor([1.0, 0.0])  # paste into every clean image of class 0, never into class 1
    aug.donor_images, aug.donor_masks = torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    aug.donor_masks[..., :2, :2] = 1
    aug.generator = torch.Generator().manual_seed(0)
    seen = {}

    def model(images):
        seen["x"] = images
        return images.flatten(1)[:, :2]

    x = torch.zeros(4, 1, 4, 4)
    aug.forward(model, {"index": torch.tensor([0, 1, 2, 3]), "label": torch.tensor([0, 0, 1, 0])}, x)
    pasted = seen["x"][:, 0, :2, :2].amax(dim=(1, 2))
    assert pasted.tolist() == [1.0, 0.0, 0.0, 1.0]  # row 1 already has it, row 2 is class 1
    assert float(seen["x"][:, :, 2:, 2:].abs().sum()) == 0  # outside the mask nothing changes
    assert float(x.abs().sum()) == 0  # the batch itself is not modified in place


def test_augment_from_the_cli_removes_the_reliance_on_the_stamp(shortcut_model, poisoned, tmp_path):
    out = tmp_path / "aug.pt"
    r = runner.invoke(app, ["unlearn", "--model", str(shortcut_model), "--data", str(poisoned), "--out", str(out),
                            "--epochs", "2", "--device", "cpu", "--keep-worse"])  # the default method
    assert r.exit_code == 0, r.output
    record = torch.load(out, weights_only=True)["extra"]["unlearn"]
    assert record["method"] == "augment" and record["paste_probability"]["healthy"] > 0.5
    before = torch.load(shortcut_model, weights_only=True)["state_dict"]
    after = torch.load(out, weights_only=True)["state_dict"]
    assert not torch.equal(before["conv1.weight"], after["conv1.weight"])  # every layer trains
    from cxr_audit.evaluate.pipeline import evaluate

    m0, m1 = (evaluate(c, poisoned, artifact="text", artifact_class_name="disease", device="cpu").metrics["model"]
              for c in (shortcut_model, out))
    assert m0["artifact_inserted_drop"] >= 0.2
    assert m1["artifact_inserted_drop"] <= 0.5 * m0["artifact_inserted_drop"]


def test_dfr_and_jtt_are_inert_without_an_artifact_or_an_error():
    """DFR refuses data where no sample carries the artifact (nothing to unlearn); JTT without
    training errors samples uniformly, i.e. it is plain fine-tuning."""
    from cxr_audit.data.manifest import Manifest, Sample
    from cxr_audit.unlearn.base import Context
    from cxr_audit.unlearn.dfr import DFR
    from cxr_audit.unlearn.jtt import JTT
    from cxr_audit.unlearn.pipeline import _balance

    with pytest.raises(UsageError, match="nothing to unlearn"):
        DFR().check(Context(num_classes=2, artifact={0: 0, 1: 0}))
    train = Manifest([Sample(i, Path(f"{i}.png"), (i % 2,)) for i in range(6)], ["a", "b"])

    class NoErrors(JTT):
        def training_groups(self, model, context):
            return np.zeros(6, int)

    assert _balance("jtt", "none", train, Context(num_classes=2), NoErrors(), None) is None
    with pytest.raises(UsageError, match="sets its own sampling"):
        _balance("jtt", "reweight", train, Context(num_classes=2), NoErrors(), None)
