"""LRP for ReLU convolutional networks (VGG, ResNet, DenseNet) as a modified gradient, without per-layer backward hooks.

Every LRP rule used by the EpsilonPlusFlat composite can be written as "gradient x input" of a
network whose forward values are unchanged but whose local Jacobians are replaced (the
"gradient-based LRP" view of Montavon et al., 2019, and Ancona et al., 2018, ICLR):

* z+ (convolutions after a ReLU, inputs x >= 0): ``out = z`` with gradient
  ``W+^T (g * z / z+)`` where ``z+ = conv(x, W+) + b+``; then ``x * grad`` is z+ relevance.
* epsilon (dense layers): gradient ``W^T (g * z / (z + eps sign z))``.
* ReLU, max-pool, average-pool and residual sums: the plain gradient already implements
  the Pass / winner-take-all / proportional (Norm) rules in this view.
* flat (first layer): relevance ``z1 * g1`` at the first layer's output is spread uniformly over
  each receptive field with one transposed convolution of ones.

BatchNorm is folded into the preceding convolution on a private copy of the model (the model
passed in is never modified); a BatchNorm that reads a concatenation (DenseNet's pre-activation
ones) cannot be folded and keeps its plain gradient, the z-rule (see :func:`_fold_batchnorm`). Per convolution this costs two forward convolutions and one
input-gradient convolution, versus one forward plus three (z+ with zennit's hooks: the
ordinary backward, a modified forward and its backward) and the hook/clone overhead.
``tests/test_explain.py`` checks that it matches zennit's EpsilonPlusFlat with canonizers.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from cxr_audit.models.architectures import replace_submodule

EPSILON = 1e-6


def _stabilise(z: torch.Tensor, eps: float) -> torch.Tensor:
    return z + eps * torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))


class _ZPlusFunction(torch.autograd.Function):
    """``conv(x)`` whose backward is the z+ rule ``W+^T (g * z / (z+ + eps))`` for ``x >= 0``.

    One autograd node instead of an expression graph: the only tensor kept for the backward is the
    ratio ``z / z+``, computed in place in ``z+``'s buffer (element-wise passes over full-size
    activations cost as much as a convolution on a CPU)."""

    @staticmethod
    def forward(ctx, x, conv: nn.Conv2d, weight_pos, bias_pos):
        z = conv(x)
        ratio = F.conv2d(x, weight_pos, bias_pos, conv.stride, conv.padding, conv.dilation, conv.groups)
        torch.div(z, ratio.add_(EPSILON), out=ratio)  # x, W+, b+ >= 0, so z+ >= 0: the stabiliser is +eps
        ctx.save_for_backward(ratio, weight_pos)
        ctx.conv, ctx.input_shape = conv, x.shape
        return z

    @staticmethod
    def backward(ctx, grad):
        ratio, weight_pos = ctx.saved_tensors
        c = ctx.conv
        scaled = grad * ratio
        # under autocast the ratio and the incoming gradient may be bf16 while W+ is fp32; a transposed
        # convolution is the input gradient, and oneDNN runs it ~8 % faster than conv2d_input
        grad_x = F.conv_transpose2d(scaled, weight_pos.to(scaled.dtype), None, c.stride, c.padding,
                                    _output_padding(ctx.input_shape, scaled, c), c.groups, c.dilation)
        return grad_x, None, None, None


class ZPlusConv(nn.Module):
    """Forward = the convolution; backward = the z+ rule (valid for non-negative inputs)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        self.register_buffer("weight_pos", conv.weight.detach().clamp(min=0), persistent=False)
        bias = conv.bias.detach().clamp(min=0) if conv.bias is not None else None
        self.register_buffer("bias_pos", bias, persistent=False)

    def forward(self, x):
        if not torch.is_grad_enabled() or not x.requires_grad:
            return self.conv(x)
        return _ZPlusFunction.apply(x, self.conv, self.weight_pos, self.bias_pos)


