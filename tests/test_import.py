"""`cxr-audit import`: models trained outside cxr-audit become checkpoints every command accepts."""

import csv

import pytest
import torch
import torchvision.models as tvm
from cxr_audit.cli.main import app
from cxr_audit.data.dataset import Preprocessing
from cxr_audit.errors import BadInputError, UsageError
from cxr_audit.models.importing import import_model, parse_normalization
from cxr_audit.models.registry import load_checkpoint
from typer.testing import CliRunner

from conftest import SHARED_DATA

runner = CliRunner()


def _torchvision_resnet18(classes=2, channels=3):
    torch.manual_seed(0)
    model = tvm.resnet18(weights=None, num_classes=classes)
    if channels != 3:
        model.conv1 = torch.nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
    for m in model.modules():  # trained-looking BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("layout", ["bare", "lightning", "ddp", "model_key"])
def test_state_dict_layouts_import_and_predict_as_the_original(tmp_path, layout):
    net = _torchvision_resnet18()
    sd = net.state_dict()
    payload = {"bare": sd,
               "lightning": {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3,
                             "global_step": 120},
               "ddp": {f"module.{k}": v for k, v in sd.items()},
               "model_key": {"model": sd, "optimizer_lr": torch.tensor(0.1)}}[layout]
    torch.save(payload, tmp_path / "w.ckpt")
    result = import_model(tmp_path / "w.ckpt", "torchvision.models:resnet18", ["covid", "normal"], tmp_path / "m.pt",
                          size=64, channels=3, normalize="imagenet")
    assert result.arch == "resnet18"
    assert result.prefix == {"bare": "", "lightning": "model.", "ddp": "module.", "model_key": ""}[layout]
    assert result.state_dict_key == {"bare": None, "lightning": "state_dict", "ddp": None, "model_key": "model"}[layout]
    model, config = load_checkpoint(result.checkpoint)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model(x), net(x))
    extra = torch.load(result.checkpoint, weights_only=True)["extra"]
    assert len(extra["import"]["sha256"]) == 64 and extra["options"]["normalize"] == "imagenet"
    prep = Preprocessing(**config["preprocessing"])
    assert prep.mean == (0.485, 0.456, 0.406) and prep.channels == 3 and prep.size == 64


def test_torchvision_densenet121_imports_onto_the_registered_layout(tmp_path):
    torch.manual_seed(0)
    net = tvm.densenet121(weights=None, num_classes=3).eval()
    torch.save(net.state_dict(), tmp_path / "dn.pth")
    result = import_model(tmp_path / "dn.pth", "densenet121", ["a", "b", "c"], tmp_path / "dn.pt", size=64,
                          multilabel=True)
    model, config = load_checkpoint(result.checkpoint)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model(x), net(x))
    assert config["multilabel"] is True and config["class_names"] == ["a", "b", "c"]


XRV_PATHOLOGIES = ["Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema", "Fibrosis",
                   "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass", "Hernia",
                   "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum"]


def test_torchxrayvision_style_densenet_maps_onto_densenet121(tmp_path):
    """torchxrayvision's DenseNet is torchvision's module layout with a 1-channel conv0 and 18
    outputs, fed [-1024, 1024] intensities; its forward without op_threshs is features -> ReLU ->
    average pool -> classifier, as torchvision's. Such a state_dict (with an `op_threshs` tensor
    saved beside the weights) imports from the CLI and predicts the same logits."""
    torch.manual_seed(0)
    net = tvm.densenet121(weights=None, num_classes=len(XRV_PATHOLOGIES))
    net.features.conv0 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    net.eval()
    sd = dict(net.state_dict(), op_threshs=torch.rand(len(XRV_PATHOLOGIES)))
    torch.save(sd, tmp_path / "xrv.pt")
    r = runner.invoke(app, ["import", str(tmp_path / "xrv.pt"), "--arch", "densenet121", "--classes",
                            ",".join(XRV_PATHOLOGIES), "--multilabel", "--size", "224", "--channels", "1",
                            "--normalize", "xrv", "--ignore-key", "op_threshs", "--out", str(tmp_path / "m.pt")])
    assert r.exit_code == 0, r.output
    model, config = load_checkpoint(tmp_path / "m.pt")
    prep = Preprocessing(**config["preprocessing"])
    pixels = torch.rand(1, 1, 224, 224)  # intensities in [0, 1], as cxr-audit reads images
    xrv_input = pixels * 2048 - 1024  # torchxrayvision's normalisation
    mean, std = (float(torch.tensor(v).flatten()[0]) for v in (prep.mean, prep.std))
    torch.testing.assert_close((pixels - mean) / std, xrv_input)
    torch.testing.assert_close(model(xrv_input), net(xrv_input))
    assert config["multilabel"] is True and config["class_names"] == XRV_PATHOLOGIES
    r = runner.invoke(app, ["import", str(tmp_path / "xrv.pt"), "--arch", "densenet121", "--classes",
                            ",".join(XRV_PATHOLOGIES), "--multilabel", "--size", "224", "--channels", "1",
                            "--normalize", "xrv", "--out", str(tmp_path / "n.pt")])
    assert r.exit_code == 1 and "--ignore-key 'op_threshs'" in r.output and "Traceback" not in r.output, r.output


