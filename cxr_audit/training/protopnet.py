"""ProtoPNet's three training steps (Chen et al., 2019, arXiv:1806.10574, Sec. 2.2), on the shared
training loop (:func:`cxr_audit.training.engine.fit`) with the prototype costs as its penalty:

1. **joint**: every layer but the last, on cross-entropy + ``0.8 * cluster - 0.08 * separation``
   (cluster: each image's smallest distance to a prototype of its class; separation: to one of
   another class);
2. **projection** ("push"): each prototype is replaced by the nearest add-on feature of a training
   image of its class (distance 0 to that patch afterwards), the prototypes of a class onto
   different images (a departure, :func:`project_prototypes` says why), recorded with the image,
   its source and label and the patch's box in input pixels;
3. **last layer**: only the last layer, on cross-entropy + ``1e-4 * |W ⊙ (1 - class identity)|_1``
   (the wrong-class connections go towards 0), solved on the training images' fixed similarity
   scores (:func:`fit_last_layer`).

The three steps repeat every ``push_every`` joint epochs (default: once, after all of them), as
the paper pushes every 10 epochs. Departure: the paper's warm-up (trunk frozen at ImageNet weights)
is skipped: cxr-audit trains from scratch, where a frozen random trunk teaches nothing.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from cxr_audit.data.dataset import CxrDataset, Preprocessing, collate
from cxr_audit.data.manifest import Manifest
from cxr_audit.errors import UsageError
from cxr_audit.models.protopnet import cell_box
from cxr_audit.runtime import prefixed
from cxr_audit.training.engine import FitResult, fit
from cxr_audit.training.objective import LossTerm

CLUSTER_COST, SEPARATION_COST, L1_COST = 0.8, 0.08, 1e-4  # the paper's coefficients
LAST_LAYER_EPOCHS = 5
#: full-batch Adam steps per last-layer round, and their learning rate (a convex problem on fixed scores)
LAST_LAYER_STEPS, LAST_LAYER_LR = 100, 0.01


class PrototypeCosts(LossTerm):
    """Step 1's penalty: ``0.8 * cluster - 0.08 * separation`` from each image's minimum distance to
    every prototype ``(N, P)``, read by a forward hook on the prototype layer during the pass."""

    name = "protopnet-joint"

    def prepare(self, model, context, loader):
        super().prepare(model, context, loader)
        self._seen: dict = {}
        net = getattr(model, "module", model)
        self._handle = net.prototypes.register_forward_hook(lambda _m, _i, out: self._seen.__setitem__("d", out))

    def forward(self, model, batch, x):
        logits = model(x)
        net = getattr(model, "module", model)
        distances = self._seen.pop("d").flatten(2).amin(2)  # (N, P)
        own = net.class_identity()[batch["label"].to(x.device)]  # (N, P)
        far = distances.detach().max() + 1  # masks the other group out of a min
        cluster = (distances + far * (1 - own)).amin(1).mean()
        separation = (distances + far * own).amin(1).mean()
        return logits, CLUSTER_COST * cluster - SEPARATION_COST * separation

    def finish(self, model):
        self._handle.remove()
        return {}


def wrong_class_l1(net) -> torch.Tensor:
    """Step 3's penalty: the L1 norm of the last layer's wrong-class connections."""
    return (net.last_layer.weight * (1 - net.class_identity())).abs().sum()


def fit_last_layer(model, train_set: Manifest, prep: Preprocessing, device: torch.device, *,
                   epochs: int = LAST_LAYER_EPOCHS, batch_size: int = 32,
                   val_score: Callable[[torch.nn.Module], float] | None = None,
                   on_progress: Callable[..., None] | None = None) -> FitResult:
    """Step 3 as the convex problem it is: the prototypes' similarity scores ``(N, P)`` of every
    training image are computed once, then the last layer alone minimises cross-entropy +
    ``1e-4 * wrong-class L1`` on them, full batch, ``epochs`` rounds of :data:`LAST_LAYER_STEPS`
    Adam steps; with ``val_score`` the best round's weights are kept.

    Why not mini-batch epochs on the images: after the projection the class-wise offsets of the
    scores are large, and a few hundred small steps at the trunk's learning rate barely move the
    weights (phantoms: the +1/-0.5 start moved by 0.01 and validation stayed at one class)."""
    net = getattr(model, "module", model)
    scores, labels = _training_scores(net, train_set, prep, device, batch_size)
    weight = net.last_layer.weight
    optimiser = torch.optim.Adam([weight], lr=LAST_LAYER_LR)
    result, best, start = FitResult(), (-math.inf, None), time.perf_counter()
    for epoch in range(epochs):
        for _ in range(LAST_LAYER_STEPS):
            optimiser.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net.last_layer(scores), labels) + L1_COST * wrong_class_l1(net)
            loss.backward()
            optimiser.step()
        record = {"epoch": epoch + 1, "train_loss": loss.item()}
        if val_score is not None:
            record["val_score"] = float(val_score(model))
            if record["val_score"] > best[0]:
                best, result.best_epoch = (record["val_score"], weight.detach().clone()), epoch + 1
        result.history.append(record)
        result.steps += LAST_LAYER_STEPS
        if on_progress:
            on_progress(epoch + 1, epochs, f"round {epoch + 1}/{epochs} loss {record['train_loss']:.3f}")
    if best[1] is not None:
        with torch.no_grad():
            weight.copy_(best[1])
    result.seconds = time.perf_counter() - start
    return result


def _training_scores(net, train_set: Manifest, prep: Preprocessing, device, batch_size: int):
    """``(scores (N, P), labels (N,))`` of the training images in eval mode, without gradients."""
    loader = DataLoader(CxrDataset(train_set, prep, with_masks=False), batch_size=batch_size, collate_fn=collate)
    was_training = net.training
    net.eval()
    scores, labels = [], []
    with torch.no_grad():
        for batch in loader:
            d = net.min_distances(batch["image"].to(device))
            scores.append(net.similarity(d))
            labels.append(batch["label"].to(device))
    net.train(was_training)
    return torch.cat(scores).float(), torch.cat(labels)


def fit_protopnet(model, train_set: Manifest, prep: Preprocessing, device: torch.device, *, epochs: int,
                  push_every: int | None = None, last_layer_epochs: int = LAST_LAYER_EPOCHS, **options) -> FitResult:
    """Train ``model`` (a :class:`~cxr_audit.models.protopnet.ProtoPNet`) in place in the three steps
    of the module docstring; ``options`` are :func:`~cxr_audit.training.engine.fit`'s. The result's
    ``record["prototypes"]`` is the last projection (:func:`project_prototypes`)."""
    if train_set.multilabel:
        raise UsageError("a ProtoPNet is a single-label classifier (its prototypes belong to one class each)")
    push_every = push_every or epochs
    result = FitResult()
    on_progress = options.pop("on_progress", None)
    for round_ in range(math.ceil(epochs / push_every)):
        joint_epochs = min(push_every, epochs - round_ * push_every)
        costs = PrototypeCosts()
        joint = fit(model, train_set, prep, device, epochs=joint_epochs, mitigation=costs, lambda_=1.0,
                    on_progress=prefixed(on_progress, f"prototypes round {round_ + 1}: joint"), **options)
        costs.finish(model)
        projection = project_prototypes(model, train_set, prep, device, options.get("batch_size", 32))
        last = fit_last_layer(model, train_set, prep, device, epochs=last_layer_epochs,
                              batch_size=options.get("batch_size", 32), val_score=options.get("val_score"),
                              on_progress=prefixed(on_progress, f"prototypes round {round_ + 1}: last layer"))
        for stage, part in (("joint", joint), ("last layer", last)):
            result.history += [{**row, "stage": stage, "round": round_ + 1} for row in part.history]
            result.seconds += part.seconds
            result.steps += part.steps
    result.best_epoch = len(result.history)
    result.record = {"prototypes": projection}
    return result


def project_prototypes(model, train_set: Manifest, prep: Preprocessing, device: torch.device,
                       batch_size: int = 32) -> list[dict]:
    """Step 2: move every prototype onto a training patch of its class, in place; one record per
    prototype (image, source, label, patch).

    Departure from Chen et al. (2019), who push each prototype onto its nearest patch whatever the
    others do: here the prototypes of a class go to **different images** (:func:`distinct_images`;
    the closest pairs first, a prototype whose nearest image is taken gets its nearest free one).
    Why: on our phantoms 7 of a class's 10 prototypes were pushed onto one patch of one image (one
    prototype in seven copies, ProtoPNet's known duplicates that ProtoPShare, Rymarczyk et al. 2021,
    merges after training), so the audit had four prototypes to read; and a 1x1 prototype on a
    ResNet trunk sees the whole image from every cell, so two patches of one image are nearly one
    prototype too."""
    net = getattr(model, "module", model)
    was_training = net.training
    net.eval()
    candidates = _nearest_images(net, train_set, prep, device, batch_size)
    best = distinct_images(candidates, net.prototype_class.cpu())
    with torch.no_grad():
        for j, found in enumerate(best):
            if found is not None:
                net.prototypes.vectors[j] = found.pop("vector").to(net.prototypes.vectors)[:, None, None]
    net.train(was_training)
    class_names = train_set.class_names
    return [{"prototype": j, "class": class_names[int(net.prototype_class[j])], **(found or {"sample": None})}
            for j, found in enumerate(best)]


def distinct_images(candidates: list[list[dict]], prototype_class: torch.Tensor) -> list[dict | None]:
    """One candidate per prototype, no image twice within a class where the candidates allow it.

    ``candidates[j]``: prototype ``j``'s nearest images of its class, each ``{"sample", "distance_before",
    ...}``. Greedy over all (prototype, image) pairs of a class by distance, closest first; a
    prototype whose every candidate image is taken (fewer images than prototypes) gets its nearest."""
    chosen: list[dict | None] = [None] * len(candidates)
    for cls in prototype_class.unique().tolist():
        members = [j for j in range(len(candidates)) if int(prototype_class[j]) == cls]
        pairs = sorted(((c["distance_before"], j, k) for j in members for k, c in enumerate(candidates[j])))
        taken: set = set()
        for _, j, k in pairs:
            sample = candidates[j][k]["sample"]
            if chosen[j] is None and sample not in taken:
                chosen[j] = candidates[j][k]
                taken.add(sample)
        for j in members:
            if chosen[j] is None and candidates[j]:
                chosen[j] = candidates[j][0]
    return chosen


def _nearest_images(net, train_set: Manifest, prep: Preprocessing, device, batch_size: int) -> list[list[dict]]:
    """Per prototype, its ``per_class`` nearest training images of its class, nearest first: each
    with the closest patch there (``vector (D,)``, sample, patch, box, ``distance_before``)."""
    samples = {s.index: s for s in train_set.samples}
    loader = DataLoader(CxrDataset(train_set, prep, with_masks=False), batch_size=batch_size, collate_fn=collate)
    num = len(net.prototype_class)
    keep = int(torch.bincount(net.prototype_class).max())
    dist = torch.full((num, 0), math.inf)
    vectors, where = torch.zeros(num, 0, net.prototypes.vectors.shape[1]), torch.zeros(num, 0, 2, dtype=torch.long)
    grid = None
    with torch.no_grad():
        for batch in loader:
            z = net.latent(batch["image"].to(device))  # (N, D, h, w)
            grid = z.shape[2:]
            d = net.prototypes(z).flatten(2)  # (N, P, hw)
            own = net.prototype_class[None, :] == batch["label"].to(device)[:, None]  # (N, P)
            value, cell = d.masked_fill(~own[..., None], math.inf).min(2)  # (N, P) each image's closest patch
            patch = z.flatten(2).permute(0, 2, 1)[torch.arange(len(z))[:, None], cell]  # (N, P, D)
            ids = batch["index"].to(cell)[:, None].expand_as(cell)
            dist = torch.cat([dist, value.T.cpu()], 1)
            vectors = torch.cat([vectors, patch.permute(1, 0, 2).float().cpu()], 1)
            where = torch.cat([where, torch.stack([ids, cell], -1).permute(1, 0, 2).cpu()], 1)
            dist, order = dist.topk(min(keep, dist.shape[1]), 1, largest=False)  # (P, keep)
            vectors, where = vectors.gather(1, order[..., None].expand(-1, -1, vectors.shape[2])), \
                where.gather(1, order[..., None].expand(-1, -1, 2))
    return [[_patch_record(vectors[j, k], samples[int(where[j, k, 0])], int(where[j, k, 1]), grid, prep.size,
                           float(dist[j, k]), train_set.class_names)
             for k in range(dist.shape[1]) if math.isfinite(dist[j, k])] for j in range(num)]


def _patch_record(vector, sample, cell: int, grid, size: int, distance: float, class_names) -> dict:
    """Where a prototype was projected: the image, its source and label, and the feature cell's box
    ``[y0, x0, y1, x1]`` in input pixels."""
    h, w = int(grid[0]), int(grid[1])
    return {"vector": vector.cpu(), "sample": sample.index, "path": str(sample.path), "source": sample.source,
            "label": class_names[sample.label], "patch": list(divmod(cell, w)), "grid": [h, w],
            "box": cell_box(cell, (h, w), size),
            "distance_before": distance}
