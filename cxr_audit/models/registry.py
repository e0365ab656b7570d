"""Model architectures by name, and checkpoints that load without unpickling objects.

A checkpoint is a plain dict ``{"format", "config", "state_dict", ...}`` of tensors and
primitives, loaded with ``torch.load(weights_only=True)``. ``config`` holds ``arch``,
``num_classes``, ``class_names`` and the :class:`Preprocessing` so every command reproduces the
training input pipeline.
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torchvision.models as tvm

from cxr_audit.data.dataset import Preprocessing
from cxr_audit.errors import BadInputError, UsageError

CHECKPOINT_FORMAT = "cxr-audit-checkpoint/1"


def _first_conv_to(model: nn.Module, attr_path: str, in_channels: int) -> None:
    """Replace the first conv by one with ``in_channels`` inputs (weights re-initialised)."""
    parent = model
    *parents, last = attr_path.split(".")
    for name in parents:
        parent = parent[int(name)] if name.isdigit() else getattr(parent, name)
    old = parent[int(last)] if last.isdigit() else getattr(parent, last)
    if old.in_channels == in_channels:
        return
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=old.bias is not None)
    if last.isdigit():
        parent[int(last)] = new
    else:
        setattr(parent, last, new)


def _resnet(factory):
    def build(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        m = factory(weights=None, num_classes=num_classes)
        _first_conv_to(m, "conv1", in_channels)
        return m
    return build


def _vgg(factory):
    def build(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        m = factory(weights=None, num_classes=num_classes)
        _first_conv_to(m, "features.0", in_channels)
        return m
    return build


def _vit(patch_size: int, num_layers: int, num_heads: int, hidden_dim: int, mlp_dim: int):
    def build(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        m = tvm.VisionTransformer(image_size=image_size, patch_size=patch_size, num_layers=num_layers,
                                  num_heads=num_heads, hidden_dim=hidden_dim, mlp_dim=mlp_dim,
                                  num_classes=num_classes)
        _first_conv_to(m, "conv_proj", in_channels)
        # torchvision initialises the head to zero: every logit would be 0 and every explanation empty
        nn.init.trunc_normal_(m.heads.head.weight, std=0.02)
        return m
    return build


ARCHITECTURES: dict[str, Callable[[int, int, int], nn.Module]] = {
    "resnet18": _resnet(tvm.resnet18),
    "resnet50": _resnet(tvm.resnet50),
    "vgg11": _vgg(tvm.vgg11),
    "vgg16": _vgg(tvm.vgg16),
    "vit_b_16": _vit(16, 12, 12, 768, 3072),
    "vit_tiny": _vit(8, 4, 4, 64, 128),
}


def family(arch: str) -> str:
    """``"resnet"``, ``"vgg"``, ``"vit"`` or ``"custom"``: picks LRP composites and canonizers."""
    for fam in ("resnet", "vgg", "vit"):
        if arch.startswith(fam):
            return fam
    return "custom"


def _no_inplace(model: nn.Module) -> nn.Module:
    # in-place ReLUs overwrite the tensors that explanation hooks hold on to
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    return model


def build_model(arch: str, num_classes: int, in_channels: int = 1, image_size: int = 224) -> nn.Module:
    """Build an untrained model; ``arch`` is a registry name or ``module:factory``.

    A ``module:factory`` is called as ``factory(num_classes=..., in_channels=..., image_size=...)``.
    """
    if arch in ARCHITECTURES:
        return _no_inplace(ARCHITECTURES[arch](num_classes, in_channels, image_size))
    if ":" in arch:
        module_name, _, attr = arch.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise UsageError(f"cannot import model factory '{arch}': {exc}") from None
        return _no_inplace(factory(num_classes=num_classes, in_channels=in_channels, image_size=image_size))
    raise UsageError(f"unknown architecture '{arch}' (choose from: {', '.join(ARCHITECTURES)} or module:factory)")


def save_checkpoint(path: str | Path, model: nn.Module, arch: str, class_names: list[str],
                    prep: Preprocessing, extra: dict | None = None) -> Path:
    """Save weights + config as a weights-only-loadable dict; written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # unwrap DDP
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": {"arch": arch, "num_classes": len(class_names), "class_names": list(class_names),
                   "preprocessing": prep.to_dict()},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra or {},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: str | Path, arch: str | None = None,
                    num_classes: int | None = None) -> tuple[nn.Module, dict]:
    """Load a checkpoint -> ``(model in eval mode, config)``.

    ``arch``/``num_classes``, when given, must agree with the checkpoint. Raises
    :class:`BadInputError` for unreadable files and for weights that do not fit the architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BadInputError(f"cannot load checkpoint {path} (weights-only): {str(exc).splitlines()[0]}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise BadInputError(f"{path} is not a cxr-audit checkpoint (train one with `cxr-audit train`)")
    config = payload["config"]
    if arch is not None and arch != config["arch"]:
        raise BadInputError(f"checkpoint {path} is a '{config['arch']}', not a '{arch}'")
    if num_classes is not None and num_classes != config["num_classes"]:
        raise BadInputError(f"checkpoint {path} has {config['num_classes']} classes, data has {num_classes}")
    prep = config["preprocessing"]
    model = build_model(config["arch"], config["num_classes"], prep["channels"], prep["size"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise BadInputError(f"weights in {path} do not fit architecture '{config['arch']}': {first}") from None
    projection = payload.get("extra", {}).get("projection")
    if projection:  # a P-ClArC model: the saved projection is part of the model
        from cxr_audit.models.projection import install_projection

        install_projection(model, projection["layer"], torch.tensor(projection["direction"]), projection["reference"])
        config = {**config, "projection": projection}
    return model.eval(), config


def load_frozen(path: str | Path, device: torch.device) -> tuple[nn.Module, dict]:
    """Load a checkpoint for explanation: eval mode, on ``device``, parameters frozen (no weight
    gradients are computed in explanation passes)."""
    model, config = load_checkpoint(path)
    model = model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, config


def preprocessing_of(config: dict) -> Preprocessing:
    return Preprocessing(**config["preprocessing"])


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
