import pickle

import pytest
import torch
from cxr_audit.data.dataset import Preprocessing
from cxr_audit.errors import BadInputError, UsageError
from cxr_audit.models.registry import build_model, load_checkpoint, save_checkpoint


@pytest.mark.parametrize("arch", ["resnet18", "vgg11", "vit_tiny"])
def test_build_with_channels_and_classes(arch):
    model = build_model(arch, num_classes=3, in_channels=1, image_size=64).eval()
    out = model(torch.randn(2, 1, 64, 64))
    assert out.shape == (2, 3)
    assert out.abs().sum() > 0  # ViT head re-initialised, not zero


def test_checkpoint_roundtrip_and_mismatches(tmp_path):
    prep = Preprocessing(size=32)
    model = build_model("resnet18", 2, 1, 32).eval()
    path = save_checkpoint(tmp_path / "m.pt", model, "resnet18", ["a", "b"], prep)
    loaded, config = load_checkpoint(path)
    x = torch.randn(1, 1, 32, 32)
    assert torch.allclose(model(x), loaded(x))
    assert config["class_names"] == ["a", "b"] and config["preprocessing"]["size"] == 32
    with pytest.raises(BadInputError, match="is a 'resnet18', not a 'vgg11'"):
        load_checkpoint(path, arch="vgg11")
    with pytest.raises(BadInputError, match="has 2 classes, data has 5"):
        load_checkpoint(path, num_classes=5)


def test_weights_for_another_architecture_are_a_clear_error(tmp_path):
    prep = Preprocessing(size=32)
    path = save_checkpoint(tmp_path / "v.pt", build_model("vgg11", 2, 1, 32), "vgg11", ["a", "b"], prep)
    payload = torch.load(path, weights_only=True)
    payload["config"]["arch"] = "resnet18"  # a mislabelled checkpoint
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(BadInputError, match="do not fit architecture 'resnet18'"):
        load_checkpoint(tmp_path / "bad.pt")


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"format": "cxr-audit-checkpoint/1", "obj": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(BadInputError, match="weights-only"):
        load_checkpoint(tmp_path / "evil.pt")
    (tmp_path / "junk.pt").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(BadInputError):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(BadInputError, match="not a cxr-audit checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_unknown_architecture():
    with pytest.raises(UsageError, match="unknown architecture"):
        build_model("alexnet9000", 2)
