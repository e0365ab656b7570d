"""The training loop every training command shares (``train``, ``unlearn``, the λ sweep, ``stress``).

AdamW + cosine schedule, cross-entropy (group-balanced on request) plus ``λ · penalty`` from a
:class:`~cxr_audit.training.objective.LossTerm` (a mitigation, ProtoPNet's costs), early stopping
on a validation score, bf16 autocast and channels_last on CUDA, and DDP when launched under ``torchrun`` (NCCL on CUDA, gloo on CPU).

Batches come from :class:`ShardedBatchSampler`: one seeded permutation per epoch cut into global
batches, each rank taking a contiguous slice — so a 2-process run sees exactly the batches of a
1-process run and (for models without batch statistics) computes the same updates.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, Sampler

from cxr_audit.data.dataset import CxrDataset, Preprocessing, collate
from cxr_audit.data.manifest import Manifest
from cxr_audit.errors import BadInputError, UsageError
from cxr_audit.runtime import autocast, rank_and_world
from cxr_audit.training.balance import GroupBalance
from cxr_audit.training.objective import LossTerm


class DivergedError(BadInputError):
    """The training loss became non-finite (a penalty too strong, a learning rate too high)."""


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0
    steps: int = 0
    record: dict = field(default_factory=dict)  # what the checkpoint should add (ProtoPNet's projection)

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(self.steps, 1)


class ShardedBatchSampler(Sampler):
    """Yields this rank's slice of each global batch; optional sampling weights (with replacement).
    Global batches smaller than the world size are dropped so no rank ever gets an empty batch."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 weights: np.ndarray | None = None):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.epoch = 0

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = (torch.multinomial(self.weights, self.n, replacement=True, generator=g) if self.weights is not None
                 else torch.randperm(self.n, generator=g)).tolist()
        for start in range(0, self.n, self.batch_size):
            batch = order[start:start + self.batch_size]
            if len(batch) < self.world_size:
                continue
            per = math.ceil(len(batch) / self.world_size)
            yield batch[self.rank * per:(self.rank + 1) * per]

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (rest >= self.world_size)


def freeze_up_to(model: nn.Module, layer: str) -> list[nn.Module]:
    """Freeze every parameter of ``layer`` and of the modules registered before it (forward order
    for torchvision models); returns the frozen modules, which the engine keeps in eval mode."""
    names = [n for n, _ in model.named_modules()]
    if layer not in names:
        raise UsageError(f"cannot freeze up to '{layer}': the model has no such layer")
    stop = names.index(layer)
    frozen = []
    for i, (name, module) in enumerate(model.named_modules()):
        is_ancestor = name == "" or layer.startswith(name + ".")
        inside = name == layer or name.startswith(layer + ".")
        if (i <= stop and not is_ancestor) or inside:
            for p in module.parameters(recurse=False):
                p.requires_grad_(False)
            frozen.append(module)
    return frozen


def _attention_kernel(mitigation: LossTerm):
    """Plain-math scaled-dot-product attention when the penalty needs a second derivative."""
    return sdpa_kernel(SDPBackend.MATH) if mitigation.double_backward else nullcontext()


def fit(model: nn.Module, train_set: Manifest, prep: Preprocessing, device: torch.device, *,
        mitigation: LossTerm | None = None, context=None, lambda_: float = 0.0,
        balance: GroupBalance | None = None, epochs: int = 5, batch_size: int = 32, lr: float = 1e-3,
        weight_decay: float = 1e-4, seed: int = 0, amp: bool = True, freeze: str | None = None,
        val_score: Callable[[nn.Module], float] | None = None, patience: int | None = None,
        num_workers: int = 0, on_progress: Callable[..., None] | None = None) -> FitResult:
    """Train ``model`` in place; with ``val_score`` (higher is better) the best epoch's weights
    are kept and training stops after ``patience`` epochs without improvement."""
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise UsageError("epochs and batch size must be >= 1 and the learning rate > 0")
    mitigation = mitigation or LossTerm()
    run = _Run.create(model, train_set, prep, device, mitigation, context, balance, batch_size, lr, weight_decay,
                      seed, freeze, num_workers, epochs)
    result = FitResult()
    best_score, best_state, stale = -math.inf, None, 0
    start = time.perf_counter()
    for epoch in range(epochs):
        loss_of = functools.partial(_loss, run.net, mitigation, balance, device=device, amp=amp, lambda_=lambda_,
                                    multilabel=train_set.multilabel, epoch=epoch)
        seen = f" val objective {best_score:.3f}" if best_score > -math.inf else ""
        record = run.epoch(epoch, loss_of, result, on_progress, f"epoch {epoch + 1}/{epochs}", seen)
        if val_score is not None:
            record["val_score"] = score = float(val_score(model))
            if score > best_score:
                best_score, best_state, stale, result.best_epoch = score, copy.deepcopy(model.state_dict()), 0, epoch + 1
            else:
                stale += 1
        result.history.append(record)
        if patience is not None and stale > patience:
            break
    result.seconds = time.perf_counter() - start
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        result.best_epoch = len(result.history)
    for p in model.parameters():
        p.requires_grad_(True)
    return result


