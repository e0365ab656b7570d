"""unlearn + evaluate end to end on the planted text shortcut: the shortcut measurably shrinks,
the checkpoint records how it was made, and bad requests are one-line errors."""

import json

import pytest
import torch
from cxr_audit.cli.main import app
from cxr_audit.evaluate.pipeline import evaluate
from cxr_audit.models.registry import load_checkpoint
from cxr_audit.unlearn.pipeline import unlearn
from typer.testing import CliRunner

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_evaluate_sees_the_shortcut_and_rrr_removes_most_of_it(shortcut_model, rrr_model, poisoned, tmp_path):
    r = run("evaluate", "--model", shortcut_model, "--compare", rrr_model, "--data", poisoned, "--out", tmp_path,
            "--artifact", "text", "--artifact-class", "disease", "--device", "cpu")
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    before, after = metrics["model"], metrics["compare"]
    assert before["artifact_inserted_drop"] >= 0.2  # the planted shortcut is visible
    assert after["artifact_inserted_drop"] <= 0.5 * before["artifact_inserted_drop"]
    assert after["artifact_relevance_share"] <= 0.5 * before["artifact_relevance_share"]
    # 48 test images: one sd of an accuracy is ~0.07, and on an AVX-512 EPYC the same seeds end 3 images
    # (0.0625) lower than on the CI machine; 0.1 still catches a collapse to one class (-0.17 here)
    assert after["accuracy"] >= before["accuracy"] - 0.1
    assert "| artifact_inserted_accuracy |" in (tmp_path / "metrics.md").read_text()


def test_checkpoint_records_method_and_provenance(rrr_model, shortcut_model):
    _, config = load_checkpoint(rrr_model)
    payload = torch.load(rrr_model, weights_only=True)
    record = payload["extra"]["unlearn"]
    assert record["method"] == "rrr" and record["lambda"] == 100
    assert record["source_checkpoint"].endswith(shortcut_model.name)
    assert "torch" in payload["extra"]["versions"]


def test_lambda_sweep_is_recorded_and_picks_from_the_grid(shortcut_model, poisoned, tmp_path):
    # keep_worse: this tests the sweep's record, not the refusal (whether 1 epoch of RRR beats the input
    # depends on the CPU's rounding here, and a refused result would fall back to DFR's own grid)
    result = unlearn(shortcut_model, poisoned, tmp_path / "m.pt", "rrr", lambdas=[1.0, 100.0], epochs=1,
                     device="cpu", keep_worse=True)
    assert result.fallback_from is None
    assert [row["lambda"] for row in result.sweep] == [1.0, 100.0]
    assert result.lambda_ in (1.0, 100.0)
    assert torch.load(tmp_path / "m.pt", weights_only=True)["extra"]["unlearn"]["lambda_sweep"]


def test_pclarc_checkpoint_loads_with_its_projection(shortcut_model, poisoned, tmp_path):
    from cxr_audit.annotate.pipeline import annotate
    from cxr_audit.scan.pipeline import scan

    s = scan(shortcut_model, poisoned, tmp_path / "s.h5", split="train", layers=["layer3"], device="cpu").path
    annotate(s, tmp_path / "a.h5", from_column="artifact", masks=False, device="cpu")
    # keep_worse: this tests how a projection is saved and loaded, not whether pclarc is kept (on this
    # phantom model, judged on artifact-free validation images, it is refused and a fallback is written)
    unlearn(shortcut_model, poisoned, tmp_path / "p.pt", "pclarc", annotations=tmp_path / "a.h5", device="cpu",
            keep_worse=True)
    model, config = load_checkpoint(tmp_path / "p.pt")
    assert config["projection"]["layer"] == "layer3"
    assert model.layer3._forward_hooks  # re-installed on load: every command sees the projected model
    m = evaluate(tmp_path / "p.pt", poisoned, artifact="text", artifact_class_name="disease",
                 annotations=tmp_path / "a.h5", device="cpu").metrics["model"]
    assert 0 <= m["tcav_score"] <= 1 and m["n"] > 0


