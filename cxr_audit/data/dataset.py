"""A torch ``Dataset`` over a manifest: read, resize, set channels, normalise; masks alongside."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cxr_audit.data.io import read_image, read_mask
from cxr_audit.data.manifest import Manifest, Sample
from cxr_audit.errors import BadInputError, UsageError

#: named normalisations: ImageNet (torchvision models), torchxrayvision ([0, 1] -> [-1024, 1024])
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "xrv": ((0.5,), (1.0 / 2048.0,)),
    "none": ((0.0,), (1.0,)),
}


@dataclass(frozen=True)
class Preprocessing:
    """How images become model inputs; stored in every checkpoint so scans match training.

    ``mean``/``std`` are one value or one per channel (ImageNet's three), applied to intensities in
    [0, 1] after the gray image is repeated to ``channels``. ``resize="squash"`` resizes the whole
    image to ``size x size`` (keeps corner stamps and borders, which are exactly the shortcuts we
    look for); ``"pad"`` letterboxes instead.
    """

    size: int = 128
    channels: int = 1
    mean: float | tuple[float, ...] = 0.5
    std: float | tuple[float, ...] = 0.25
    resize: str = "squash"

    def __post_init__(self):
        for name in ("mean", "std"):  # lists from JSON/checkpoints become tuples (hashable, frozen)
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                value = tuple(float(v) for v in value)
                object.__setattr__(self, name, value[0] if len(value) == 1 else value)
        if not isinstance(self.size, int) or self.size < 8:
            raise UsageError(f"image size must be an integer of at least 8 pixels, got {self.size}")
        if self.channels not in (1, 3):
            raise UsageError(f"channels must be 1 or 3, got {self.channels}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != self.channels:
                raise UsageError(f"{name} has {len(value)} values for {self.channels} channel(s)")
        if any(s <= 0 for s in self._per_channel(self.std)):
            raise UsageError(f"std must be positive, got {self.std}")
        if self.resize not in ("squash", "pad"):
            raise UsageError(f"resize must be 'squash' or 'pad', got {self.resize!r}")

    def _per_channel(self, value) -> tuple[float, ...]:
        return value if isinstance(value, tuple) else (float(value),) * self.channels

    def to_dict(self) -> dict:
        plain = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
        return {"size": self.size, "channels": self.channels, "mean": plain(self.mean), "std": plain(self.std),
                "resize": self.resize}

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(C,)`` normalised values of intensity 0 and 1 per channel (the input's box)."""
        mean = torch.tensor(self._per_channel(self.mean))
        std = torch.tensor(self._per_channel(self.std))
        return (0.0 - mean) / std, (1.0 - mean) / std

    def normalise(self, t: torch.Tensor) -> torch.Tensor:
        """``(..., C, H, W)`` intensities in [0, 1] -> model input."""
        mean = torch.tensor(self._per_channel(self.mean), dtype=t.dtype).reshape(-1, 1, 1)
        std = torch.tensor(self._per_channel(self.std), dtype=t.dtype).reshape(-1, 1, 1)
        return (t - mean) / std

    def image_to_tensor(self, gray: np.ndarray) -> torch.Tensor:
        """``(H, W)`` float in [0, 1] -> ``(channels, size, size)`` normalised tensor."""
        t = self._resize(torch.from_numpy(np.ascontiguousarray(gray, dtype=np.float32))[None, None], "bilinear")
        return self.normalise(t[0].expand(self.channels, -1, -1)).contiguous()

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
