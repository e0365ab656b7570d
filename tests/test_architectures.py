"""Contract tests over every registered architecture, and the one-entry way to add one."""

import pytest
import torch
import torch.nn as nn
from cxr_audit.data.dataset import Preprocessing
from cxr_audit.errors import BadInputError, UsageError
from cxr_audit.explain import create_method, default_layers, explain_batch
from cxr_audit.models.architectures import ArchSpec, build_model, names, register, spec_of, trust_factory
from cxr_audit.models.registry import load_checkpoint, save_checkpoint

SIZE = 64


class ToyNet(nn.Module):
    """A user's own small network: conv-BN-ReLU twice, global pooling, linear head."""

    def __init__(self, num_classes: int, in_channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(self.pool(self.body(x)).flatten(1))


# adding an architecture: one entry
register(ArchSpec("toynet", lambda k, c, s: ToyNet(k, c), lambda m: ["body.2", "body.5"], "body", "fast"))


@pytest.mark.parametrize("arch", names())
def test_every_architecture_builds_and_explains(arch):
    """Each entry builds for 1 channel and 3 classes, names scan and CAM layers that exist, and
    its default LRP gives finite, non-constant heatmaps and relevances at every scan layer."""
    torch.manual_seed(0)
    spec = spec_of(arch)
    model = build_model(arch, 3, 1, SIZE).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 1, SIZE, SIZE)
    assert model(x).shape == (2, 3)
    layers = default_layers(arch, model)
    assert layers, f"{arch} names no default scan layers"
    modules = dict(model.named_modules())
    assert all(name in modules for name in layers + list(spec.early_layers))
    assert spec.cam_layer is None or spec.cam_layer in modules
    method = create_method("lrp", model, arch, Preprocessing(size=SIZE))
    capture = method.capture(layers)
    with method.rules(), capture.attached(method.model):
        expl = explain_batch(method, capture, x, {"pred": None})
    heat = expl.heatmaps["pred"]
    assert heat.shape == (2, SIZE, SIZE) and torch.isfinite(heat).all() and heat.std() > 0
    for layer in layers:
        assert torch.isfinite(expl.relevances[layer]).all() and expl.relevances[layer].abs().sum() > 0
    torch.testing.assert_close(model(x), expl.logits, atol=1e-3, rtol=1e-3)  # explaining leaves the model as it was


def test_toy_architecture_runs_the_fast_path_and_conserves():
    torch.manual_seed(0)
    model = build_model("toynet", 2, 1, 32).eval()
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.zeros_(m.bias)
    for p in model.parameters():
        p.requires_grad_(False)
    method = create_method("lrp", model, "toynet", Preprocessing(size=32))
    assert type(method).__name__ == "FastLRP"
    capture = method.capture([])
    with method.rules(), capture.attached(method.model):
        expl = explain_batch(method, capture, torch.randn(3, 1, 32, 32), {"pred": None})
    logit = expl.logits.gather(1, expl.targets["pred"][:, None])[:, 0]
    torch.testing.assert_close(expl.heatmaps["pred"].sum((1, 2)), logit, rtol=0.05, atol=1e-4)


def test_torchvision_names_map_to_registered_layouts():
    assert spec_of("torchvision.models:densenet121").name == "densenet121"
    assert spec_of("torchvision.models:resnet50").name == "resnet50"
    with pytest.raises(UsageError, match="unknown architecture"):
        spec_of("alexnet9000")


def test_a_checkpoint_never_imports_the_factory_it_names(tmp_path, capsys):
    """`config.arch = "this:s"` once printed the Zen of Python on load: now refused unread."""
    path = save_checkpoint(tmp_path / "m.pt", build_model("resnet18", 2, 1, 32), "resnet18", ["a", "b"],
                           Preprocessing(size=32))
    payload = torch.load(path, weights_only=True)
    payload["config"]["arch"] = "this:s"
    torch.save(payload, tmp_path / "evil.pt")
    with pytest.raises(BadInputError, match="never imported from a file"):
        load_checkpoint(tmp_path / "evil.pt")
    assert "Beautiful is better" not in capsys.readouterr().out


def test_trusted_factory_gets_only_the_arguments_it_takes(tmp_path):
    spec = trust_factory("torchvision.models:squeezenet1_0")  # takes weights + **kwargs: num_classes only
    model = spec.build(4, 3, 64)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 4)
    with pytest.raises(UsageError, match="cannot import model factory"):
        trust_factory("no_such_module_xyz:f")
    with pytest.raises(UsageError, match="failed"):
        trust_factory("os.path:join").build(2, 1, 32)  # accepts **kwargs? no: join(a, *p) gets nothing it takes


def test_cli_factory_models_load_only_when_trusted(tmp_path, phantoms):
    """`train --arch module:factory` records the factory; later commands refuse the checkpoint until
    the user names the factory with `--trust-factory` (loading a file never imports code)."""
    from cxr_audit.cli.main import app
    from cxr_audit.models import architectures
    from typer.testing import CliRunner

    runner = CliRunner()
    factory = "torchvision.models:squeezenet1_0"
    r = runner.invoke(app, ["train", str(phantoms), "--out", str(tmp_path / "m.pt"), "--arch", factory, "--size", "64",
                            "--channels", "3", "--epochs", "1", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    architectures._REGISTRY.pop(factory)  # a new process: nothing registered yet
    scan = ["scan", str(phantoms), "--model", str(tmp_path / "m.pt"), "--out", str(tmp_path / "s.h5"),
            "--split", "test", "--device", "cpu"]
    r = runner.invoke(app, scan)
    assert r.exit_code == 1 and f"--trust-factory {factory}" in r.output
    r = runner.invoke(app, ["--trust-factory", factory, *scan, "--layer", "features.12"])
    assert r.exit_code == 0, r.output
    architectures._REGISTRY.pop(factory, None)
