"""`cxr-audit demo` with its defaults (what `make demo` runs): the shortcut is found and reduced."""

from cxr_audit.cli.main import app
from cxr_audit.demo import run_demo
from typer.testing import CliRunner


def test_demo_finds_and_reduces_the_shortcut(tmp_path):
    result = run_demo(tmp_path, device="cpu")
    assert result.metrics["artifact retrieval AUROC (best of top-3 revealed concepts)"] >= 0.9
    assert result.metrics["artifact retrieval AUROC (held-out, 5 seeds)"] >= 0.85
    before, after = result.comparison["artifact_inserted_accuracy"]
    assert after >= before + 0.1
    before_share, after_share = result.comparison["artifact_gradient_share"]
    assert after_share < before_share
    clean_before, clean_after = result.comparison["accuracy"]
    assert clean_after >= clean_before - 0.08  # two binomial standard errors on the 100 test images
    assert (tmp_path / "reveal" / "report.html").is_file() and (tmp_path / "evaluation" / "metrics.md").is_file()


def test_demo_cli_rejects_unknown_artifact(tmp_path):
    r = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--artifact", "sticker"])
    assert r.exit_code == 2 and "sticker" in r.output
