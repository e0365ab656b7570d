"""Architectures by name: one :class:`ArchSpec` each, and the only place that knows them.

An ``ArchSpec`` says how to build the network, which layers a scan records by default, where
Grad-CAM looks, how LRP is computed (``"fast"`` modified-gradient LRP, zennit's hooks, or the
transformer rules) and which zennit canonizers the reference LRP uses. Adding an architecture is
one :func:`register` call. Code outside ``models/`` asks :func:`spec_of` instead of testing names.

A user's own ``module:factory`` becomes an entry only when the user names it (``train --arch``,
``import --arch`` or ``--trust-factory``): a checkpoint that names an unregistered factory is
refused, so loading a file never imports code.
"""

from __future__ import annotations

import importlib
import inspect
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
import torch.nn as nn
import torchvision.models as tvm

from cxr_audit.errors import UsageError

LrpKind = Literal["fast", "zennit", "vit"]


def _no_layers(model: nn.Module) -> list[str]:
    return []


def _no_rules() -> list:
    return []


def _no_canonizers(model: nn.Module) -> list:
    from zennit.canonizers import SequentialMergeBatchNorm

    return [SequentialMergeBatchNorm()]


@dataclass(frozen=True)
class ArchSpec:
    """Everything the pipeline needs to know about one architecture.

    ``build(num_classes, in_channels, image_size) -> nn.Module``; ``scan_layers(model)`` the
    early/middle/late layers a scan records; ``lrp="fast"`` promises that every convolution after
    the first reads a non-negative input (a ReLU or pooling output), so the one-term z+ rule and
    :mod:`cxr_audit.explain.fast_lrp` apply; ``canonizers(model)`` the zennit canonizers of the
    reference LRP; ``torchvision_name`` the torchvision factory whose state_dict layout it has.
    """

    name: str
    build: Callable[[int, int, int], nn.Module]
    scan_layers: Callable[[nn.Module], list[str]] = _no_layers
    cam_layer: str | None = None
    lrp: LrpKind = "zennit"
    canonizers: Callable[[nn.Module], list] = _no_canonizers
    torchvision_name: str | None = None
    first_conv: str | None = None
    #: an earlier layer than ``scan_layers`` where small artifacts localise (benchmarks scan it too)
    early_layers: tuple[str, ...] = ()
    #: learning rate that trains it from scratch on small data (plain VGGs learn nothing at 1e-3)
    recommended_lr: float = 1e-3
    tags: tuple[str, ...] = field(default_factory=tuple)
    #: ``trunk(model)``: its convolutional part as a module, images -> non-negative ``(N, C, h, w)``
    #: (what a ProtoPNet is built on); ``None`` where there is none
    trunk: Callable[[nn.Module], nn.Module] | None = None
    #: ``lrp_rules()``: extra zennit ``(module type, rule)`` pairs put before a composite's defaults
    #: (ProtoPNet's PRP rule for its distance layer)
    lrp_rules: Callable[[], list] = _no_rules
    #: the layer whose output ``(N, P, h, w)`` holds one similarity map per prototype (ProtoPNet), for
    #: :mod:`cxr_audit.explain.prp`; ``None`` for models without prototypes. A model with one is
    #: trained in ProtoPNet's three steps (:mod:`cxr_audit.training.protopnet`)
    prototype_layer: str | None = None


_REGISTRY: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    """Add ``spec`` to the registry (replacing an entry of the same name)."""
    _REGISTRY[spec.name] = spec
    return spec


def names() -> list[str]:
    """Registered names, user factories excluded."""
    return [n for n, s in _REGISTRY.items() if "factory" not in s.tags]


def spec_of(arch: str) -> ArchSpec:
    """The registered spec; a ``torchvision.models:NAME`` with a registered layout maps to it."""
    if arch in _REGISTRY:
        return _REGISTRY[arch]
    alias = _torchvision_alias(arch)
    if alias is not None:
        return _REGISTRY[alias]
    if ":" in arch:
        raise UsageError(f"architecture '{arch}' is a module:factory that was not given on this command line; "
                         f"code is never imported from a file (pass --trust-factory {arch} to allow it)")
    raise UsageError(f"unknown architecture '{arch}' (choose from: {', '.join(names())} or module:factory)")


def canonical_name(arch: str) -> str:
    """``torchvision.models:densenet121`` -> ``densenet121`` where the layout is registered."""
    return _torchvision_alias(arch) or arch


def _torchvision_alias(arch: str) -> str | None:
    module, _, attr = arch.partition(":")
    if module not in ("torchvision.models", "torchvision"):
        return None
    for spec in _REGISTRY.values():
        if spec.torchvision_name == attr:
            return spec.name
    return None


