"""``train``: a plain supervised classifier (AdamW, cosine schedule, CPU or CUDA with bf16 AMP).

Enough for a user or the demo to get a model to audit; checkpoints are weights-only dicts
(:func:`cxr_audit.models.registry.save_checkpoint`) that record the options that made them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from cxr_audit.data.dataset import CxrDataset, Preprocessing, collate
from cxr_audit.data.manifest import Manifest, load_manifest
from cxr_audit.errors import UsageError
from cxr_audit.models.architectures import build_model, spec_of, trust_factory
from cxr_audit.models.registry import save_checkpoint
from cxr_audit.runtime import init_distributed, is_main_process, now, resolve_device, seed_everything, versions
from cxr_audit.training.engine import fit
from cxr_audit.training.protopnet import fit_protopnet


@dataclass
class TrainSummary:
    checkpoint: Path
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


def train(data: str | Path, out: str | Path, arch: str = "resnet18", *, size: int = 128, channels: int = 1,
          epochs: int = 5, batch_size: int = 32, lr: float | None = None, weight_decay: float = 1e-4, seed: int = 0,
          train_split: str = "train", val_split: str = "val", device: str = "auto", amp: bool = True,
          num_workers: int = 0, balance: str = "none", on_progress: Callable[..., None] | None = None) -> TrainSummary:
    """Train ``arch`` from scratch on ``data`` and save the checkpoint to ``out``; ``lr`` defaults
    to the architecture's recommended rate (:class:`~cxr_audit.models.architectures.ArchSpec`).

    ``balance`` (``reweight``, ``resample``, ``groupdro``) gives every (source, label) group —
    (artifact, label) with one source, from the ``artifact`` column — the same weight: what to
    do when a model learned nothing but a source's or an artifact's cue.

    When the manifest has a ``split`` column, ``train_split`` rows train and ``val_split`` rows
    are evaluated after every epoch (the best epoch's weights are kept); otherwise all rows
    train. Reproducible from ``seed`` on CPU.
    """
    if epochs < 1 or batch_size < 1 or (lr is not None and lr <= 0):
        raise UsageError("epochs and batch size must be >= 1 and the learning rate > 0")
    if num_workers < 0:
        raise UsageError(f"--workers must be >= 0, got {num_workers}")
    seed_everything(seed)
    manifest = load_manifest(data)
    if manifest.num_classes < 2:
        raise UsageError(f"{data} has a single class ({manifest.class_names}); a classifier needs two or more")
    unlabelled = [s.index for s in manifest.samples if not s.labels]
    if unlabelled and not manifest.multilabel:
        raise UsageError(f"{data}: row {unlabelled[0] + 2} (and {len(unlabelled) - 1} more) has no label; "
                         "every training image needs one")
    label_warnings = manifest_warnings(manifest)
    train_set, val_set = _splits(manifest, train_split, val_split)
    prep = Preprocessing(size=size, channels=channels)
    dev = init_distributed(resolve_device(device))
    arch = trust_factory(arch).name  # given on the user's command line: may be their module:factory
    lr = lr if lr is not None else spec_of(arch).recommended_lr  # VGG (no BatchNorm) diverges at 1e-3
    model = build_model(arch, manifest.num_classes, channels, size).to(dev)
    val_score = (lambda m: accuracy(m, val_set, prep, dev, batch_size)) if val_set is not None else None
    procedure = fit_protopnet if spec_of(arch).prototype_layer else fit  # prototype models: three steps
    result = procedure(model, train_set, prep, dev, epochs=epochs, batch_size=batch_size, lr=lr,
                       weight_decay=weight_decay, seed=seed, amp=amp, val_score=val_score, num_workers=num_workers,
                       balance=_group_balance(balance, train_set), on_progress=on_progress)
    history = [{"epoch": r["epoch"], "train_loss": r["train_loss"],
                **({"val_accuracy": r["val_score"]} if "val_score" in r else {}),
                **{k: r[k] for k in ("stage", "round") if k in r}} for r in result.history]
    options = {"arch": arch, "size": size, "channels": channels, "epochs": epochs, "batch_size": batch_size,
               "lr": lr, "weight_decay": weight_decay, "seed": seed, "data": str(Path(data).resolve()),
               "train_split": train_split, "val_split": val_split, "amp": amp, "balance": balance}
    collapsed = single_class_warning(*predict(model, val_set or train_set, prep, dev, batch_size),
                                     manifest.class_names)
    path = Path(out)
    if is_main_process():  # under torchrun every rank holds the same weights; one writes them
        save_checkpoint(out, model, arch, manifest.class_names, prep, multilabel=manifest.multilabel,
                        extra={"options": options, "history": history, "created": now(), "versions": versions(),
                               **result.record})
    return TrainSummary(path, history, result.seconds, label_warnings + ([collapsed] if collapsed else []))


def _group_balance(mode: str, train_set: Manifest):
    from cxr_audit.training.balance import GroupBalance, group_ids

    balance = GroupBalance(mode)  # checks the mode's name
    if mode == "none":
        return None
    groups, _ = group_ids(train_set, {})
    return balance.fit(groups, np.array([s.index for s in train_set.samples]))


def manifest_warnings(manifest: Manifest, min_count: int = 5) -> list[str]:
    """Warnings for images listed in more than one row, and for classes with fewer than
    ``min_count`` images or present in only one of several splits (usually a typo in the label
    column, "covdi", or a NaN that became a class of its own)."""
    repeated = [p for p, n in Counter(str(s.path) for s in manifest.samples).items() if n > 1]
    counts = Counter(label for s in manifest.samples for label in s.labels)
    splits: dict[int, set[str]] = {}
    for s in manifest.samples:
        for label in s.labels:
            splits.setdefault(label, set()).add(s.split)
    out = [f"{len(repeated)} image(s) appear in more than one manifest row (first: {repeated[0]}): they weigh "
           f"double in training and may leak across splits"] if repeated else []
    out += [f"class '{n}' has only {counts[k]} image(s): a typo or a missing value in the label column?"
            for k, n in enumerate(manifest.class_names) if counts[k] < min_count]
    if len({s.split for s in manifest.samples}) > 1:
        out += [f"class '{n}' appears only in split '{next(iter(splits[k]))}'" for k, n in enumerate(manifest.class_names)
                if len(splits.get(k, ())) == 1 and counts[k] >= min_count]
    return out


def single_class_warning(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> str | None:
    """A warning when a single-label model predicts one class for every sample of ``logits (N, K)``.

    Such a model has learned nothing to audit: its explanations reflect the initial weights, and a
    shortcut found in them is not one the model uses. Plain VGGs from scratch on a few hundred
    small images end here (vgg11, 240 phantoms at 64 px, 8 epochs, lr 1e-4 to 1e-3; 20 epochs at
    1e-4 learn).
    """
    if logits.ndim != 2 or labels.ndim != 1 or len(logits) < 2:
        return None  # multi-label, or too few samples to judge
    predicted = logits.argmax(1).unique()
    if len(predicted) > 1:
        return None
    return (f"the model predicts '{class_names[int(predicted[0])]}' for every one of {len(logits)} "
            f"evaluation images: it has not learned the task. Train longer (--epochs), with another "
            f"--lr, more data or another --arch before auditing it")


def _splits(manifest: Manifest, train_split: str, val_split: str) -> tuple[Manifest, Manifest | None]:
    splits = {s.split for s in manifest.samples}
    if splits == {""}:
        return manifest, None
    train_set = manifest.subset(train_split)
    return train_set, (manifest.subset(val_split) if val_split in splits else None)


@torch.no_grad()
def predict(model: nn.Module, manifest: Manifest, prep: Preprocessing, device: torch.device,
            batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(N, K)`` and labels for every sample of ``manifest``, in order."""
    model.eval()
    loader = DataLoader(CxrDataset(manifest, prep, with_masks=False), batch_size=batch_size, collate_fn=collate)
    logits, labels = [], []
    for batch in loader:
        logits.append(model(batch["image"].to(device)).float().cpu())
        labels.append(batch["label"])
    return torch.cat(logits), torch.cat(labels)


def accuracy(model: nn.Module, manifest: Manifest, prep: Preprocessing, device: torch.device,
             batch_size: int = 64) -> float:
    logits, labels = predict(model, manifest, prep, device, batch_size)
    if manifest.multilabel:
        return float(((logits > 0).float() == labels).float().mean())
    return float((logits.argmax(1) == labels).float().mean())


@torch.no_grad()
def batched_logits(model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 64) -> torch.Tensor:
    """Logits ``(N, K)`` on CPU for in-memory images ``(N, C, H, W)``, in eval mode."""
    model.eval()
    return torch.cat([model(images[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)])