@dataclass
class _Run:
    """What one :func:`fit` trains with: the (DDP-wrapped) network, the sharded loader, the
    optimiser and its cosine schedule over ``total`` steps, the frozen modules kept in eval mode."""

    net: nn.Module
    loader: DataLoader
    sampler: "ShardedBatchSampler"
    optimiser: torch.optim.Optimizer
    schedule: object
    frozen: list
    total: int

    @classmethod
    def create(cls, model, train_set, prep, device, mitigation, context, balance, batch_size, lr, weight_decay,
               seed, freeze, num_workers, epochs) -> "_Run":
        rank, world_size = rank_and_world()
        frozen = freeze_up_to(model, freeze) if freeze else []
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise UsageError(f"nothing left to train after freezing up to '{freeze}'")
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        dataset = CxrDataset(train_set, prep, with_masks=mitigation.loads_masks)
        weights = balance.sample_weights(np.array([s.index for s in train_set.samples])) if balance else None
        sampler = ShardedBatchSampler(len(dataset), batch_size, seed, rank, world_size, weights)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate)
        mitigation.prepare(model, context, loader)
        net = model
        if world_size > 1:
            net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        optimiser = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
        total = epochs * len(sampler)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(total, 1))
        return cls(net, loader, sampler, optimiser, schedule, frozen, total)

    def epoch(self, epoch: int, loss_of: Callable, result: FitResult, on_progress: Callable[..., None] | None,
              label: str, suffix: str) -> dict:
        """One pass over the loader; ``loss_of(batch) -> (loss, per-sample CE, penalty or None, n)``;
        progress as ``"{label} loss L{suffix}"``."""
        self.sampler.epoch = epoch
        self.net.train()
        for m in self.frozen:
            m.eval()
        sums = {"loss": 0.0, "penalty": 0.0, "n": 0}
        for batch in self.loader:
            loss, ce, penalty, n = loss_of(batch)
            self.optimiser.zero_grad(set_to_none=True)
            loss.backward()
            self.optimiser.step()
            self.schedule.step()
            result.steps += 1
            sums["loss"] += float(ce.detach().mean()) * n
            sums["penalty"] += float(penalty.detach()) * n if penalty is not None else 0.0
            sums["n"] += n
            if on_progress:
                on_progress(result.steps, self.total, f"{label} loss {sums['loss'] / sums['n']:.3f}{suffix}")
        return {"epoch": epoch + 1, "train_loss": sums["loss"] / max(sums["n"], 1),
                "penalty": sums["penalty"] / max(sums["n"], 1)}


def _loss(net, mitigation: LossTerm, balance: GroupBalance | None, batch: dict, *, device, amp: bool,
          lambda_: float, multilabel: bool, epoch: int):
    """``(loss, per-sample CE, penalty or None, batch size)`` of one batch; a non-finite loss is
    :class:`DivergedError`."""
    if batch["errors"]:
        raise BadInputError(batch["errors"][0][1])
    x, y = batch["image"].to(device), batch["label"].to(device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, amp), _attention_kernel(mitigation):
        logits, penalty = mitigation.forward(net, batch, x)
    ce = _per_sample_loss(logits.float(), y, multilabel)
    loss = balance.loss(ce, batch["index"]) if balance else ce.mean()
    if penalty is not None and lambda_:
        loss = loss + lambda_ * penalty.float()
    if not torch.isfinite(loss):
        raise DivergedError(f"the training loss became {loss.item()} at epoch {epoch + 1} "
                            f"(λ={lambda_:g} too large, or the learning rate too high)")
    return loss, ce, penalty, len(x)


def _per_sample_loss(logits: torch.Tensor, y: torch.Tensor, multilabel: bool) -> torch.Tensor:
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, y.float(), reduction="none").mean(1)
    return F.cross_entropy(logits, y, reduction="none")