class EpsilonLinear(nn.Module):
    """Forward = the linear layer; backward = the epsilon rule."""

    def __init__(self, linear: nn.Linear, epsilon: float = EPSILON):
        super().__init__()
        self.linear = linear
        self.epsilon = epsilon

    def forward(self, x):
        z = self.linear(x)
        if not torch.is_grad_enabled() or not x.requires_grad:
            return z
        scale = (z / _stabilise(z, self.epsilon)).detach()
        return z * scale + (z - z * scale).detach()


class FlatInputConv(nn.Module):
    """The first convolution: its output becomes the leaf the backward pass stops at, and the
    flat rule maps the relevance there to pixels (see :meth:`pixel_relevance`)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        self.output: torch.Tensor | None = None
        self.input: torch.Tensor | None = None
        self.input_shape: torch.Size | None = None

    def forward(self, x):
        z = self.conv(x)
        self.input = x.detach()
        self.input_shape = x.shape
        if torch.is_grad_enabled():
            z = z.detach().requires_grad_(True)
        self.output = z
        return z

    def pixel_relevance(self, grad: torch.Tensor, rule: str = "flat",
                        bounds: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``(N, C_out, h, w)`` gradient at the output -> ``(N, H, W)`` pixel relevance.

        ``rule="flat"`` spreads each position's relevance uniformly over its receptive field (the
        Flat rule); ``"upsample"`` sums it over channels and resizes bilinearly to the input, which
        keeps small or thin structures (a 2-px frame) sharper than a 7x7 flat spread, at the
        cost of exact conservation. Two rules weigh pixels by their values, with ``bounds = (low,
        high)`` the normalised pixel range: ``"zbox"``, the z^B rule for bounded inputs (Montavon
        et al., 2017, Pattern Recognition 65:211), shares each position's relevance by how far each
        pixel lies from the bound its weight points away from (dark pixels under negative weights
        count as much as bright ones under positive weights); ``"intensity"`` is the z+ rule on the
        raw, non-negative intensities ``x - low`` — relevance goes to bright pixels only, which
        suits radiopaque artifacts (burned-in text, markers, rulers) and not dark ones.
        """
        c = self.conv
        relevance = self.output.detach() * grad
        if rule in ("zbox", "intensity"):
            return self._bounded(relevance, bounds, positive_only=rule == "intensity")
        if rule == "upsample":
            up = F.interpolate(relevance.sum(1, keepdim=True), size=self.input_shape[-2:], mode="bilinear",
                               align_corners=False)
            return up[:, 0] * (relevance.shape[-2] * relevance.shape[-1]) / (up.shape[-2] * up.shape[-1])
        if c.groups != 1:
            raise ValueError("the flat rule here assumes an ungrouped first convolution")
        # every output channel spreads over the same receptive field, so sum the channels first:
        # one single-channel transposed convolution instead of one per output channel
        ones_w = torch.ones(1, c.in_channels, *c.kernel_size, device=grad.device, dtype=grad.dtype)
        ones_x = torch.ones(1, *self.input_shape[1:], device=grad.device, dtype=grad.dtype)
        counts = F.conv2d(ones_x, ones_w, None, c.stride, c.padding, c.dilation)  # inputs per receptive field
        out = F.conv_transpose2d(relevance.sum(1, keepdim=True) / counts.clamp(min=1), ones_w, None, c.stride,
                                 c.padding, _output_padding(self.input_shape, grad, c), 1, c.dilation)
        return out.sum(1)


    def _bounded(self, relevance: torch.Tensor, bounds, positive_only: bool) -> torch.Tensor:
        if bounds is None:
            raise ValueError("pixel-value rules need the normalised pixel bounds")
        c, x = self.conv, self.input
        low = torch.as_tensor(bounds[0], dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1).expand_as(x)
        high = torch.as_tensor(bounds[1], dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1).expand_as(x)
        wp, wn = c.weight.clamp(min=0), c.weight.clamp(max=0)
        # (input, weight) pairs whose contributions input * weight add up to each position's z
        if positive_only:  # z+ on the non-negative intensities x - low
            terms = [(x - low, wp)]
        else:  # z^B: x w - low w+ - high w-
            terms = [(x, c.weight), (-low, wp), (-high, wn)]
        args = (c.stride, c.padding, c.dilation, c.groups)
        z = sum(F.conv2d(a, w, None, *args) for a, w in terms)
        s = relevance / _stabilise(z, EPSILON)
        pad = _output_padding(self.input_shape, relevance, c)
        return sum(a * F.conv_transpose2d(s, w, None, c.stride, c.padding, pad, c.groups, c.dilation)
                   for a, w in terms).sum(1)


