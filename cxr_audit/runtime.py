"""Device choice, seeding and the provenance every output file records."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import random
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from cxr_audit.errors import UsageError


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; a CUDA request without CUDA is a usage error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device '{device}' requested but CUDA is not available")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device '{device}'") from None


def autocast(device: torch.device, enabled: bool, *, on_cpu: bool = False):
    """bf16 autocast on CUDA when ``enabled``; on a CPU too when ``on_cpu`` (scan only: training on
    CPU stays fp32 whatever ``--amp`` says, because its default is on for CUDA's sake)."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    if enabled and on_cpu and device.type == "cpu":
        if not cpu_has_fast_bf16():
            raise UsageError("--amp on CPU needs bf16 kernels (AVX-512 or AMX); this CPU has none, "
                             "so bf16 would be slower than fp32: drop --amp")
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return nullcontext()


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN has bf16 convolution kernels for this CPU (AVX-512 BW/VL/DQ or newer)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def versions() -> dict[str, str]:
    from cxr_audit import __version__

    out = {"cxr_audit": __version__, "torch": str(torch.__version__), "python": platform.python_version()}
    for mod in ("torchvision", "zennit", "h5py", "numpy"):
        try:
            out[mod] = str(__import__(mod).__version__)
        except (ImportError, AttributeError):
            from importlib.metadata import PackageNotFoundError, version

            try:
                out[mod] = version(mod)
            except PackageNotFoundError:
                out[mod] = "absent"
    return out


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def init_distributed(device: torch.device) -> torch.device:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1): NCCL with one
    GPU per process (``cuda:LOCAL_RANK``) on CUDA, gloo on CPU. Returns the device to use; outside
    torchrun returns ``device`` unchanged."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised process group, ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return rank_and_world()[0] == 0


def write_text_atomic(path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader (a later command,
    CI) sees the old file or the whole new one, never a half-written one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def prefixed(on_progress, prefix: str):
    """``on_progress(done, total, message)`` whose message starts with ``prefix`` (which stage or λ
    candidate is running); ``None`` stays ``None``."""
    if on_progress is None:
        return None
    return lambda done, total, message="": on_progress(done, total, f"{prefix} {message}")
