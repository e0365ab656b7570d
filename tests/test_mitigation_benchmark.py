"""The mitigation benchmark's small grid (slow): the default `unlearn` method on the real-anatomy
set (covid-two-source radiographs with synthetic lung lesions and a planted stamp) and on the
pure-shortcut set, one seed each. The full grid (3 seeds, more data sets and architectures) is
`benchmarks/mitigation.py`; its table is in docs/unlearn.md."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmark_files import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "covid-two-source" / "manifest.csv"


def _benchmark():
    return load_benchmark("mitigation")


def _args(tmp_path, methods):
    return SimpleNamespace(size=128, prevalence=0.85, epochs=10, unlearn_epochs=3, device="cpu", work=tmp_path,
                           methods=methods)


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_file(), reason="needs ../shared/data/covid-two-source")
def test_default_method_closes_the_gap_on_real_anatomy(tmp_path):
    from cxr_audit.unlearn.pipeline import DEFAULT_METHOD

    rows = _benchmark().run_cell("real", "resnet18", 0, _args(tmp_path, ["none", DEFAULT_METHOD]))
    trained = rows[0]
    default = next(r for r in rows if r["method"] == DEFAULT_METHOD)
    assert trained["clean"] - trained["inserted"] >= 0.2  # the model did learn the stamp
    assert default["closed"] >= 0.6 and default["clean_delta"] >= -0.02
    assert not default["refused"]


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_file(), reason="needs ../shared/data/covid-two-source")
def test_a_pure_shortcut_model_is_refused_not_presented_as_fixed(tmp_path):
    from cxr_audit.unlearn.pipeline import DEFAULT_METHOD

    rows = _benchmark().run_cell("pure", "resnet18", 0, _args(tmp_path, ["none", DEFAULT_METHOD]))
    assert rows[0]["clean"] <= 0.65  # nothing but the stamp to learn
    assert next(r for r in rows if r["method"] == DEFAULT_METHOD)["refused"]


def test_the_default_chain_row_is_what_a_user_of_the_defaults_gets():
    """augment when it is kept; else rpclarc, else dfr, whichever is first not refused; the trained
    model when all are refused or the input has no signal beyond the artifact (nothing written)."""
    chain = _benchmark().default_chain
    trained = {"method": "(trained)", "clean": 0.9, "inserted": 0.4, "worst": 0.1}

    def rows(augment_refused, rpclarc_refused, dfr_refused, at_chance=False):
        common = {"seconds": 10.0, "input_at_chance": at_chance}
        return [trained, {"method": "augment", "clean": 0.8, "inserted": 0.8, "worst": 0.5, "closed": 1.0,
                          "clean_delta": -0.1, "worst_delta": 0.4, "refused": augment_refused, **common},
                {"method": "rpclarc", "clean": 0.9, "inserted": 0.9, "worst": 0.6, "closed": 1.0, "clean_delta": 0.0,
                 "worst_delta": 0.5, "refused": rpclarc_refused, **common},
                {"method": "dfr", "clean": 0.9, "inserted": 0.6, "worst": 0.3, "closed": 0.6, "clean_delta": 0.0,
                 "worst_delta": 0.2, "refused": dfr_refused, **common}]

    kept = chain(rows(False, True, True))[0]
    assert kept["clean"] == 0.8 and kept["seconds"] == 10.0 and not kept["refused"] and kept["used"] == "augment"
    first_fallback = chain(rows(True, False, False))[0]
    assert first_fallback["used"] == "rpclarc" and first_fallback["inserted"] == 0.9 and first_fallback["seconds"] == 20.0
    second = chain(rows(True, True, False))[0]
    assert second["used"] == "dfr" and second["closed"] == 0.6 and second["seconds"] == 30.0
    for refused in (chain(rows(True, True, True))[0], chain(rows(True, False, False, at_chance=True))[0]):
        assert refused["refused"] and refused["closed"] == 0.0 and refused["inserted"] == 0.4
    assert chain(rows(True, False, False, at_chance=True))[0]["seconds"] == 10.0  # no fallback ran
    assert chain(rows(False, False, False)[:3]) == []  # dfr did not run: no chain row
    unchanged = rows(True, False, False)
    unchanged[2]["improved"] = False  # rpclarc changed nothing: not refused, yet no fix; dfr is next
    assert chain(unchanged)[0]["used"] == "dfr"


def test_a_method_variant_splits_unlearn_options_from_the_methods_own():
    name, settings = _benchmark().parse_variant("rrclarc:layer=layer4,lambda_=1e5,per_position=0")
    assert name == "rrclarc"
    assert settings == {"layer": "layer4", "lambda_": 100000.0, "options": {"per_position": 0.0}}
    assert _benchmark().parse_variant("dfr") == ("dfr", {})


def test_a_cell_folder_is_named_by_everything_that_shapes_its_shortcut_model(tmp_path):
    bench = _benchmark()
    args = _args(tmp_path, [])
    folder, cache = bench.cell_folder("real", "vgg11", 1, "marker", args)
    assert folder.is_dir() and cache == folder / "cell.json" and folder.parent == tmp_path
    assert bench.cell_folder("real", "vgg11", 1, "marker", args)[0] == folder  # a later run finds it again
    for changed in ({"size": 224}, {"prevalence": 0.5}, {"epochs": 3}):
        assert bench.cell_folder("real", "vgg11", 1, "marker", SimpleNamespace(**{**vars(args), **changed}))[0] != folder
    assert bench.cell_folder("real", "vgg11", 2, "marker", args)[0] != folder
    assert bench.cell_folder("real", "vgg11", 1, "text", args)[0] != folder
