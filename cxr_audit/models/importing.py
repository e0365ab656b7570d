"""Turn a model trained elsewhere (torchvision, Lightning, DDP, torchxrayvision-style state_dicts)
into a cxr-audit checkpoint, so every later command works on it unchanged.

The weights file is read with ``torch.load(weights_only=True)`` only. The state_dict is found in
the file (a bare one, or under ``state_dict``/``model_state_dict``/``model``/... — the key used is
reported), wrapper prefixes (``module.`` from DDP, ``model.`` from Lightning, ``_orig_mod.`` from
``torch.compile``) are stripped where that makes the keys fit, and any remaining mismatch is one
line naming the first missing and unexpected keys and the first shape that differs.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cxr_audit.data.dataset import NORMALIZATIONS, Preprocessing
from cxr_audit.errors import BadInputError, UsageError
from cxr_audit.models.architectures import build_model, trust_factory
from cxr_audit.models.registry import CHECKPOINT_FORMAT, file_sha256, save_checkpoint
from cxr_audit.runtime import now, versions

#: where training frameworks keep the weights inside a checkpoint dict, most specific first
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "net", "network", "weights",
                   "module", "ema_state_dict")
#: wrapper prefixes, tried alone and nested
PREFIXES = ("module.", "model.", "_orig_mod.", "net.", "backbone.")


@dataclass
class ImportResult:
    checkpoint: Path
    arch: str
    state_dict_key: str | None  # None: the file is a bare state_dict
    prefix: str  # stripped from every key ('' for none)
    ignored: list[str] = field(default_factory=list)
    sha256: str = ""


def parse_normalization(text: str, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``imagenet|xrv|none|MEAN,STD`` (or one MEAN and STD per channel) -> ``(mean, std)``."""
    if text in NORMALIZATIONS:
        mean, std = NORMALIZATIONS[text]
        if len(mean) not in (1, channels):
            raise UsageError(f"--normalize {text} has {len(mean)} channel values; use --channels {len(mean)} "
                             f"or give MEAN,STD")
        return mean, std
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (2, 2 * channels) or not values:
        raise UsageError(f"--normalize must be imagenet, xrv, none, MEAN,STD or {channels} means then "
                         f"{channels} stds, got '{text}'")
    half = len(values) // 2
    return tuple(values[:half]), tuple(values[half:])


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """The tensors of a weights file and the key they were under (``None``: a bare state_dict)."""
    if not path.is_file():
        raise BadInputError(f"weights file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign or truncated files
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise BadInputError(f"cannot read {path} as weights (weights-only load): {first}") from None
    if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
        raise UsageError(f"{path} is already a cxr-audit checkpoint; use it directly")
    if _is_state_dict(payload):
        return payload, None
    if isinstance(payload, dict):
        for key in STATE_DICT_KEYS:
            if _is_state_dict(payload.get(key)):
                return payload[key], key
    kind = type(payload).__name__
    keys = ", ".join(map(str, list(payload)[:6])) if isinstance(payload, dict) else ""
    raise BadInputError(f"{path} holds no state_dict (a {kind}{' with keys ' + keys if keys else ''}); "
                        f"save model.state_dict() with torch.save")


def _is_state_dict(obj) -> bool:
    return (isinstance(obj, dict) and bool(obj)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def fit_keys(weights: dict[str, torch.Tensor], expected: set[str]) -> tuple[dict[str, torch.Tensor], str]:
    """Strip the wrapper prefix (alone or nested) under which most keys match ``expected``."""
    candidates = [""] + list(PREFIXES) + [a + b for a in PREFIXES for b in PREFIXES if a != b]

    def strip(prefix: str) -> dict[str, torch.Tensor]:
        return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in weights.items()}

    best = max(candidates, key=lambda p: (len(expected & set(strip(p))), -len(p)))
    return strip(best), best


def check_fit(weights: dict[str, torch.Tensor], model_state: dict[str, torch.Tensor], arch: str) -> None:
    """One-line :class:`BadInputError` naming the first missing/unexpected key and shape mismatch."""
    missing = [k for k in model_state if k not in weights]
    unexpected = [k for k in weights if k not in model_state]
    shapes = [(k, tuple(weights[k].shape), tuple(v.shape)) for k, v in model_state.items()
              if k in weights and weights[k].shape != v.shape]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (first '{missing[0]}')")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (first '{unexpected[0]}')")
    if shapes:
        key, got, want = shapes[0]
        parts.append(f"{len(shapes)} with other shapes (first '{key}': file {list(got)}, {arch} {list(want)})")
    hint = _hint(shapes) or (f"if '{unexpected[0]}' is no weight of the network (a calibration, a counter), "
                             f"drop it with --ignore-key '{unexpected[0]}'" if unexpected and not missing else "")
    raise BadInputError(f"weights do not fit '{arch}': " + "; ".join(parts) + (f" — {hint}" if hint else ""))


