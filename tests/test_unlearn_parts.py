"""Each mitigation alone: inert when it should be, gradients reach the parameters, registry and
balancing behave; the engine's freezing and sharded batches."""

import numpy as np
import pytest
import torch
from cxr_audit.errors import UsageError
from cxr_audit.models.projection import install_projection
from cxr_audit.models.registry import build_model
from cxr_audit.numerics.tensors import pooled_max
from cxr_audit.training.balance import balanced_weights
from cxr_audit.training.engine import ShardedBatchSampler, freeze_up_to
from cxr_audit.unlearn import MITIGATIONS, Context, GroupBalance, get_mitigation


def tiny(seed=0):
    torch.manual_seed(seed)
    return build_model("resnet18", 2, 1, 32).train()


def batch(n=4, size=32, artifact_mask=True, fg=None):
    torch.manual_seed(1)
    b = {"image": torch.randn(n, 1, size, size), "label": torch.tensor([0, 1] * (n // 2)),
         "index": torch.arange(n)}
    if artifact_mask:
        m = torch.zeros(n, 1, size, size)
        m[:, :, :6, :6] = 1
        b["artifact_mask"] = m
    b["mask"] = torch.ones(n, 1, size, size) if fg is None else fg
    return b


def grads_reach(model, penalty):
    model.zero_grad()
    penalty.backward()
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_registry_has_every_method_of_the_issue():
    assert {"none", "rrr", "rrclarc", "pclarc", "aclarc", "isnet", "exbl", "balance"} <= set(MITIGATIONS)
    with pytest.raises(UsageError, match="unknown --method"):
        get_mitigation("magic")


def test_missing_requirements_are_named():
    with pytest.raises(UsageError, match="annotations"):
        get_mitigation("rrclarc").check(Context(num_classes=2))
    with pytest.raises(UsageError, match="artifact_mask"):
        get_mitigation("rrr").check(Context(num_classes=2))
    with pytest.raises(UsageError, match="lung"):
        get_mitigation("isnet").check(Context(num_classes=2))


def test_rrr_is_inert_without_artifact_and_trains_with_one():
    model, rrr = tiny(), get_mitigation("rrr")
    b = batch()
    b["artifact_mask"].zero_()
    _, penalty = rrr.forward(model, b, b["image"])
    assert penalty is None
    b = batch()
    _, penalty = rrr.forward(model, b, b["image"])
    assert penalty.item() > 0 and grads_reach(model, penalty)


def test_rrclarc_is_zero_for_a_cav_the_head_cannot_see():
    model = tiny()
    w = model.fc.weight.detach()  # (2, 512): layer4 reaches the logits only through these rows
    v = torch.randn(512)
    v -= w.T @ torch.linalg.lstsq(w @ w.T, w @ v).solution  # project out the row space
    v /= v.norm()
    ctx = Context(num_classes=2, layer="layer4", cav=v)
    method = get_mitigation("rrclarc", per_position=False)
    method.prepare(model, ctx, [])
    b = batch()
    _, penalty = method.forward(model, b, b["image"])
    assert penalty.item() < 1e-10
    ctx.cav = w[0] / w[0].norm()
    _, penalty = method.forward(model, b, b["image"])
    assert penalty.item() > 1e-8 and grads_reach(model, penalty)
    method.finish(model)
    assert not model.layer4._forward_hooks


def test_isnet_background_loss_vanishes_when_everything_is_foreground():
    model, method = tiny(), get_mitigation("isnet")
    b = batch()
    method.prepare(model, Context(num_classes=2), [b])
    method.band = (0.0, float("inf"))
    _, penalty = method.forward(model, b, b["image"])
    assert penalty.item() == pytest.approx(0.0, abs=1e-7)
    fg = torch.zeros(4, 1, 32, 32)
    fg[:, :, 8:24, 8:24] = 1
    b = batch(fg=fg)
    _, penalty = method.forward(model, b, b["image"])
    assert penalty.item() > 0 and grads_reach(model, penalty)


def test_exbl_is_inert_when_good_and_bad_exemplars_agree():
    model = tiny()
    same = torch.ones(32, 32) * 0.5
    method = get_mitigation("exbl", good=same, bad=same, margin=0.0)
    method.prepare(model, Context(num_classes=2, options={"cam_layer": "layer4"}), [])
    b = batch()
    _, penalty = method.forward(model, b, b["image"])
    assert penalty.item() == 0.0
    good, bad = torch.zeros(32, 32), torch.zeros(32, 32)
    good[8:24, 8:24], bad[:6, :6] = 1, 1
    method = get_mitigation("exbl", good=good, bad=bad, margin=1.0)
    # layer3 (2 x 2 at 32 px): layer4's 1 x 1 CAM is constant after max-normalisation, so its exact
    # gradient is 0 and only rounding noise could reach the weights
    method.prepare(model, Context(num_classes=2, options={"cam_layer": "layer3"}), [])
    _, penalty = method.forward(model, b, b["image"])
    assert penalty.item() > 0 and grads_reach(model, penalty)


def test_aclarc_shifts_only_clean_samples_towards_the_artifact():
    model = tiny().eval()
    v = torch.zeros(256)
    v[3] = 1.0
    ctx = Context(num_classes=2, layer="layer3", cav=v, artifact={0: 1, 1: 0, 2: 1, 3: 0})
    b = batch()
    method = get_mitigation("aclarc")
    method.prepare(model, ctx, [b])
    seen = {}
    probe = model.layer3.register_forward_hook(lambda m, i, o: seen.__setitem__("a", o))
    method.forward(model, b, b["image"])
    probe.remove()
    scores = pooled_max(seen["a"]) @ v
    ref = method.references["artifact"]
    assert torch.allclose(scores[[1, 3]], torch.full((2,), ref), atol=1e-4)  # clean rows moved to the artifact mean
    method.finish(model)


def test_projection_sets_every_sample_to_the_reference():
    model = tiny().eval()
    v = torch.randn(128)
    v /= v.norm()
    install_projection(model, "layer2", v, reference=0.25)
    seen = {}
    model.layer2.register_forward_hook(lambda m, i, o: seen.__setitem__("a", o))
    model(torch.randn(5, 1, 32, 32))
    # the shift is along v at every position; the max-pooled projection lands near the reference
    assert (pooled_max(seen["a"]) @ v - 0.25).abs().max() < 0.5


def test_balanced_weights_give_groups_equal_mass():
    groups = np.array([0] * 90 + [1] * 10)
    w = balanced_weights(groups)
    assert w[groups == 0].sum() == pytest.approx(w[groups == 1].sum())
    assert w.mean() == pytest.approx(1.0)


def test_groupdro_moves_weight_to_the_worst_group():
    bal = GroupBalance("groupdro", eta=1.0).fit(np.array([0, 0, 1, 1]), np.arange(4))
    for _ in range(5):
        bal.loss(torch.tensor([0.1, 0.1, 2.0, 2.0]), torch.arange(4))
    assert bal.q_[1] > 0.9


def test_freeze_up_to_layer_freezes_exactly_the_prefix():
    model = tiny()
    freeze_up_to(model, "layer3")
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"layer4", "fc"}
    with pytest.raises(UsageError):
        freeze_up_to(tiny(), "layer9")


def test_sharded_batches_partition_the_global_batches():
    one = list(ShardedBatchSampler(10, 4, seed=3))
    r0 = list(ShardedBatchSampler(10, 4, seed=3, rank=0, world_size=2))
    r1 = list(ShardedBatchSampler(10, 4, seed=3, rank=1, world_size=2))
    assert [a + b for a, b in zip(r0, r1)] == one
    assert len(ShardedBatchSampler(10, 4, seed=3, rank=0, world_size=2)) == len(r0)


@pytest.mark.parametrize("method", ["rrr", "isnet"])
def test_double_backprop_penalties_train_a_vit(method):
    """Penalties on a gradient need the attention's second derivative: the fused CPU/flash
    attention kernels have none, so the engine switches to the math kernel for these methods."""
    from cxr_audit.training.engine import _attention_kernel

    torch.manual_seed(0)
    model = build_model("vit_tiny", 2, 1, 32).train()
    mitigation = get_mitigation(method)
    assert mitigation.double_backward
    fg = torch.zeros(4, 1, 32, 32)
    fg[:, :, 8:24, 8:24] = 1
    b = batch(fg=fg)
    if method == "isnet":
        mitigation.prepare(model, Context(num_classes=2), [b])
    with _attention_kernel(mitigation):
        _, penalty = mitigation.forward(model, b, b["image"])
    assert penalty is not None and torch.isfinite(penalty) and grads_reach(model, penalty)
