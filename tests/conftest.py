"""Shared fixtures: small phantom data with a planted shortcut and a tiny model that learns it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "covid-two-source"


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory) -> Path:
    from cxr_audit.data.phantom import generate_phantoms

    return generate_phantoms(tmp_path_factory.mktemp("phantoms"), n=240, size=64, seed=1)


@pytest.fixture(scope="session")
def poisoned(phantoms, tmp_path_factory) -> Path:
    """Text stamp in 90 % of *disease* train/val images; test split clean."""
    from cxr_audit.data.inject import inject

    return inject(phantoms, tmp_path_factory.mktemp("poisoned"), "text", {"disease": 0.9},
                  splits=["train", "val"], seed=1)


@pytest.fixture(scope="session")
def shortcut_model(poisoned, tmp_path_factory) -> Path:
    from cxr_audit.training.pipeline import train

    out = tmp_path_factory.mktemp("model") / "resnet18.pt"
    return train(poisoned, out, "resnet18", size=64, epochs=8, batch_size=16, seed=0, device="cpu").checkpoint


@pytest.fixture(scope="session")
def train_annotations(shortcut_model, poisoned, tmp_path_factory) -> Path:
    """Annotations (from the ``artifact`` column, no masks) of the shortcut model's scan of the
    training split only, as the benchmark and a quick user make them."""
    from cxr_audit.annotate.pipeline import annotate
    from cxr_audit.scan.pipeline import scan

    folder = tmp_path_factory.mktemp("annotations")
    s = scan(shortcut_model, poisoned, folder / "s.h5", split="train", layers=["layer2", "layer3"], device="cpu").path
    return annotate(s, folder / "a.h5", from_column="artifact", masks=False, device="cpu").path


@pytest.fixture(scope="session")
def rrr_model(shortcut_model, poisoned, tmp_path_factory) -> Path:
    """The shortcut model after `cxr-audit unlearn --method rrr` with the true artifact masks.

    This phantom model has no signal beyond the stamp (chance on clean validation images), so
    on the poisoned validation split the unlearned model scores lower than the input and
    `unlearn` would refuse it; ``--keep-worse`` writes it, since these tests measure the removal."""
    from cxr_audit.cli.main import app
    from typer.testing import CliRunner

    out = tmp_path_factory.mktemp("rrr") / "rrr.pt"
    r = CliRunner().invoke(app, ["unlearn", "--model", str(shortcut_model), "--data", str(poisoned), "--out", str(out),
                                 "--method", "rrr", "--lambda", "100", "--epochs", "3", "--device", "cpu",
                                 "--keep-worse"])
    assert r.exit_code == 0, r.output
    return out