# --- building -----------------------------------------------------------------------------------

def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Set ``model.<name>`` (dotted, integer parts index Sequentials) to ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def first_conv_to(model: nn.Module, name: str, in_channels: int) -> None:
    """Replace the conv ``model.<name>`` by one with ``in_channels`` inputs (re-initialised)."""
    old = model.get_submodule(name)
    if old.in_channels == in_channels:
        return
    replace_submodule(model, name, nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride,
                                             old.padding, bias=old.bias is not None))


def _torchvision(factory: Callable, first_conv: str) -> Callable[[int, int, int], nn.Module]:
    def build(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        model = factory(weights=None, num_classes=num_classes)
        first_conv_to(model, first_conv, in_channels)
        return model
    return build


class DenseNetModules(tvm.DenseNet):
    """torchvision's DenseNet with the head's ReLU and global pooling as modules.

    torchvision applies them functionally (and the ReLU in place) in ``forward``; as modules they
    can be hooked by LRP rules (the pooling gets the proportional rule, as ResNet's ``avgpool``)
    and captured. Parameters and state_dict keys are torchvision's, so its weights load as is.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.head_relu = nn.ReLU()
        self.head_pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.head_pool(self.head_relu(self.features(x))), 1))


def _densenet(growth_rate: int, block_config: tuple[int, ...], num_init_features: int):
    def build(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        model = DenseNetModules(growth_rate=growth_rate, block_config=block_config,
                                num_init_features=num_init_features, num_classes=num_classes)
        first_conv_to(model, "features.conv0", in_channels)
        return model
    return build


def _vit(patch_size: int, num_layers: int, num_heads: int, hidden_dim: int, mlp_dim: int):
    def build(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        m = tvm.VisionTransformer(image_size=image_size, patch_size=patch_size, num_layers=num_layers,
                                  num_heads=num_heads, hidden_dim=hidden_dim, mlp_dim=mlp_dim,
                                  num_classes=num_classes)
        first_conv_to(m, "conv_proj", in_channels)
        # torchvision initialises the head to zero: every logit would be 0 and every explanation empty
        nn.init.trunc_normal_(m.heads.head.weight, std=0.02)
        return m
    return build


# --- default layers and canonizers --------------------------------------------------------------

def _resnet_layers(model: nn.Module) -> list[str]:
    return ["layer2", "layer3", "layer4"]


def _vgg_layers(model: nn.Module) -> list[str]:
    relus = [n for n, m in model.features.named_children() if isinstance(m, nn.ReLU)]
    picks = [relus[len(relus) // 2 - 1], relus[(3 * len(relus)) // 4 - 1], relus[-1]]
    return [f"features.{n}" for n in dict.fromkeys(picks)]


def _densenet_layers(model: nn.Module) -> list[str]:
    # transition outputs (pooled, 1/2 the block's channels) and the last block: early/middle/late
    blocks = [n for n, _ in model.features.named_children() if n.startswith("transition")]
    return [f"features.{blocks[0]}", f"features.{blocks[-1]}", "head_relu"]


def _vit_layers(model: nn.Module) -> list[str]:
    blocks = [n for n, _ in model.encoder.layers.named_children()]
    return [f"encoder.layers.{blocks[len(blocks) // 2 - 1]}", f"encoder.layers.{blocks[-1]}"]


def _resnet_trunk(model: nn.Module) -> nn.Module:
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    return nn.Sequential(OrderedDict((n, getattr(model, n)) for n in names))


def _densenet_trunk(model: nn.Module) -> nn.Module:
    return nn.Sequential(OrderedDict([("features", model.features), ("head_relu", model.head_relu)]))


def _resnet_canonizers(model: nn.Module) -> list:
    from zennit.torchvision import ResNetCanonizer

    return [ResNetCanonizer()]


def _vgg_canonizers(model: nn.Module) -> list:
    from zennit.torchvision import VGGCanonizer

    return [VGGCanonizer()]


def _densenet_canonizers(model: nn.Module) -> list:
    """Fold the BatchNorms that follow a convolution (``norm0``, each dense layer's ``norm2``);
    the pre-activation BatchNorms (``norm1``, transitions, ``norm5``) read a concatenation and
    cannot be folded: they keep zennit's Pass rule, which :mod:`~cxr_audit.explain.fast_lrp`
    reproduces (see :class:`~cxr_audit.explain.fast_lrp.PassBatchNorm`)."""
    from zennit.canonizers import NamedMergeBatchNorm

    from cxr_audit.explain.fast_lrp import conv_batchnorm_pairs

    return [NamedMergeBatchNorm([([conv], bn) for conv, bn in conv_batchnorm_pairs(model)])]


for _name, _factory in (("resnet18", tvm.resnet18), ("resnet34", tvm.resnet34), ("resnet50", tvm.resnet50)):
    register(ArchSpec(_name, _torchvision(_factory, "conv1"), _resnet_layers, "layer4", "fast",
                      _resnet_canonizers, _name, "conv1", early_layers=("layer1",), trunk=_resnet_trunk))
for _name, _factory in (("vgg11", tvm.vgg11), ("vgg16", tvm.vgg16)):
    register(ArchSpec(_name, _torchvision(_factory, "features.0"), _vgg_layers, "features", "fast",
                      _vgg_canonizers, _name, "features.0", recommended_lr=1e-4))
register(ArchSpec("densenet121", _densenet(32, (6, 12, 24, 16), 64), _densenet_layers, "head_relu", "fast",
                  _densenet_canonizers, "densenet121", "features.conv0", trunk=_densenet_trunk))
#: a 4-block DenseNet small enough for tests and CPU benchmarks (same modules as densenet121)
register(ArchSpec("densenet_tiny", _densenet(8, (2, 2, 2, 2), 16), _densenet_layers, "head_relu", "fast",
                  _densenet_canonizers, None, "features.conv0", trunk=_densenet_trunk))
register(ArchSpec("vit_b_16", _vit(16, 12, 12, 768, 3072), _vit_layers, None, "vit", torchvision_name="vit_b_16",
                  first_conv="conv_proj"))
register(ArchSpec("vit_tiny", _vit(8, 4, 4, 64, 128), _vit_layers, None, "vit", first_conv="conv_proj"))


def _register_protopnets() -> None:
    """``protopnet:<backbone>`` for every architecture with a convolutional trunk."""
    from cxr_audit.models.protopnet import protopnet_builder, protopnet_layers

    for backbone in [name for name, spec in _REGISTRY.items() if spec.trunk is not None]:
        register(ArchSpec(f"protopnet:{backbone}", protopnet_builder(backbone), protopnet_layers, "add_on",
                          canonizers=_REGISTRY[backbone].canonizers,  # the trunk's; they match modules by type
                          first_conv=f"features.{_REGISTRY[backbone].first_conv}",
                          recommended_lr=_REGISTRY[backbone].recommended_lr, tags=("protopnet",),
                          lrp_rules=_prp_rules, prototype_layer="similarity"))


def _prp_rules() -> list:
    from cxr_audit.explain.prp import prp_rules

    return prp_rules()


_register_protopnets()


# --- user factories -----------------------------------------------------------------------------

def trust_factory(arch: str) -> ArchSpec:
    """Register a user's ``module:factory`` (given on their command line) as an architecture.

    The factory is called with only the keyword arguments its signature accepts among
    ``num_classes``, ``in_channels`` and ``image_size``; an unknown torchvision name, an import
    error or a factory that fails is a :class:`UsageError`.
    """
    if arch in _REGISTRY or _torchvision_alias(arch):
        return spec_of(arch)
    module_name, sep, attr = arch.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"unknown architecture '{arch}' (choose from: {', '.join(names())} or module:factory)")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"cannot import model factory '{arch}': {exc}") from None
    if not callable(factory):
        raise UsageError(f"model factory '{arch}' is not callable")
    return register(ArchSpec(arch, _factory_builder(arch, factory), tags=("factory",)))


def _factory_builder(arch: str, factory: Callable) -> Callable[[int, int, int], nn.Module]:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())

    def build(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        offered = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
        kwargs = {k: v for k, v in offered.items() if k in params}
        if takes_kwargs and not kwargs:
            kwargs = {"num_classes": num_classes}
        if "weights" in params:
            kwargs["weights"] = None  # never download hub weights
        try:
            model = factory(**kwargs)
        except Exception as exc:  # a user's code: report it in one line
            raise UsageError(f"model factory '{arch}' failed with {sorted(kwargs)}: {exc}") from None
        if not isinstance(model, nn.Module):
            raise UsageError(f"model factory '{arch}' returned {type(model).__name__}, not a torch.nn.Module")
        return model
    return build


def build_model(arch: str, num_classes: int, in_channels: int = 1, image_size: int = 224) -> nn.Module:
    """An untrained model of a registered architecture, with in-place ReLUs turned off."""
    model = spec_of(arch).build(num_classes, in_channels, image_size)
    # in-place ReLUs overwrite the tensors that explanation hooks hold on to
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    return model
