"""gate: pass on a model without the shortcut, fail on the shortcut model, exit 2 on bad configs;
the JUnit file parses and has one test case per threshold."""

import xml.etree.ElementTree as ET

import pytest
from cxr_audit.cli.main import app
from typer.testing import CliRunner

runner = CliRunner()

# the shortcut model drops ~0.60 when the stamp is pasted, the RRR model 0.17-0.21 depending on
# the CPU's kernels (AVX2 vs AVX-512 change the double-backward numerics): 0.25 separates them
THRESHOLDS = """
[gate.thresholds]
max_artifact_inserted_drop = 0.25
min_accuracy = 0.5
"""


def write_config(tmp_path, model, data, extra="", thresholds=THRESHOLDS):
    cfg = tmp_path / "audit.toml"
    cfg.write_text(f'[gate]\nmodel = "{model}"\ndata = "{data}"\nartifact = "text"\nartifact_class = "disease"\n'
                   f'device = "cpu"\n{extra}\n{thresholds}')
    return cfg


def gate(cfg, out):
    return runner.invoke(app, ["gate", "--config", str(cfg), "--out", str(out)])


def test_gate_fails_the_shortcut_model_with_exit_1_and_junit(shortcut_model, poisoned, tmp_path):
    r = gate(write_config(tmp_path, shortcut_model, poisoned), tmp_path / "out")
    assert r.exit_code == 1, r.output
    suite = ET.parse(tmp_path / "out" / "junit.xml").getroot()
    cases = suite.findall("testcase")
    assert suite.tag == "testsuite" and len(cases) == 2
    failed = {c.get("name") for c in cases if c.find("failure") is not None}
    assert failed == {"max_artifact_inserted_drop"}
    assert "FAIL" in (tmp_path / "out" / "summary.md").read_text()


def test_gate_passes_after_unlearning(rrr_model, poisoned, tmp_path):
    r = gate(write_config(tmp_path, rrr_model, poisoned), tmp_path / "out")
    assert r.exit_code == 0, r.output
    suite = ET.parse(tmp_path / "out" / "junit.xml").getroot()
    assert suite.get("failures") == "0" and suite.get("tests") == "2"


@pytest.mark.parametrize("thresholds, message", [
    ("[gate.thresholds]\nmax_shortcutness = 0.1\n", "unknown threshold"),
    ("[gate.thresholds]\nmax_h1_h2_gap = 0.1\n", "could not compute"),  # phantoms have one source
    ("", "thresholds"),
])
def test_config_errors_exit_2(shortcut_model, poisoned, tmp_path, thresholds, message):
    cfg = write_config(tmp_path, shortcut_model, poisoned, thresholds=thresholds)
    r = gate(cfg, tmp_path / "out")
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output


def test_missing_file_in_config_is_a_usage_error(poisoned, tmp_path):
    r = gate(write_config(tmp_path, tmp_path / "missing.pt", poisoned), tmp_path / "out")
    assert r.exit_code == 2 and "does not exist" in r.output
