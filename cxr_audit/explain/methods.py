"""Attribution methods by name. Each is a small class that knows how to

* install its backward rules on a model for the duration of a ``with method.rules():`` block,
* turn the input gradient into a ``(N, H, W)`` heatmap, and
* turn a layer's output and gradient into per-channel relevances ``(N, C)``.

Add a method by writing one class and one line in :data:`METHODS`.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from cxr_audit.data.dataset import Preprocessing
from cxr_audit.errors import UsageError
from cxr_audit.explain.capture import LayerCapture, sum_over_space
from cxr_audit.explain.vit import vit_lrp_rules
from cxr_audit.models.architectures import spec_of
from cxr_audit.options import choice, typed_options


class AttributionMethod:
    name = "base"
    #: False when relevance must be read as gradient x activation (gradient-based methods).
    relevance_is_gradient = False
    #: Layers the method itself must capture (GradCAM's target layer).
    needed_layers: tuple[str, ...] = ()
    #: the options ``--option KEY=VALUE`` may set (:func:`cxr_audit.options.typed_options`)
    option_types: dict[str, type] = {}

    def __init__(self, model: nn.Module, arch: str, prep: Preprocessing, **options):
        self.model = model
        self.arch = arch
        self.prep = prep
        self.options = typed_options(f"--method {self.name}", self.option_types, options)

    def rules(self):
        return nullcontext()

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """The tensor fed to :attr:`model`; by default a leaf that requires grad."""
        return x.detach().requires_grad_(True)

    def gradient_leaf(self, x: torch.Tensor) -> torch.Tensor:
        """The tensor the backward pass differentiates with respect to (after the forward)."""
        return x

    def start_gradient(self, activation: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
        """Gradient to inject at a layer so that the layer's relevance equals ``relevance``."""
        if self.relevance_is_gradient:
            return relevance
        safe = torch.where(activation == 0, torch.ones_like(activation), activation)
        return torch.where(activation == 0, torch.zeros_like(relevance), relevance / safe)

    def capture(self, layers: list[str]) -> LayerCapture:
        """A :class:`LayerCapture` for ``layers`` plus any layer this method itself reads."""
        return LayerCapture(list(dict.fromkeys(list(layers) + list(self.needed_layers))))

    def input_heatmap(self, x: torch.Tensor, x_grad: torch.Tensor, capture: LayerCapture) -> torch.Tensor:
        """Relevance per pixel, summed over channels: ``(N, C, H, W)`` -> ``(N, H, W)``."""
        return (x_grad * x).sum(1) if not self.relevance_is_gradient else x_grad.sum(1)

    def layer_relevance(self, output: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Per-channel relevance ``(N, C)``; sums to the layer's total relevance."""
        return sum_over_space(grad if self.relevance_is_gradient else grad * output)


class LRP(AttributionMethod):
    """Layer-wise Relevance Propagation (Bach et al., 2015, PLoS ONE 10:e0130140) with zennit's
    EpsilonPlusFlat composite (Montavon et al., 2019, "Layer-wise relevance propagation: an
    overview") and BatchNorm-folding / explicit-residual canonizers for VGG and ResNet.

    This is the reference implementation (and the one used for custom architectures);
    ``lrp`` on VGG/ResNet uses :class:`FastLRP`, which is tested to give the same relevance.
    """

    name = "lrp-zennit"
    relevance_is_gradient = True
    option_types = {"epsilon": float}  # the Epsilon rule's stabiliser on dense layers (default 1e-6)

    def composite(self):
        from zennit.composites import EpsilonPlusFlat

        return EpsilonPlusFlat(epsilon=self.options.get("epsilon", 1e-6),
                               layer_map=spec_of(self.arch).lrp_rules() + self._fast_conv_rule(),
                               canonizers=self._canonizers())

    def _fast_conv_rule(self):
        """Where every convolution after the first (Flat) one reads a ReLU/pooling output (an
        architecture with ``lrp="fast"``), ZPlus's negative-input term is identically zero; skipping
        it halves the backward cost. BatchNorms left after the canonizers (DenseNet's pre-activation
        ones) get the z-rule (``Norm``), as :mod:`~cxr_audit.explain.fast_lrp` gives them."""
        from zennit.rules import Norm
        from zennit.types import BatchNorm, Convolution

        from cxr_audit.explain.rules import NonNegativeInputZPlus

        if spec_of(self.arch).lrp != "fast":
            return []
        return [(Convolution, NonNegativeInputZPlus()), (BatchNorm, Norm())]

    def _canonizers(self):
        return spec_of(self.arch).canonizers(self.model)

    @contextmanager
    def rules(self):
        with self.composite().context(self.model):
            yield


class FastLRP(AttributionMethod):
    """EpsilonPlusFlat LRP for VGG/ResNet as a modified gradient on a BatchNorm-folded copy of the
    model (see :mod:`cxr_audit.explain.fast_lrp`): same relevance as :class:`LRP`, without
    per-layer hooks, and the backward pass stops at the first layer."""

    name = "lrp"
    option_types = {"first_rule": str}

    def __init__(self, model, arch, prep, **options):
        from cxr_audit.explain.fast_lrp import lrp_model

        super().__init__(model, arch, prep, **options)
        self.model, self.first_layer = lrp_model(model)
        self.first_rule = choice("first-layer rule", self.options.get("first_rule", "flat"), FIRST_RULES)

    def prepare_input(self, x):
        return x.detach()

    def gradient_leaf(self, x):
        return self.first_layer.output

    def input_heatmap(self, x, x_grad, capture):
        bounds = None
        if self.first_rule in ("zbox", "intensity"):
            bounds = tuple(torch.as_tensor(b) for b in self.prep.bounds())
        return self.first_layer.pixel_relevance(x_grad, self.first_rule, bounds)


class LRPGammaBox(LRP):
    """LRP with zennit's EpsilonGammaBox: ZBox on the input layer (bounded by the normalised
    pixel range), Gamma(0.25) on convolutions, Epsilon on dense layers (Montavon et al., 2019)."""

    name = "lrp-gammabox"
    option_types = {"epsilon": float, "gamma": float}  # defaults 1e-6 and 0.25

    def composite(self):
        from zennit.composites import EpsilonGammaBox

        low, high = (b.reshape(1, -1, 1, 1) for b in self.prep.bounds())
        return EpsilonGammaBox(low=low, high=high, epsilon=self.options.get("epsilon", 1e-6),
                               gamma=self.options.get("gamma", 0.25), layer_map=spec_of(self.arch).lrp_rules(),
                               canonizers=self._canonizers())


class ViTLRP(AttributionMethod):
    """CP-LRP / AttnLRP-style relevance for Vision Transformers (see :mod:`cxr_audit.explain.vit`)."""

    name = "lrp"

    def rules(self):
        return vit_lrp_rules(self.model)


class GradientXInput(AttributionMethod):
    """Gradient x input (Shrikumar et al., 2016, arXiv:1605.01713), for comparison."""

    name = "gxi"


class GradCAM(AttributionMethod):
    """Grad-CAM (Selvaraju et al., 2017, ICCV) at ``cam_layer`` (default: the last conv block),
    upsampled to the input size. Channel relevances are gradient x activation at each layer."""

    name = "gradcam"
    option_types = {"cam_layer": str}

    def __init__(self, model, arch, prep, **options):
        super().__init__(model, arch, prep, **options)
        self.cam_layer = self.options.get("cam_layer") or spec_of(arch).cam_layer
        if self.cam_layer is None:
            raise UsageError(f"gradcam needs --cam-layer for architecture '{arch}'")
        self.needed_layers = (self.cam_layer,)

    def input_heatmap(self, x, x_grad, capture):
        act, grad = capture.outputs[self.cam_layer], capture.grads[self.cam_layer]
        if act.dim() != 4:
            raise UsageError(f"gradcam layer '{self.cam_layer}' is not a convolutional feature map")
        weights = grad.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * act).sum(1, keepdim=True))
        return F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


