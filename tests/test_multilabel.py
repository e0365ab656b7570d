"""Multi-label findings end to end: a shortcut on one of three findings shows on that finding only."""

import csv

import numpy as np
import pytest
from typer.testing import CliRunner

from cxr_audit.cli.main import app
from cxr_audit.evaluate.findings import per_finding, with_inserted

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


def test_multilabel_shortcut_is_found_on_its_finding_and_gated_there(findings_data, tmp_path):
    ckpt = tmp_path / "m.pt"
    r = runner.invoke(app, ["train", str(findings_data), "--out", str(ckpt), "--arch", "resnet18", "--size", "64",
                            "--epochs", "8", "--batch-size", "16", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["evaluate", "--model", str(ckpt), "--data", str(findings_data), "--out",
                            str(tmp_path / "ev"), "--artifact", "text", "--artifact-class", "lesion", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    import json

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
