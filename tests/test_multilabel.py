"""Multi-label findings end to end: a shortcut on one of three findings shows on that finding only."""

import csv
import json

import numpy as np
import pytest
from cxr_audit.cli.main import app
from cxr_audit.evaluate.findings import per_finding, with_inserted
from typer.testing import CliRunner

runner = CliRunner()


def test_per_finding_metrics_and_inserted_drop_are_per_finding():
    labels = np.array([[1, 0], [1, 1], [0, 1], [0, 0]])
    probs = np.array([[0.9, 0.2], [0.8, 0.7], [0.1, 0.6], [0.2, 0.4]])
    findings = per_finding(probs, labels, ["A", "B"])
    assert findings["A"]["auroc"] == 1.0 and findings["B"]["auroc"] == 1.0
    assert findings["A"]["accuracy"] == 1.0 and findings["A"]["prevalence"] == 0.5
    # the artifact, inserted into the A-negatives (rows 2, 3), pushes A up and leaves B alone
    with_inserted(findings, probs, np.array([[0.95, 0.6], [0.9, 0.4]]), np.array([2, 3]), labels, ["A", "B"])
    assert findings["A"]["artifact_inserted_auroc_drop"] > 0.4
    assert findings["B"]["artifact_inserted_auroc_drop"] == 0.0
    assert np.isnan(per_finding(probs, np.ones_like(labels), ["A", "B"])["A"]["auroc"])


