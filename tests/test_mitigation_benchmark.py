"""The mitigation benchmark's small grid (slow): the default `unlearn` method on the real-anatomy
set (covid-two-source radiographs with synthetic lung lesions and a planted stamp) and on the
pure-shortcut set, one seed each. The full grid (3 seeds, more data sets and architectures) is
`benchmarks/mitigation.py`; its table is in docs/unlearn.md."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "covid-two-source" / "manifest.csv"


def _benchmark():
    spec = importlib.util.spec_from_file_location("mitigation_benchmark", ROOT / "benchmarks" / "mitigation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _args(tmp_path, methods):
    return SimpleNamespace(size=128, prevalence=0.85, epochs=10, unlearn_epochs=3, device="cpu", work=tmp_path,
                           methods=methods)


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_file(), reason="needs ../shared/data/covid-two-source")
def test_default_method_closes_the_gap_on_real_anatomy(tmp_path):
    from cxr_audit.unlearning import DEFAULT_METHOD

    rows = _benchmark().run_cell("real", "resnet18", 0, _args(tmp_path, ["none", DEFAULT_METHOD]))
    trained = rows[0]
    default = next(r for r in rows if r["method"] == DEFAULT_METHOD)
    assert trained["clean"] - trained["inserted"] >= 0.2  # the model did learn the stamp
    assert default["closed"] >= 0.6 and default["clean_delta"] >= -0.02
    assert not default["refused"]


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_file(), reason="needs ../shared/data/covid-two-source")
def test_a_pure_shortcut_model_is_refused_not_presented_as_fixed(tmp_path):
    from cxr_audit.unlearning import DEFAULT_METHOD

    rows = _benchmark().run_cell("pure", "resnet18", 0, _args(tmp_path, ["none", DEFAULT_METHOD]))
    assert rows[0]["clean"] <= 0.65  # nothing but the stamp to learn
    assert next(r for r in rows if r["method"] == DEFAULT_METHOD)["refused"]