def test_wrong_shapes_and_keys_are_one_line_errors(tmp_path):
    torch.save(_torchvision_resnet18(classes=5).state_dict(), tmp_path / "five.pt")
    with pytest.raises(BadInputError, match=r"'fc.weight': file \[5, 512\], resnet18 \[2, 512\].*--classes"):
        import_model(tmp_path / "five.pt", "resnet18", ["a", "b"], tmp_path / "o.pt", size=64)
    torch.save(_torchvision_resnet18(channels=1).state_dict(), tmp_path / "gray.pt")
    with pytest.raises(BadInputError, match="--channels 1"):
        import_model(tmp_path / "gray.pt", "resnet18", ["a", "b"], tmp_path / "o.pt", size=64, channels=3)
    torch.save(tvm.vgg11(weights=None, num_classes=2).state_dict(), tmp_path / "vgg.pt")
    with pytest.raises(BadInputError, match=r"missing \(first 'conv1.weight'\).*unexpected \(first 'features.0.weight'\)"):
        import_model(tmp_path / "vgg.pt", "resnet18", ["a", "b"], tmp_path / "o.pt", size=64)
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "nothing.pt")
    with pytest.raises(BadInputError, match="holds no state_dict"):
        import_model(tmp_path / "nothing.pt", "resnet18", ["a", "b"], tmp_path / "o.pt", size=64)
    with pytest.raises(UsageError, match="is the weights file itself"):
        import_model(tmp_path / "vgg.pt", "vgg11", ["a", "b"], tmp_path / "vgg.pt", size=64)
    assert not (tmp_path / "o.pt").exists()


def test_normalizations():
    assert parse_normalization("xrv", 1) == ((0.5,), (1 / 2048,))
    assert parse_normalization("0.4,0.2", 1) == ((0.4,), (0.2,))
    assert parse_normalization("0.1,0.2,0.3,1,1,1", 3) == ((0.1, 0.2, 0.3), (1.0, 1.0, 1.0))
    with pytest.raises(UsageError, match="--channels 3"):
        parse_normalization("imagenet", 1)
    with pytest.raises(UsageError, match="--normalize must be"):
        parse_normalization("zscore", 1)
    # xrv maps intensities [0, 1] onto [-1024, 1024] as torchxrayvision does
    mean, std = parse_normalization("xrv", 1)
    prep = Preprocessing(size=8, channels=1, mean=mean, std=std)
    low, high = prep.bounds()
    assert float(low) == -1024 and float(high) == 1024


def _plain_torch_training(manifest, size, arch_factory, epochs=2):
    """A user's own training loop: torchvision model, 3 channels, ImageNet normalisation."""
    from PIL import Image

    rows = [r for r in csv.DictReader(open(manifest)) if r.get("split", "train") == "train"]
    names = sorted({r["label"] for r in rows})
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    xs, ys = [], []
    for r in rows:
        img = Image.open(manifest.parent / r["path"]).convert("RGB").resize((size, size))
        xs.append((torch.tensor(list(img.getdata()), dtype=torch.float32).T.reshape(3, size, size) / 255 - mean) / std)
        ys.append(names.index(r["label"]))
    x, y = torch.stack(xs), torch.tensor(ys)
    torch.manual_seed(0)
    model = arch_factory(weights=None, num_classes=len(names))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        for i in range(0, len(x), 16):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i:i + 16]), y[i:i + 16]).backward()
            opt.step()
    return model.eval(), names