#: how relevance at the first layer reaches the pixels (fast LRP's ``first_rule``): "flat" (LRP), or
#: "upsample" / "zbox" / "intensity" (sharper masks; see
#: :meth:`~cxr_audit.explain.fast_lrp.FlatInputConv.pixel_relevance`)
FIRST_RULES = ("flat", "upsample", "zbox", "intensity")

METHODS: dict[str, type[AttributionMethod]] = {
    cls.name: cls for cls in (FastLRP, LRP, LRPGammaBox, GradientXInput, GradCAM)
}


def create_method(name: str, model: nn.Module, arch: str, prep: Preprocessing, **options) -> AttributionMethod:
    """Instantiate an attribution method with its ``options`` (strings from ``--option`` or typed
    values; checked against its ``option_types``); ``lrp*`` follows the architecture's
    ``ArchSpec.lrp`` (transformer rules for a ViT, zennit's hooks where the fast path does not
    apply — each with its own options)."""
    cls = METHODS[choice("attribution method", name, METHODS)]
    kind = spec_of(arch).lrp
    if kind == "vit" and (issubclass(cls, LRP) or cls is FastLRP):
        cls = ViTLRP
    elif cls is FastLRP and kind != "fast":
        cls = LRP  # other architectures: zennit's composite without assumptions on layer order
    return cls(model, arch, prep, **options)


def default_layers(arch: str, model: nn.Module) -> list[str]:
    """Early/middle/late layers whose concepts a scan records by default."""
    return spec_of(arch).scan_layers(model)
