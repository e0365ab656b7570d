"""The ProtoPNet benchmark on real radiographs (slow): ``benchmarks/protopnet.py``'s cell for
``../shared/data/covid-two-source`` (every COVID image from one hospital, every normal from
another). Its full table (phantom mixes, seeds) is in docs/reveal.md."""

from pathlib import Path
from types import SimpleNamespace

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
    for key in ("flagged_pos", "flagged_other", "stamped_pos", "stamped_other"):
        assert 0.0 <= row[key] <= 1.0
    assert row["stamped_pos"] == 0.0  # no injected stamp in this data
    assert 0 <= row["ad_prp"] <= 100 and 0 <= row["ad_act"] <= 100