def test_import_then_scan_reveal_evaluate_from_the_cli(tmp_path, phantoms):
    """A resnet18 trained by a plain PyTorch loop, saved Lightning-style, runs through the loop."""
    model, names = _plain_torch_training(phantoms, 64, tvm.resnet18, epochs=1)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "user.ckpt")
    ckpt = tmp_path / "imported.pt"
    r = runner.invoke(app, ["import", str(tmp_path / "user.ckpt"), "--arch", "torchvision.models:resnet18",
                            "--classes", ",".join(names), "--size", "64", "--channels", "3", "--out", str(ckpt)])
    assert r.exit_code == 0, r.output
    assert "under key 'state_dict', prefix 'model.' stripped" in r.output
    r = runner.invoke(app, ["scan", str(phantoms), "--model", str(ckpt), "--out", str(tmp_path / "s.h5"),
                            "--split", "test", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["reveal", str(tmp_path / "s.h5"), "--out", str(tmp_path / "rev"), "--no-references"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "rev" / "reveal.json").is_file()
    r = runner.invoke(app, ["evaluate", "--model", str(ckpt), "--data", str(phantoms), "--out",
                            str(tmp_path / "ev"), "--device", "cpu"])
    assert r.exit_code == 0, r.output


def test_cli_import_errors_are_one_line(tmp_path):
    torch.save(_torchvision_resnet18(classes=5).state_dict(), tmp_path / "five.pt")
    r = runner.invoke(app, ["import", str(tmp_path / "five.pt"), "--arch", "resnet18", "--classes", "a,b",
                            "--out", str(tmp_path / "o.pt")])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "error:" in r.output and "fc.weight" in r.output
    r = runner.invoke(app, ["import", str(tmp_path / "five.pt"), "--arch", "alexnet9000", "--classes", "a,b",
                            "--out", str(tmp_path / "o.pt")])
    assert r.exit_code == 2 and "unknown architecture" in r.output


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data/covid-two-source not present")
@pytest.mark.parametrize("factory,arch,size,epochs", [(tvm.densenet121, "densenet121", 128, 2),
                                                      (tvm.resnet50, "resnet50", 128, 2),
                                                      (tvm.densenet121, "densenet121", 224, 1)])
def test_user_models_on_real_cxrs_run_the_whole_audit(tmp_path, factory, arch, size, epochs):
    """Acceptance: a densenet121 and a resnet50 trained by a plain loop on the real two-hospital
    images, saved as bare state_dicts, go import -> scan -> reveal -> annotate -> evaluate (and
    densenet121 at 224 px, the field's usual input)."""
    model, names = _plain_torch_training(SHARED_DATA / "manifest.csv", size, factory, epochs=epochs)
    torch.save(model.state_dict(), tmp_path / "user.pth")
    ckpt = tmp_path / "m.pt"
    rows = list(csv.DictReader(open(SHARED_DATA / "manifest.csv")))
    first = rows[0]["source"]  # a hospital as the "artifact": the tool must run, whatever it finds
    seeds = [i for i, r in enumerate(rows) if r["split"] == "train" and r["source"] == first][:5]
    steps = [["import", str(tmp_path / "user.pth"), "--arch", f"torchvision.models:{arch}", "--classes",
              ",".join(names), "--size", str(size), "--out", str(ckpt)],
             ["scan", str(SHARED_DATA / "manifest.csv"), "--model", str(ckpt), "--out", str(tmp_path / "s.h5"),
              "--split", "train", "--device", "cpu"],
             ["reveal", str(tmp_path / "s.h5"), "--out", str(tmp_path / "rev"), "--no-references"],
             ["annotate", str(tmp_path / "s.h5"), "--seeds", ",".join(map(str, seeds)), "--out",
              str(tmp_path / "ann.h5"), "--device", "cpu"],
             ["evaluate", "--model", str(ckpt), "--data", str(SHARED_DATA / "manifest.csv"), "--out",
              str(tmp_path / "ev"), "--device", "cpu"]]
    for step in steps:
        r = runner.invoke(app, step)
        assert r.exit_code == 0, (step[0], r.output)
