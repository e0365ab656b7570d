"""A torch ``Dataset`` over a manifest: read, resize, set channels, normalise; masks alongside."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cxr_audit.data.io import read_image, read_mask
from cxr_audit.data.manifest import Manifest, Sample
from cxr_audit.errors import BadInputError


@dataclass(frozen=True)
class Preprocessing:
    """How images become model inputs; stored in every checkpoint so scans match training.

    ``resize="squash"`` resizes the whole image to ``size x size`` (keeps corner stamps and
    borders, which are exactly the shortcuts we look for); ``"pad"`` letterboxes instead.
    """

    size: int = 128
    channels: int = 1
    mean: float = 0.5
    std: float = 0.25
    resize: str = "squash"

    def to_dict(self) -> dict:
        return {"size": self.size, "channels": self.channels, "mean": self.mean, "std": self.std,
                "resize": self.resize}

    def image_to_tensor(self, gray: np.ndarray) -> torch.Tensor:
        """``(H, W)`` float in [0, 1] -> ``(channels, size, size)`` normalised tensor."""
        t = self._resize(torch.from_numpy(np.ascontiguousarray(gray, dtype=np.float32))[None, None], "bilinear")
        t = (t[0] - self.mean) / self.std
        return t.expand(self.channels, -1, -1).contiguous()

    def mask_to_tensor(self, mask: np.ndarray) -> torch.Tensor:
        """``(H, W)`` bool -> ``(1, size, size)`` float {0, 1} (nearest neighbour)."""
        t = torch.from_numpy(mask.astype(np.float32))[None, None]
        return (self._resize(t, "nearest")[0] > 0.5).float()

    def _resize(self, t: torch.Tensor, mode: str) -> torch.Tensor:
        h, w = t.shape[-2:]
        if self.resize == "pad" and h != w:
            side = max(h, w)
            t = F.pad(t, ((side - w) // 2, side - w - (side - w) // 2, (side - h) // 2, side - h - (side - h) // 2))
        if t.shape[-2:] == (self.size, self.size):
            return t
        kwargs = {"align_corners": False, "antialias": True} if mode == "bilinear" else {}
        return F.interpolate(t, size=(self.size, self.size), mode=mode, **kwargs)


class CxrDataset(Dataset):
    """Items are dicts: ``image (C,S,S)``, ``label`` (int or ``(K,)`` multi-hot), ``index``, and,
    when the manifest has them, ``mask (1,S,S)``, ``artifact_mask (1,S,S)``, ``artifact``.

    With ``skip_bad=True`` an unreadable sample yields ``{"index": i, "error": message}``, which
    :func:`collate` moves to ``batch["errors"]`` instead of raising.
    """

    def __init__(self, manifest: Manifest, prep: Preprocessing, skip_bad: bool = False,
                 with_masks: bool = True):
        self.manifest = manifest
        self.prep = prep
        self.skip_bad = skip_bad
        self.with_masks = with_masks

    def __len__(self) -> int:
        return len(self.manifest)

    def __getitem__(self, i: int) -> dict:
        sample = self.manifest[i]
        try:
            return self._load(sample)
        except BadInputError as exc:
            if self.skip_bad:
                return {"index": sample.index, "error": str(exc)}
            raise

    def _load(self, sample: Sample) -> dict:
        gray = read_image(sample.path)
        item = {"image": self.prep.image_to_tensor(gray), "index": sample.index,
                "label": self._label(sample)}
        if sample.artifact is not None:
            item["artifact"] = sample.artifact
        if self.with_masks:
            for key, mask_path in (("mask", sample.mask), ("artifact_mask", sample.artifact_mask)):
                if mask_path is not None:
                    mask = read_mask(mask_path)
                    if mask.shape != gray.shape:
                        raise BadInputError(
                            f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but image "
                            f"{sample.path} is {gray.shape[1]}x{gray.shape[0]}")
                    item[key] = self.prep.mask_to_tensor(mask)
            if "artifact_mask" not in item and sample.artifact == 0:
                item["artifact_mask"] = torch.zeros(1, self.prep.size, self.prep.size)
        return item

    def _label(self, sample: Sample):
        if self.manifest.multilabel:
            hot = torch.zeros(self.manifest.num_classes)
            hot[list(sample.labels)] = 1
            return hot
        return sample.label


def collate(items: list[dict]) -> dict:
    """Stack good items; bad ones (``error`` key) go to ``batch["errors"]`` as (index, message)."""
    good = [it for it in items if "error" not in it]
    batch: dict = {"errors": [(it["index"], it["error"]) for it in items if "error" in it]}
    if not good:
        return batch
    for key in good[0]:
        values = [it.get(key) for it in good]
        if any(v is None for v in values):
            continue
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else torch.tensor(values)
    return batch


def load_batch(manifest: Manifest, prep: Preprocessing, with_masks: bool = True) -> dict:
    """Every sample of ``manifest`` as one in-memory batch (see :func:`collate`): for the small
    evaluation and validation sets that are scored many times."""
    dataset = CxrDataset(manifest, prep, with_masks=with_masks)
    return collate([dataset[i] for i in range(len(dataset))])
