"""Group balancing: equal weight for every (source, label) group (Gautam et al., 2022, "Demonstrating
the risk of imbalanced datasets in chest X-ray image-based diagnostics by prototypical relevance
propagation", ISBI), or GroupDRO (Sagawa, Koh, Hashimoto & Liang, 2020, ICLR, arXiv:1911.08731).

Groups are (source, label) when the data has two or more sources, otherwise (artifact, label).
"""

from __future__ import annotations

import numpy as np
import torch

from cxr_audit.data.manifest import Manifest
from cxr_audit.errors import UsageError
from cxr_audit.options import choice

BALANCE_MODES = ("none", "reweight", "resample", "groupdro")


def group_ids(manifest: Manifest, artifact: dict[int, int]) -> tuple[np.ndarray, list[str]]:
    """``(group id per sample (N,), group names)``."""
    by_source = len(manifest.sources) >= 2
    keys = []
    for s in manifest.samples:
        first = s.source if by_source else f"artifact={artifact.get(s.index, s.artifact or 0)}"
        keys.append(f"{first}|{manifest.class_names[s.label]}")
    names = sorted(set(keys))
    lookup = {k: i for i, k in enumerate(names)}
    return np.array([lookup[k] for k in keys]), names


def balanced_weights(groups: np.ndarray) -> np.ndarray:
    """Per-sample weights ``(N,)`` that give every group the same total weight; mean 1."""
    counts = np.bincount(groups)
    w = 1.0 / counts[groups]
    return w * len(groups) / w.sum()


class GroupBalance:
    """``reweight``: weighted cross-entropy; ``resample``: a weighted sampler (the engine asks
    :meth:`sample_weights`); ``groupdro``: exponentiated-gradient weights over group losses
    (step ``eta``), the loss is ``Σ_g q_g L_g``."""

    def __init__(self, mode: str = "none", eta: float = 0.01):
        self.mode = choice("--balance", mode, BALANCE_MODES)
        self.eta = eta

    def fit(self, groups: np.ndarray, index: np.ndarray, weights: np.ndarray | None = None) -> "GroupBalance":
        """``groups (N,)`` and the manifest row index of each sample ``(N,)``; ``weights (N,)``
        replace the equal-group-mass weights (JTT's upweighting factor)."""
        self.group_of_ = dict(zip(index.tolist(), groups.tolist()))
        self.n_groups_ = int(groups.max()) + 1 if len(groups) else 0
        if weights is None and len(groups):
            weights = balanced_weights(groups)
        self.weight_of_ = dict(zip(index.tolist(), np.asarray(weights, float).tolist())) if len(groups) else {}
        self.q_ = torch.full((self.n_groups_,), 1.0 / max(self.n_groups_, 1))
        if self.mode != "none" and self.n_groups_ < 2:
            raise UsageError("--balance needs two or more groups (sources or artifact labels) in the training data")
        return self

    def sample_weights(self, index: np.ndarray) -> np.ndarray | None:
        return np.array([self.weight_of_[int(i)] for i in index]) if self.mode == "resample" else None

    def loss(self, per_sample: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Reduce per-sample losses ``(N,)`` to the balanced scalar."""
        if self.mode in ("none", "resample"):
            return per_sample.mean()
        if self.mode == "reweight":
            w = torch.tensor([self.weight_of_[int(i)] for i in index], device=per_sample.device)
            return (w * per_sample).sum() / len(per_sample)
        g = torch.tensor([self.group_of_[int(i)] for i in index], device=per_sample.device)
        sums = torch.zeros(self.n_groups_, device=per_sample.device).index_add(0, g, per_sample)
        counts = torch.zeros(self.n_groups_, device=per_sample.device).index_add(0, g, torch.ones_like(per_sample))
        group_loss = sums / counts.clamp_min(1)
        present = counts > 0
        q = self.q_.to(per_sample.device) * torch.exp(self.eta * group_loss.detach() * present)
        self.q_ = (q / q.sum()).cpu()
        return (self.q_.to(per_sample.device) * group_loss).sum()
