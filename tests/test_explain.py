import pytest
import torch
import torch.nn as nn
from cxr_audit.data.dataset import Preprocessing
from cxr_audit.explain import conditional_heatmaps, create_method, default_layers, explain_batch
from cxr_audit.explain.core import layer_attribution
from cxr_audit.explain.vit import DetachedSoftmaxAttention
from cxr_audit.models.architectures import build_model, names, spec_of

PREP = Preprocessing(size=64)


def _bias_free(arch):
    """A model whose only relevance sink is epsilon: biases and BN shifts zeroed (BN scale kept)."""
    torch.manual_seed(0)
    model = build_model(arch, 3, 1, 64).eval()
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            nn.init.zeros_(m.bias)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _explain(model, arch, x, method="lrp", layers=None):
    attribution = create_method(method, model, arch, PREP)
    capture = attribution.capture(layers or default_layers(arch, model))
    with attribution.rules(), capture.attached(attribution.model):
        return explain_batch(attribution, capture, x, {"pred": None}), attribution, capture


FAST_ARCHS = [name for name in names() if spec_of(name).lrp == "fast" and not name.endswith(("50", "16", "121", "34"))]


def test_every_fast_architecture_is_tested_here():
    assert {"resnet18", "vgg11", "densenet_tiny"} <= set(FAST_ARCHS)


@pytest.mark.parametrize("arch", FAST_ARCHS)
def test_lrp_conserves_relevance_at_input_and_every_layer(arch):
    model = _bias_free(arch)
    x = torch.randn(3, 1, 64, 64)
    expl, _, _ = _explain(model, arch, x)
    target_logit = expl.logits.gather(1, expl.targets["pred"][:, None])[:, 0]
    assert (target_logit.abs() > 1e-3).all()
    torch.testing.assert_close(expl.heatmaps["pred"].sum((1, 2)), target_logit, rtol=0.05, atol=1e-4)
    for rel in expl.relevances.values():
        torch.testing.assert_close(rel.sum(1), target_logit, rtol=0.05, atol=1e-4)
    # relevance is spread over the image, not a constant
    assert expl.heatmaps["pred"].std() > 0


def test_lrp_rules_leave_model_unchanged_and_outputs_equal():
    model = build_model("resnet18", 2, 1, 64).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 1, 64, 64)
    before = model(x)
    expl, _, _ = _explain(model, "resnet18", x)
    torch.testing.assert_close(expl.logits, before, atol=1e-3, rtol=1e-3)  # BN folding rounds a little
    torch.testing.assert_close(model(x), before)  # canonizers undone


def test_crp_channel_relevances_and_conditional_heatmaps():
    arch = "vgg11"
    model = _bias_free(arch)
    layer = default_layers(arch, model)[1]
    x = torch.randn(2, 1, 64, 64)
    expl, attribution, capture = _explain(model, arch, x, layers=[layer])
    rel = expl.relevances[layer]  # (N, C)
    full = expl.heatmaps["pred"]
    top = rel.abs().argsort(dim=1, descending=True)[:, :5]
    mask = torch.zeros_like(rel).scatter_(1, top, 1.0)
    with attribution.rules(), capture.attached(attribution.model):
        cond = conditional_heatmaps(attribution, capture, x, layer, mask)
        rest = conditional_heatmaps(attribution, capture, x, layer, 1 - mask)
    # a concept's conditional heatmap carries exactly that concept's relevance ...
    torch.testing.assert_close(cond.sum((1, 2)), (rel * mask).sum(1), rtol=0.05, atol=1e-4)
    # ... and concepts partition the full explanation
    torch.testing.assert_close(cond + rest, full, rtol=1e-3, atol=1e-5)
    assert not torch.allclose(cond, full)


def test_layer_attribution_starts_at_the_layer():
    arch = "resnet18"
    model = _bias_free(arch)
    x = torch.randn(2, 1, 64, 64)
    attribution = create_method("lrp", model, arch, PREP)
    capture = attribution.capture(["layer2"])
    direction = torch.randn(128)
    with attribution.rules(), capture.attached(attribution.model):
        heat = layer_attribution(attribution, capture, x, "layer2",
                                 lambda a: a.clamp(min=0) * direction[None, :, None, None])
        start = (capture.outputs["layer2"].detach().clamp(min=0) * direction[None, :, None, None]).sum((1, 2, 3))
    torch.testing.assert_close(heat.sum((1, 2)), start, rtol=0.05, atol=1e-4)


