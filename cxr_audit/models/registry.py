"""Checkpoints that load without unpickling objects (architectures: :mod:`.architectures`).

A checkpoint is a plain dict ``{"format", "config", "state_dict", ...}`` of tensors and
primitives, loaded with ``torch.load(weights_only=True)``. ``config`` holds ``arch``,
``num_classes``, ``class_names`` and the :class:`Preprocessing` so every command reproduces the
training input pipeline.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn as nn

from cxr_audit.data.dataset import Preprocessing
from cxr_audit.errors import BadInputError, UsageError
from cxr_audit.models.architectures import build_model, spec_of

CHECKPOINT_FORMAT = "cxr-audit-checkpoint/1"


def save_checkpoint(path: str | Path, model: nn.Module, arch: str, class_names: list[str],
                    prep: Preprocessing, extra: dict | None = None, multilabel: bool = False) -> Path:
    """Save weights + config as a weights-only-loadable dict; written atomically. ``multilabel``:
    the outputs are independent findings (sigmoid per class), not one softmax."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # unwrap DDP
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": {"arch": arch, "num_classes": len(class_names), "class_names": list(class_names),
                   "preprocessing": prep.to_dict(), "multilabel": bool(multilabel)},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra or {},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        torch.save(payload, tmp)
        tmp.replace(path)
    except (OSError, RuntimeError) as exc:  # torch reports a full disk as RuntimeError("... failed writing ...")
        tmp.unlink(missing_ok=True)
        if isinstance(exc, RuntimeError) and "writ" not in str(exc).lower():
            raise
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise BadInputError(f"cannot write checkpoint {path}: {first}") from None
    except BaseException:  # an interrupt: no half-written file is left behind
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, arch: str | None = None,
                    num_classes: int | None = None) -> tuple[nn.Module, dict]:
    """Load a checkpoint -> ``(model in eval mode, config)``.

    ``arch``/``num_classes``, when given, must agree with the checkpoint. Raises
    :class:`BadInputError` for unreadable files and for weights that do not fit the architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign, empty or truncated files
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise BadInputError(f"cannot load checkpoint {path} (weights-only): {first}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise BadInputError(f"{path} is not a cxr-audit checkpoint (train one with `cxr-audit train`)")
    config = payload["config"]
    if arch is not None and arch != config["arch"]:
        raise BadInputError(f"checkpoint {path} is a '{config['arch']}', not a '{arch}'")
    if num_classes is not None and num_classes != config["num_classes"]:
        raise BadInputError(f"checkpoint {path} has {config['num_classes']} classes, data has {num_classes}")
    prep = config["preprocessing"]
    try:  # only registered architectures: a checkpoint never makes us import code
        spec_of(config["arch"])
    except UsageError as exc:
        raise BadInputError(f"checkpoint {path}: {exc}") from None
    model = build_model(config["arch"], config["num_classes"], prep["channels"], prep["size"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise BadInputError(f"weights in {path} do not fit architecture '{config['arch']}': {first}") from None
    projection = payload.get("extra", {}).get("projection")
    if projection:  # a P-ClArC model: the saved projection is part of the model
        from cxr_audit.models.projection import install_projection

        install_projection(model, projection["layer"], torch.tensor(projection["direction"]), projection["reference"],
                           projection.get("threshold"))
        config = {**config, "projection": projection}
    return model.eval(), config


def load_frozen(path: str | Path, device: torch.device) -> tuple[nn.Module, dict]:
    """Load a checkpoint for explanation: eval mode, on ``device``, parameters frozen (no weight
    gradients are computed in explanation passes)."""
    model, config = load_checkpoint(path)
    model = model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, config


def preprocessing_of(config: dict) -> Preprocessing:
    return Preprocessing(**config["preprocessing"])


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
