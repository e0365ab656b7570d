"""Contract tests over every registered mitigation (issue #14), and the one-file way to add one.

Each method, on a tiny network and eight 32-px images written here:
- ``check`` names what is missing when a need is absent;
- with the artifact present, a method with a strength to tune (``default_lambdas``) gives a
  finite, positive penalty whose gradient reaches the parameters;
- with no artifact in the data, it either refuses (a one-line UsageError: nothing to unlearn) or
  is inert: no penalty, the logits of the unchanged model, and an edit (P-ClArC's projection) that
  changes nothing;
- ``finish`` leaves no hook behind.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from cxr_audit.data.dataset import CxrDataset, Preprocessing, collate
from cxr_audit.data.manifest import Manifest, Sample
from cxr_audit.errors import UsageError
from cxr_audit.models.projection import install_projection
from cxr_audit.unlearn import MITIGATIONS, Mitigation, get_mitigation
from cxr_audit.unlearn.base import Context, TrainingData
from PIL import Image

SIZE = 32


class CounterfactualConsistency(Mitigation):
    """A toy mitigation: the logits must not change when the artifact region is blanked,
    ``mean ‖f(x) − f(x ⊙ (1 − m))‖²`` with ``m`` the artifact mask."""

    name = "toy-consistency"
    needs = ("artifact_mask",)
    default_lambdas = (1.0, 10.0)

    def forward(self, model, batch, x):
        logits = model(x)
        blank = x * (1 - batch["artifact_mask"].to(x))
        return logits, (logits - model(blank)).pow(2).sum(1).mean()


# adding a mitigation: the class above and one registry line
MITIGATIONS[CounterfactualConsistency.name] = CounterfactualConsistency


class TinyNet(nn.Module):
    """conv → ReLU (the CAV/CAM layer ``features``) → mean pooling → linear. With ``dead=True``
    channel 0 is never active and the head ignores it: a concept along it is absent."""

    def __init__(self, dead: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(4, 2)
        if dead:
            with torch.no_grad():
                self.features[0].weight[0] = 0
                self.features[0].bias[0] = -1
                self.head.weight[:, 0] = 0

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def _data(tmp_path, with_artifact: bool) -> Manifest:
    """Eight images, labels 0/1 alternating. With the artifact a bright 8-px square marks three of
    the four class-1 images and one class-0 image (its mask on disk) and the lungs are the central
    half; without it the lung mask is the whole image (no background a shortcut could sit in: ISNet's
    notion of the artifact)."""
    rng = np.random.default_rng(0)
    lungs = np.full((SIZE, SIZE), 0 if with_artifact else 255, np.uint8)
    lungs[8:24, 8:24] = 255
    Image.fromarray(lungs).save(tmp_path / "lungs.png")
    samples = []
    for i in range(8):
        image = (rng.random((SIZE, SIZE)) * 120 + 40).astype(np.uint8)
        stamped = with_artifact and i in (0, 1, 3, 5)
        mask = None
        if stamped:
            image[:8, :8] = 255
            square = np.zeros((SIZE, SIZE), np.uint8)
            square[:8, :8] = 255
            mask = tmp_path / f"artifact{i}.png"
            Image.fromarray(square).save(mask)
        Image.fromarray(image).save(tmp_path / f"{i}.png")
        samples.append(Sample(i, tmp_path / f"{i}.png", (i % 2,), mask=tmp_path / "lungs.png",
                              artifact=int(stamped), artifact_mask=mask))
    return Manifest(samples, ["healthy", "disease"])


def _context(manifest: Manifest, prep: Preprocessing) -> Context:
    cav = torch.tensor([1.0, 0.0, 0.0, 0.0])  # channel 0
    artifact = {s.index: s.artifact for s in manifest.samples}
    return Context(num_classes=2, layer="features", cav=cav, artifact=artifact,
                   cav_scores={i: 0.0 for i in artifact}, has_artifact_masks=True, has_foreground_masks=True,
                   options={"cam_layer": "features"},
                   data=TrainingData(manifest, prep, torch.device("cpu"), batch_size=8))


def _prepared(name: str, model: nn.Module, manifest: Manifest):
    """``(method, context, batch)`` after ``check`` and ``prepare``, as the engine runs them."""
    prep = Preprocessing(size=SIZE)
    context = _context(manifest, prep)
    batch = collate([CxrDataset(manifest, prep)[i] for i in range(len(manifest))])
    method = get_mitigation(name, seed=0)
    method.check(context)
    method.prepare(model, context, [batch])
    return method, context, batch


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.mark.parametrize("name", sorted(MITIGATIONS))
def test_check_names_each_missing_need(name):
    cls = MITIGATIONS[name]
    full = Context(num_classes=2, layer="features", cav=torch.ones(4) / 2, artifact={0: 1, 1: 0},
                   has_artifact_masks=True, has_foreground_masks=True)
    cls().check(full)
    removed = {"cav": {"cav": None}, "artifact_mask": {"has_artifact_masks": False},
               "mask": {"has_foreground_masks": False}, "artifact_labels": {"artifact": {}}}
    for need in cls.needs:
        context = Context(**{**full.__dict__, **removed[need]})
        with pytest.raises(UsageError, match=f"--method {name} needs"):
            cls().check(context)


PENALISED = sorted(n for n, cls in MITIGATIONS.items() if cls.default_lambdas and cls.trains)


@pytest.mark.parametrize("name", PENALISED)
def test_penalty_is_finite_and_its_gradient_reaches_the_parameters(name, tmp_path):
    model = TinyNet()
    method, _, batch = _prepared(name, model, _data(tmp_path, with_artifact=True))
    logits, penalty = method.forward(model, batch, batch["image"])
    assert logits.shape == (8, 2)
    assert penalty is not None and torch.isfinite(penalty) and float(penalty.detach()) > 0
    penalty.backward()
    reached = [n for n, p in model.named_parameters() if p.grad is not None and float(p.grad.abs().sum()) > 0]
    assert reached, f"{name}'s penalty does not reach any parameter"
    method.finish(model)
    assert _hooks(model) == 0


@pytest.mark.parametrize("name", sorted(MITIGATIONS))
def test_without_the_artifact_a_method_refuses_or_is_inert(name, tmp_path):
    model = TinyNet(dead=True)
    manifest = _data(tmp_path, with_artifact=False)
    with torch.no_grad():
        reference = model(collate([CxrDataset(manifest, Preprocessing(size=SIZE))[i] for i in range(8)])["image"])
    try:
        method, context, batch = _prepared(name, model, manifest)
    except UsageError as refusal:
        assert "\n" not in str(refusal)
        return
    logits, penalty = method.forward(model, batch, batch["image"])
    torch.testing.assert_close(logits, reference)
    if method.inert_without_artifact:
        assert penalty is None or float(penalty) < 1e-6, f"{name} penalises a model that has no artifact: {penalty}"
    else:  # a term that also acts on clean data says so (ISNet's relevance band)
        assert penalty is not None and torch.isfinite(penalty)
    edit = method.finish(model)
    assert _hooks(model) == 0
    if "projection" in edit:
        p = edit["projection"]
        install_projection(model, p["layer"], p["direction"], p["reference"], p.get("threshold"))
        with torch.no_grad():
            torch.testing.assert_close(model(batch["image"]), reference)


def test_the_toy_mitigation_runs_from_the_cli(shortcut_model, poisoned, tmp_path):
    """Registered in one line above, it is a ``--method`` like the built-in ones."""
    from cxr_audit.cli.main import app
    from typer.testing import CliRunner

    out = tmp_path / "toy.pt"
    r = CliRunner().invoke(app, ["unlearn", "--model", str(shortcut_model), "--data", str(poisoned), "--out", str(out),
                                 "--method", "toy-consistency", "--lambdas", "1", "--epochs", "1", "--device", "cpu",
                                 "--keep-worse"])
    assert r.exit_code == 0, r.output
    record = torch.load(out, weights_only=True)["extra"]["unlearn"]
    assert record["method"] == "toy-consistency"