@pytest.fixture(scope="module")
def findings_data(poisoned, tmp_path_factory):
    """Three findings on the poisoned phantoms: 'lesion' (= disease, text stamp in 90 % of its
    train/val images) and two findings drawn at random, 'tube' and 'effusion'."""
    out = tmp_path_factory.mktemp("findings")
    rng = np.random.default_rng(0)
    rows = list(csv.DictReader(open(poisoned)))
    for r in rows:
        found = (["lesion"] if r["label"] == "disease" else []) + [f for f in ("tube", "effusion") if rng.random() < 0.5]
        r["label"] = "|".join(found)
        r["path"] = str((poisoned.parent / r["path"]).resolve())
        for key in ("mask", "artifact_mask"):
            if r.get(key):
                r[key] = str((poisoned.parent / r[key]).resolve())
    with open(out / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out / "manifest.csv"


@pytest.fixture(scope="module")
def findings_model(findings_data, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("findings_model") / "m.pt"
    r = runner.invoke(app, ["train", str(findings_data), "--out", str(ckpt), "--arch", "resnet18", "--size", "64",
                            "--epochs", "8", "--batch-size", "16", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    return ckpt


def test_scan_and_reveal_per_finding(findings_data, findings_model, tmp_path):
    """`scan --target finding:NAME` explains that output; `reveal --target finding:NAME` ranks
    concepts within its positives: the stamp's concepts retrieve the stamped images for 'lesion'."""
    from sklearn.metrics import roc_auc_score

    scan = tmp_path / "s.h5"
    r = runner.invoke(app, ["scan", str(findings_data), "--model", str(findings_model), "--out", str(scan),
                            "--target", "finding:lesion,finding:tube", "--split", "train", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    import h5py

    with h5py.File(scan) as f:
        assert f["samples/label"].shape[1] == 3  # multi-hot, as the model is multi-label
        assert (f["targets/finding:lesion"][:] == ["effusion", "lesion", "tube"].index("lesion")).all()
    artifact = {i: int(r["artifact"] or 0) for i, r in enumerate(csv.DictReader(open(findings_data)))}
    for finding in ("lesion", "tube"):
        out = tmp_path / f"rev-{finding}"
        r = runner.invoke(app, ["reveal", str(scan), "--out", str(out), "--target", f"finding:{finding}",
                                "--no-references"])
        assert r.exit_code == 0, r.output
        result = json.loads((out / "reveal.json").read_text())
        assert result["class_names"] == [f"no {finding}", finding]
        if finding == "lesion":
            y = [artifact[i] for i in result["sample_ids"]]
            best = max(roc_auc_score(y, c["scores"]["cav"]) for c in result["concepts"][:3] if "cav" in c["scores"])
            assert best > 0.9, best
    r = runner.invoke(app, ["reveal", str(scan), "--out", str(tmp_path / "x"), "--target", "finding:effusion"])
    assert r.exit_code == 2 and "scan with --target finding:effusion" in r.output
    _annotate_per_finding(scan, tmp_path)


def _annotate_per_finding(scan, tmp_path):
    """`annotate --target finding:lesion` fits the masks' CAV within lesion-positives and -negatives
    (not within the 8 combinations of findings); the masks cover the stamp."""
    import h5py
    from cxr_audit.annotate.pipeline import _task_classes

    hot = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0]], np.uint8)
    assert np.array_equal(_task_classes(hot, "finding:lesion", ["effusion", "lesion", "tube"]), [0, 1, 1])
    assert _task_classes(hot, None, ["effusion", "lesion", "tube"]) is hot
    out = tmp_path / "ann.h5"
    r = runner.invoke(app, ["annotate", str(scan), "--out", str(out), "--from-column", "artifact",
                            "--target", "finding:lesion", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    with h5py.File(out) as f:
        options, quality = (json.loads(f["meta"].attrs[k]) for k in ("options", "quality"))
    assert options["target"] == "finding:lesion" and quality["mask_cav"] == "within-class"
    assert quality["masks_with_truth"] > 0 and quality["mask_iou"] > 0.3, quality
    for target in ("finding:nope", "pred"):
        bad = runner.invoke(app, ["annotate", str(scan), "--out", str(tmp_path / "bad.h5"), "--from-column",
                                  "artifact", "--target", target, "--no-masks"])
        assert bad.exit_code == 2 and "Traceback" not in bad.output and not (tmp_path / "bad.h5").exists(), bad.output


def test_multilabel_shortcut_is_found_on_its_finding_and_gated_there(findings_data, findings_model, tmp_path):
    ckpt = findings_model
    r = runner.invoke(app, ["evaluate", "--model", str(ckpt), "--data", str(findings_data), "--out",
                            str(tmp_path / "ev"), "--artifact", "text", "--artifact-class", "lesion", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())["metrics"]["model"]
    drops = {f: metrics[f"artifact_inserted_auroc_drop.{f}"] for f in ("lesion", "tube", "effusion")}
    assert drops["lesion"] > 0.2, drops
    assert abs(drops["tube"]) < 0.15 and abs(drops["effusion"]) < 0.15, drops
    assert "auroc.lesion" in (tmp_path / "ev" / "metrics.md").read_text()
    (tmp_path / "gate.toml").write_text(f'''[gate]
model = "{ckpt}"
data = "{findings_data}"
artifact = "text"
artifact_class = "lesion"
device = "cpu"
[gate.thresholds]
max_artifact_inserted_auroc_drop.lesion = 0.15
max_artifact_inserted_auroc_drop.tube = 0.15
max_artifact_inserted_auroc_drop.effusion = 0.15
''')
    r = runner.invoke(app, ["gate", "--config", str(tmp_path / "gate.toml"), "--out", str(tmp_path / "gate")])
    assert r.exit_code == 1, r.output
    checks = {c["metric"]: c["passed"] for c in json.loads((tmp_path / "gate" / "gate.json").read_text())["checks"]}
    assert checks == {"artifact_inserted_auroc_drop.lesion": False, "artifact_inserted_auroc_drop.tube": True,
                      "artifact_inserted_auroc_drop.effusion": True}


def test_unlearn_refuses_multilabel_models_in_one_line(findings_data, findings_model, tmp_path):
    r = runner.invoke(app, ["unlearn", "--model", str(findings_model), "--data", str(findings_data), "--out",
                            str(tmp_path / "u.pt"), "--method", "rrr", "--lambda", "10", "--device", "cpu"])
    assert r.exit_code == 2 and "multi-label" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "u.pt").exists()


def test_unlearn_removes_one_findings_shortcut_with_augment(findings_data, findings_model, tmp_path):
    """--target finding:lesion: the stamp is pasted into lesion-negative images; the inserted-AUROC
    drop of 'lesion' shrinks, the checkpoint records the finding, and methods that cannot act on
    one finding are refused in one line."""
    out = tmp_path / "u.pt"
    r = runner.invoke(app, ["unlearn", "--model", str(findings_model), "--data", str(findings_data), "--out", str(out),
                            "--target", "finding:lesion", "--epochs", "2", "--device", "cpu", "--keep-worse"])
    assert r.exit_code == 0, r.output
    import torch

    record = torch.load(out, weights_only=True)["extra"]["unlearn"]
    assert record["target"] == "finding:lesion" and record["paste_probability"]["not lesion"] > 0.5
    for args, message in ((["--method", "jtt", "--target", "finding:lesion"], "does not support multi-label"),
                          ([], "--target finding:NAME"), (["--target", "finding:nope"], "finding:NAME")):
        bad = runner.invoke(app, ["unlearn", "--model", str(findings_model), "--data", str(findings_data), "--out",
                                  str(tmp_path / "x.pt"), "--device", "cpu", *args])
        assert bad.exit_code == 2 and message in bad.output and "Traceback" not in bad.output, bad.output
    drops = {}
    for name, ckpt in (("before", findings_model), ("after", out)):
        ev = runner.invoke(app, ["evaluate", "--model", str(ckpt), "--data", str(findings_data), "--out",
                                 str(tmp_path / name), "--artifact", "text", "--artifact-class", "lesion",
                                 "--device", "cpu"])
        assert ev.exit_code == 0, ev.output
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())["metrics"]["model"]
        drops[name] = metrics["artifact_inserted_auroc_drop.lesion"]
    assert drops["before"] >= 0.1
    assert drops["after"] <= 0.5 * drops["before"]


def _inserted_drop(model, data, out) -> float:
    ev = runner.invoke(app, ["evaluate", "--model", str(model), "--data", str(data), "--out", str(out),
                             "--artifact", "text", "--artifact-class", "lesion", "--device", "cpu"])
    assert ev.exit_code == 0, ev.output
    return json.loads((out / "metrics.json").read_text())["metrics"]["model"]["artifact_inserted_auroc_drop.lesion"]


def test_dfr_refits_only_the_chosen_findings_row(findings_data, findings_model, tmp_path):
    """DFR on one finding: the head row of 'lesion' is refitted on (lesion × stamp)-balanced
    features, the rows of the other findings and the backbone stay bit for bit, and lesion's
    inserted-AUROC drop shrinks."""
    import torch

    out = tmp_path / "dfr.pt"
    r = runner.invoke(app, ["unlearn", "--model", str(findings_model), "--data", str(findings_data), "--out", str(out),
                            "--method", "dfr", "--target", "finding:lesion", "--device", "cpu", "--keep-worse"])
    assert r.exit_code == 0, r.output
    before, after = (torch.load(p, weights_only=True) for p in (findings_model, out))
    names = after["config"]["class_names"]
    lesion = names.index("lesion")
    w0, w1 = before["state_dict"]["fc.weight"], after["state_dict"]["fc.weight"]
    assert not torch.equal(w0[lesion], w1[lesion])
    others = [k for k in range(len(names)) if k != lesion]
    assert torch.equal(w0[others], w1[others])
    assert torch.equal(before["state_dict"]["fc.bias"][others], after["state_dict"]["fc.bias"][others])
    assert all(torch.equal(v, after["state_dict"][k]) for k, v in before["state_dict"].items() if not k.startswith("fc."))
    record = after["extra"]["unlearn"]
    assert record["target"] == "finding:lesion" and "C" in record
    assert _inserted_drop(out, findings_data, tmp_path / "after") < _inserted_drop(findings_model, findings_data,
                                                                                    tmp_path / "before")
