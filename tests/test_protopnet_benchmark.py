"""The ProtoPNet benchmark on real radiographs (slow): ``benchmarks/protopnet.py``'s cell for
``../shared/data/covid-two-source`` (every COVID image from one hospital, every normal from
another). Its full table (phantom mixes, seeds) is in docs/reveal.md."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from benchmark_files import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "covid-two-source" / "manifest.csv"


def _benchmark():
    return load_benchmark("protopnet")


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_file(), reason="needs ../shared/data/covid-two-source")
def test_protopnet_on_the_two_hospital_set_learns_and_its_prototypes_are_audited(tmp_path):
    args = SimpleNamespace(arch="resnet18", size=64, epochs=3)
    row = _benchmark().run_cell(SHARED, tmp_path, args, 0, "covid")
    assert row["accuracy"] > 0.7  # the hospital alone separates the classes
    for key in ("flagged_pos", "flagged_other", "stamped_cell_pos", "stamped_cell_other", "stamped_prp_pos"):
        assert 0.0 <= row[key] <= 1.0
    # no injected stamp in this data, so no stamp to project onto or look at, and no reliance measured
    assert row["stamped_cell_pos"] == row["stamped_prp_pos"] == row["caught_pos"] == 0.0
    assert np.isnan(row["reliance"])
    assert 0 <= row["ad_prp"] <= 100 and 0 <= row["ad_act"] <= 100


@pytest.mark.slow
def test_a_stamp_that_one_source_carries_with_the_disease_gets_a_flagged_prototype_that_looks_at_it(tmp_path):
    """The issue's acceptance, as the benchmark measures it (seed 0, its settings: 600 phantoms,
    128 px, 10 epochs; ~20 min on 2 CPU cores): with 90 % of the disease and 10 % of the healthy
    images from the stamped source, the model relies on the stamp and one of the disease
    prototypes whose PRP map lies on the stamp is flagged; with the balanced mix, the stamp
    predicts nothing and no disease prototype is both on it and flagged."""
    bench = _benchmark()
    args = SimpleNamespace(arch="resnet18", size=128, epochs=10)
    rows = {}
    for x, y in ((90, 10), (50, 50)):
        data = bench.phantom_mix(tmp_path / "ph", 600, 128, 0, x, y)
        rows[x] = bench.run_cell(data, tmp_path / f"x{x}", args, 0, "disease")
    assert rows[90]["reliance"] > 0.05 and abs(rows[50]["reliance"]) < 0.05
    assert rows[90]["caught_pos"] == 1.0 and rows[90]["stamped_prp_pos"] > 0
    assert rows[90]["caught_near_pos"] == 1.0 and rows[90]["stamped_near_pos"] > 0.5
    assert rows[50]["caught_pos"] == 0.0 and rows[50]["caught_near_pos"] == 0.0
    assert rows[90]["ad_prp"] <= rows[90]["ad_act"]  # on the balanced mix the two tie (35.9 vs 35.8, seed 0)


def test_neighbour_overlap_is_the_mean_pairwise_jaccard_of_the_nearest_sets():
    overlap = _benchmark().neighbour_overlap
    assert overlap([{"nearest": [1, 2, 3, 4]}, {"nearest": [4, 3, 2, 1]}]) == 1.0  # duplicates
    assert overlap([{"nearest": [1, 2]}, {"nearest": [3, 4]}]) == 0.0
    # pairs: {1,2,3}-{2,3,4} 2/4, {1,2,3}-{5,6} 0, {2,3,4}-{5,6} 0
    assert overlap([{"nearest": [1, 2, 3]}, {"nearest": [2, 3, 4]}, {"nearest": [5, 6]}]) == 0.5 / 3
    assert np.isnan(overlap([{"nearest": [1]}]))