def _hint(shapes: list[tuple[str, tuple, tuple]]) -> str:
    for key, got, want in shapes:
        if len(got) == 4 and got[0] == want[0] and got[1] != want[1]:
            return f"the file's first convolution takes {got[1]} channel(s): pass --channels {got[1]}"
        if len(got) in (1, 2) and got[0] != want[0] and ("classifier" in key or "fc" in key or "head" in key):
            return f"the file's classifier has {got[0]} outputs: give {got[0]} names in --classes"
    return ""


def import_model(weights: str | Path, arch: str, classes: list[str], out: str | Path, *, size: int = 224,
                 channels: int = 3, normalize: str = "imagenet", multilabel: bool = False,
                 ignore_keys: tuple[str, ...] = (), resize: str = "squash") -> ImportResult:
    """Write a cxr-audit checkpoint for ``weights`` trained outside cxr-audit.

    ``arch`` is a registered name, ``torchvision.models:NAME`` or the user's ``module:factory``;
    ``classes`` names the model's outputs in order; ``ignore_keys`` drops extra tensors by
    glob (e.g. torchxrayvision's ``op_threshs``). The checkpoint records the source file's
    sha256, the key and prefix the weights came from and every preprocessing choice.
    """
    weights, out = Path(weights), Path(out)
    if out.resolve() == weights.resolve():
        raise UsageError(f"--out {out} is the weights file itself; choose another path")
    if len(classes) < 1 or len(set(classes)) != len(classes) or any(not c for c in classes):
        raise UsageError(f"--classes needs distinct, non-empty names, got {classes}")
    mean, std = parse_normalization(normalize, channels)
    prep = Preprocessing(size=size, channels=channels, mean=mean, std=std, resize=resize)
    spec = trust_factory(arch)
    model = build_model(spec.name, len(classes), channels, size)
    state, key = read_state_dict(weights)
    ignored = [k for k in state if any(fnmatch.fnmatchcase(k, pat) for pat in ignore_keys)]
    state = {k: v for k, v in state.items() if k not in ignored}
    state, prefix = fit_keys(state, set(model.state_dict()))
    check_fit(state, model.state_dict(), spec.name)
    model.load_state_dict(state)
    sha = file_sha256(weights)
    source = {"file": str(weights.resolve()), "sha256": sha, "state_dict_key": key, "prefix_stripped": prefix,
              "ignored_keys": ignored}
    options = {"arch": arch, "classes": list(classes), "size": size, "channels": channels, "normalize": normalize,
               "multilabel": multilabel, "ignore_keys": list(ignore_keys), "resize": resize}
    save_checkpoint(out, model.eval(), spec.name, list(classes), prep, multilabel=multilabel,
                    extra={"import": source, "options": options, "created": now(), "versions": versions()})
    return ImportResult(out, spec.name, key, prefix, ignored, sha)
