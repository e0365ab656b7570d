"""stress: the source-imbalance sweep runs end to end and writes its table and plot; on phantoms
whose second hospital frames its images (slow test), Test-50-50 peaks at 50/50 and the
Test-100H1/H2 curves cross — the hospital detector of Gautam et al. (2022)."""

import json

import pytest
from cxr_audit.cli.main import app
from typer.testing import CliRunner


def two_hospitals(root, n, size, strength, cue="text"):
    from cxr_audit.data.inject import inject
    from cxr_audit.data.phantom import generate_phantoms

    ph = generate_phantoms(root / "ph", n=n, size=size, seed=5, sources=2, split_fractions=(0.7, 0.0, 0.3),
                           disease_strength=strength)
    return inject(ph, root / "stamped", cue, {"site1": 1.0}, by="source", seed=5)


def sweep(data, out, grid, size, epochs):
    r = CliRunner().invoke(app, ["stress", str(data), "--out", str(out), "--grid", grid, "--size", str(size),
                                 "--epochs", str(epochs), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    return {row["x"]: row for row in json.loads((out / "stress.json").read_text())["rows"]}


def test_sweep_writes_table_and_plot(tmp_path):
    rows = sweep(two_hospitals(tmp_path, 120, 32, 0.15), tmp_path / "out", "0,100", 32, 1)
    assert set(rows) == {0, 100}
    assert all(0 <= rows[x][k] <= 1 for x in rows for k in ("test_100_h1", "test_100_h2", "test_50_50"))
    assert (tmp_path / "out" / "stress.png").stat().st_size > 0
    assert "Test-50-50" in (tmp_path / "out" / "stress.md").read_text()


@pytest.mark.slow
def test_sweep_shows_the_hospital_detector(tmp_path):
    # the second hospital's images all carry a frame (its exposure border), the disease signal is weak
    rows = sweep(two_hospitals(tmp_path, 600, 64, 0.08, cue="frame"), tmp_path / "out", "0,50,100", 64, 8)
    assert rows[50]["test_50_50"] >= max(rows[0]["test_50_50"], rows[100]["test_50_50"])
    gap = {x: rows[x]["test_100_h1"] - rows[x]["test_100_h2"] for x in rows}
    assert gap[0] < 0 < gap[100]  # the Test-100H1 and Test-100H2 curves cross


def test_one_source_is_a_usage_error(poisoned, tmp_path):
    r = CliRunner().invoke(app, ["stress", str(poisoned), "--out", str(tmp_path)])
    assert r.exit_code == 2 and "two sources" in r.output


def test_protopnet_sweep_reports_where_each_class_prototypes_come_from(tmp_path):
    """With x % of the positive class from H1, that class's prototypes can only be projected onto
    H1 images at x = 100 and never at x = 0 (every one of its training images is from there)."""
    data = two_hospitals(tmp_path, 120, 32, 0.15)
    r = CliRunner().invoke(app, ["stress", str(data), "--out", str(tmp_path / "out"), "--grid", "0,100", "--size", "32",
                                 "--epochs", "1", "--arch", "protopnet:resnet18", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "out" / "stress.json").read_text())
    positive, (h1, _) = result["options"]["positive"], result["options"]["sources"]
    rows = {row["x"]: row for row in result["rows"]}
    assert rows[100]["prototypes_from_h1"][positive] == 1.0 and rows[0]["prototypes_from_h1"][positive] == 0.0
    other = next(c for c in rows[0]["prototypes_from_h1"] if c != positive)
    assert 0.0 <= rows[0]["prototypes_from_h1"][other] <= 1.0
    assert f"{positive} prototypes from {h1}" in (tmp_path / "out" / "stress.md").read_text()
