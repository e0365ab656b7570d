"""Typed method options (``--option KEY=VALUE``) and string choices, checked in one place (issue #14)."""

import numpy as np
import pytest
import torch
from cxr_audit.cli.main import app
from cxr_audit.data.dataset import Preprocessing
from cxr_audit.errors import UsageError
from cxr_audit.explain import create_method
from cxr_audit.explain.methods import METHODS
from cxr_audit.models.architectures import build_model
from cxr_audit.numerics.cav import CAV_METHODS, make_cav
from cxr_audit.options import choice, parse_pairs, typed_options
from cxr_audit.unlearn import MITIGATIONS
from typer.testing import CliRunner

runner = CliRunner()


def test_options_are_converted_and_unknown_keys_name_the_valid_ones():
    assert typed_options("--method x", {"C": float, "on": bool}, {"C": "0.5", "on": "no"}) == {"C": 0.5, "on": False}
    with pytest.raises(UsageError, match=r"--method x has no option D \(options: C\)"):
        typed_options("--method x", {"C": float}, {"D": "1"})
    with pytest.raises(UsageError, match="expected float"):
        typed_options("--method x", {"C": float}, {"C": "lots"})
    with pytest.raises(UsageError, match="KEY=VALUE"):
        parse_pairs(["C0.5"])
    assert parse_pairs([" C = 0.5 ", "a=b=c"]) == {"C": "0.5", "a": "b=c"}
    with pytest.raises(UsageError, match=r"unknown colour 'red' \(choose from: blue, green\)"):
        choice("colour", "red", ["blue", "green"])


@pytest.mark.parametrize("registry", [METHODS, CAV_METHODS, MITIGATIONS], ids=["attribution", "cav", "mitigation"])
def test_every_registered_method_declares_typed_options(registry):
    for name, cls in registry.items():
        assert isinstance(cls.option_types, dict), name
        assert all(isinstance(kind, type) for kind in cls.option_types.values()), name


def test_attribution_options_reach_the_method():
    model = build_model("resnet18", 2, 1, 32).eval()
    prep = Preprocessing(size=32)
    x = torch.randn(1, 1, 32, 32)
    assert create_method("lrp-gammabox", model, "resnet18", prep, gamma="0.5").composite().layer_map  # builds
    assert create_method("lrp", model, "resnet18", prep, first_rule="zbox").first_rule == "zbox"
    with pytest.raises(UsageError, match="first-layer rule 'sharp'"):
        create_method("lrp", model, "resnet18", prep, first_rule="sharp")
    with pytest.raises(UsageError, match=r"--method lrp has no option gamma \(options: first_rule\)"):
        create_method("lrp", model, "resnet18", prep, gamma="0.5")
    assert model(x).shape == (1, 2)


def test_cav_options_change_the_estimator():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    X = rng.normal(size=(200, 5)) + y[:, None] * np.array([2.0, 0, 0, 0, 0])
    loose, tight = (make_cav("logistic", C=c).fit(X, y).direction_ for c in ("10", "0.0001"))
    assert not np.allclose(loose, tight)
    with pytest.raises(UsageError, match=r"--method signal has no option C \(it takes none\)"):
        make_cav("signal", C="1")


def test_scan_and_annotate_take_and_record_method_options(shortcut_model, poisoned, tmp_path):
    scan = tmp_path / "scan.h5"
    r = runner.invoke(app, ["scan", str(poisoned), "--model", str(shortcut_model), "--out", str(scan), "--device", "cpu",
                            "--split", "train", "--method", "lrp-zennit", "--option", "epsilon=1e-3"])
    assert r.exit_code == 0, r.output
    from cxr_audit.store.scan_file import ScanFile

    with ScanFile(scan) as opened:
        assert opened.meta["options"]["method_options"] == {"epsilon": "1e-3"}
    r = runner.invoke(app, ["scan", str(poisoned), "--model", str(shortcut_model), "--out", str(tmp_path / "x.h5"),
                            "--device", "cpu", "--option", "gamma=2"])
    assert r.exit_code == 2 and "has no option gamma" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x.h5").exists()
    out = tmp_path / "ann.h5"
    r = runner.invoke(app, ["annotate", str(scan), "--out", str(out), "--from-column", "artifact", "--no-masks",
                            "--method", "svm", "--option", "C=0.1"])
    assert r.exit_code == 0, r.output
    from cxr_audit.store.annotation_file import annotation_meta

    assert annotation_meta(out)["options"]["cav_options"] == {"C": "0.1"}
    r = runner.invoke(app, ["annotate", str(scan), "--out", str(tmp_path / "bad.h5"), "--from-column", "artifact",
                            "--method", "svm", "--option", "alpha=1"])
    assert r.exit_code == 2 and "--method svm has no option alpha" in r.output


def test_registries_resolve_names_after_every_submodule_is_imported():
    """A package-level helper named like a submodule (``unlearn.choice``) is replaced by the module
    once that is imported: the lookups must still work then."""
    import importlib
    import pkgutil

    import cxr_audit.unlearn as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"cxr_audit.unlearn.{module.name}")
    from cxr_audit.unlearn import get_mitigation

    assert get_mitigation("dfr", C="0.5").options == {"C": 0.5}
    with pytest.raises(UsageError, match="unknown --method 'nope'"):
        get_mitigation("nope")