def test_vit_relevance_is_finite_nonconstant_and_rules_are_per_instance():
    torch.manual_seed(0)
    model = build_model("vit_tiny", 2, 1, 64).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    other = build_model("vit_tiny", 2, 1, 64).eval()
    x = torch.randn(2, 1, 64, 64)
    before = model(x)
    expl, _, _ = _explain(model, "vit_tiny", x)
    heat = expl.heatmaps["pred"]
    assert torch.isfinite(heat).all() and heat.std() > 0
    torch.testing.assert_close(expl.logits, before, atol=1e-4, rtol=1e-4)  # rules change backward only
    assert all(torch.isfinite(r).all() and r.abs().sum() > 0 for r in expl.relevances.values())
    # relevance is conserved from block to block (linearised blocks + residuals)
    first, last = expl.relevances.values()
    torch.testing.assert_close(first.sum(1), last.sum(1), rtol=0.05, atol=1e-4)
    # rules were swapped on this instance only, and undone afterwards
    assert not any(isinstance(m, DetachedSoftmaxAttention) for m in model.modules())
    assert not any(isinstance(m, DetachedSoftmaxAttention) for m in other.modules())


def test_gradcam_and_gradient_x_input():
    model = _bias_free("resnet18")
    x = torch.randn(2, 1, 64, 64)
    cam, _, _ = _explain(model, "resnet18", x, method="gradcam", layers=["layer3"])
    assert cam.heatmaps["pred"].shape == (2, 64, 64) and (cam.heatmaps["pred"] >= 0).all()
    gxi, _, _ = _explain(model, "resnet18", x, method="gxi", layers=["layer3"])
    assert gxi.heatmaps["pred"].shape == (2, 64, 64) and gxi.relevances["layer3"].shape == (2, 256)


@pytest.mark.parametrize("arch", FAST_ARCHS)
def test_fast_lrp_and_fast_zplus_rule_equal_zennit_epsilon_plus_flat(arch):
    """`lrp` (modified-gradient LRP) and `lrp-zennit` (with the one-term z+ rule) must both give
    exactly what zennit's stock EpsilonPlusFlat composite with canonizers gives (with the z-rule,
    zennit's ``Norm``, for BatchNorms that no canonizer can fold: DenseNet's pre-activation ones)."""
    from zennit.composites import EpsilonPlusFlat
    from zennit.rules import Norm
    from zennit.types import BatchNorm

    torch.manual_seed(1)
    model = build_model(arch, 2, 1, 64).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics, so folding matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.normal_(0, 0.1)
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 1, 64, 64)
    layers = default_layers(arch, model)
    fast, fast_method, _ = _explain(model, arch, x)
    assert type(fast_method).__name__ == "FastLRP"
    hooked, _, _ = _explain(model, arch, x, method="lrp-zennit")
    stock = create_method("lrp-zennit", model, arch, PREP)
    stock.composite = lambda: EpsilonPlusFlat(layer_map=[(BatchNorm, Norm())], canonizers=stock._canonizers())
    capture = stock.capture(layers)
    with stock.rules(), capture.attached(stock.model):
        reference = explain_batch(stock, capture, x, {"pred": None})
    scale = reference.heatmaps["pred"].abs().max()
    for result in (fast, hooked):
        torch.testing.assert_close(result.heatmaps["pred"] / scale, reference.heatmaps["pred"] / scale,
                                   rtol=1e-3, atol=1e-4)
        for layer in layers:
            ref = reference.relevances[layer]
            torch.testing.assert_close(result.relevances[layer] / ref.abs().max(), ref / ref.abs().max(),
                                       rtol=1e-3, atol=1e-4)
    assert not torch.allclose(fast.heatmaps["pred"], torch.zeros_like(fast.heatmaps["pred"]))


def test_pixel_value_first_rules_conserve_and_intensity_follows_bright_strokes():
    """The z^B and intensity input rules (options for masks) keep the first layer's relevance;
    the intensity rule, unlike Flat, puts it on a bright stroke rather than the dark margin."""
    model = _bias_free("resnet18")
    x = torch.full((2, 1, 64, 64), (0.05 - PREP.mean) / PREP.std)  # a dark image in normalised units
    x[:, :, :, 30:32] = (0.95 - PREP.mean) / PREP.std  # with a 2-px bright vertical line
    heat = {}
    for rule in ("flat", "zbox", "intensity"):
        attribution = create_method("lrp", model, "resnet18", PREP)
        attribution.first_rule = rule
        capture = attribution.capture([])
        with attribution.rules(), capture.attached(attribution.model):
            expl = explain_batch(attribution, capture, x, {"pred": None})
        heat[rule] = expl.heatmaps["pred"]
    for rule in ("zbox", "intensity"):
        torch.testing.assert_close(heat[rule].sum((1, 2)), heat["flat"].sum((1, 2)), rtol=0.02, atol=1e-4)
    line = torch.zeros(64, 64, dtype=torch.bool)
    line[:, 30:32] = True
    margin = torch.zeros(64, 64, dtype=torch.bool)
    margin[:, 26:30] = margin[:, 32:36] = True

    def share_on_line(h):
        h = h.abs()
        return (h[:, line].sum(1) / (h[:, line].sum(1) + h[:, margin].sum(1))).mean()

    assert share_on_line(heat["intensity"]) > share_on_line(heat["flat"]) + 0.3