def test_missing_inputs_are_one_line_errors(shortcut_model, poisoned, tmp_path):
    r = run("unlearn", "--model", shortcut_model, "--data", poisoned, "--out", tmp_path / "x.pt",
            "--method", "rrclarc", "--device", "cpu")
    assert r.exit_code == 2 and "--annotations" in r.output and "Traceback" not in r.output
    r = run("unlearn", "--model", tmp_path / "nope.pt", "--data", poisoned, "--out", tmp_path / "x.pt")
    assert r.exit_code == 1 and "not found" in r.output
    r = run("evaluate", "--model", shortcut_model, "--data", poisoned, "--out", tmp_path, "--artifact", "text",
            "--artifact-class", "pneumonia")
    assert r.exit_code == 2 and "not a class" in r.output


def test_restarts_keep_the_chosen_run_which_its_own_seed_reproduces(shortcut_model, poisoned, tmp_path):
    from cxr_audit.unlearn.choice import choose_run

    # keep_worse: this tests which run is kept, not the refusal
    result = unlearn(shortcut_model, poisoned, tmp_path / "r.pt", "augment", restarts=2, epochs=1, device="cpu",
                     keep_worse=True, fallback=None)
    assert [row["seed"] for row in result.sweep] == [0, 1]
    chosen = [row for row in result.sweep if row.get("chosen")]
    assert len(chosen) == 1 and chosen[0] is choose_run(result.sweep)
    assert result.after["objective"] == pytest.approx(chosen[0]["objective"])  # the kept weights are that run's
    assert result.after["chosen_from"] == 2  # the chance test allows for the best of two
    record = torch.load(tmp_path / "r.pt", weights_only=True)["extra"]["unlearn"]
    assert record["paste_probability"]["healthy"] > 0.5  # the kept run's own record, not an empty one
    # the restart's seed reaches the data order and augment's pastes: one run with that seed is the same model
    single = unlearn(shortcut_model, poisoned, tmp_path / "s.pt", "augment", restarts=1, seed=chosen[0]["seed"],
                     epochs=1, device="cpu", keep_worse=True, fallback=None)
    assert not single.sweep
    kept, alone = (torch.load(tmp_path / name, weights_only=True)["state_dict"] for name in ("r.pt", "s.pt"))
    assert all(torch.allclose(kept[k].float(), alone[k].float()) for k in kept)
    other = unlearn(shortcut_model, poisoned, tmp_path / "o.pt", "augment", restarts=1, seed=1 - chosen[0]["seed"],
                    epochs=1, device="cpu", keep_worse=True, fallback=None)
    assert other.after["objective"] == pytest.approx(result.sweep[1 - result.sweep.index(chosen[0])]["objective"])


def test_the_cli_shows_every_restart_and_marks_the_kept_one(shortcut_model, poisoned, tmp_path):
    r = run("unlearn", "--model", shortcut_model, "--data", poisoned, "--out", tmp_path / "m.pt", "--method", "none",
            "--restarts", "2", "--epochs", "2", "--device", "cpu", "--keep-worse", "--fallback", "none")
    assert r.exit_code == 0, r.output
    assert "2 restarts (seeds 0–1)" in r.output and r.output.count("←") == 1
    assert "restarts" in r.output and "λ sweep" not in r.output  # no λ column for a method without one
    rows = torch.load(tmp_path / "m.pt", weights_only=True)["extra"]["unlearn"]["lambda_sweep"]
    assert [row["best_epoch"] for row in rows] == [2, 2]  # restarts are judged by their final weights
    r = run("unlearn", "--model", shortcut_model, "--data", poisoned, "--out", tmp_path / "n.pt", "--restarts", "0")
    assert r.exit_code == 2 and "Traceback" not in r.output