def _output_padding(input_shape, grad, c: nn.Conv2d):
    pads = []
    for dim in (0, 1):
        size = (grad.shape[2 + dim] - 1) * c.stride[dim] - 2 * c.padding[dim] + c.dilation[dim] * (c.kernel_size[dim] - 1) + 1
        pads.append(input_shape[2 + dim] - size)
    return tuple(pads)


def conv_batchnorm_pairs(model: nn.Module, size: int = 64) -> list[tuple[str, str]]:
    """``(conv, batchnorm)`` module names where the BatchNorm2d reads the Conv2d's output and nothing
    else reads it, found by one probe forward pass (so no layout is assumed: ResNet's ``conv1/bn1``,
    VGG's Sequentials and DenseNet's ``conv1/norm2`` alike). Such a BatchNorm can be folded."""
    produced: dict[int, str] = {}
    readers: dict[int, int] = {}
    found: list[tuple[int, str]] = []
    keep: list[torch.Tensor] = []  # every probe tensor stays alive, so no id is reused

    def record(name, module):
        def pre(_m, inputs):
            if inputs and isinstance(inputs[0], torch.Tensor):
                key = id(inputs[0])
                keep.append(inputs[0])
                readers[key] = readers.get(key, 0) + 1
                if isinstance(module, nn.BatchNorm2d) and key in produced:
                    found.append((key, name))

        def post(_m, _inputs, output):
            keep.append(output)
            if isinstance(module, nn.Conv2d):
                produced[id(output)] = name
        return pre, post

    handles = []
    for name, module in model.named_modules():
        if next(module.children(), None) is None:  # leaves only
            pre, post = record(name, module)
            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, first.in_channels, size, size, device=first.weight.device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return [(produced[key], bn) for key, bn in found if readers.get(key) == 1]


def _fold_batchnorm(model: nn.Module) -> None:
    """Fold every BatchNorm2d found by :func:`conv_batchnorm_pairs` into its convolution. The
    others (DenseNet's pre-activation BatchNorms) stay: their plain gradient is the z-rule
    ``R_x = (a x / y) R_y`` for ``y = a x + b`` in this modified-gradient view, which the
    reference LRP gives them with zennit's ``Norm`` rule."""
    for conv_name, bn_name in conv_batchnorm_pairs(model):
        fused = fuse_conv_bn_eval(model.get_submodule(conv_name), model.get_submodule(bn_name))
        replace_submodule(model, conv_name, fused)
        replace_submodule(model, bn_name, nn.Identity())


def lrp_model(model: nn.Module) -> tuple[nn.Module, FlatInputConv]:
    """A frozen copy of a model whose gradient x input is EpsilonPlusFlat LRP; valid where every
    convolution after the first reads a non-negative input (``ArchSpec.lrp == "fast"``)."""
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    _fold_batchnorm(model)
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    first = None
    for i, (name, module) in enumerate(convs):
        wrapper = FlatInputConv(module) if i == 0 else ZPlusConv(module)
        first = wrapper if i == 0 else first
        replace_submodule(model, name, wrapper)
    for name, module in linears:
        replace_submodule(model, name, EpsilonLinear(module))
    return model, first
