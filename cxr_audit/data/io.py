"""Read chest X-ray images from PNG/JPEG (8/16 bit, gray/RGB) and DICOM into float arrays.

Every reader returns a ``float32`` array of shape ``(H, W)`` scaled to ``[0, 1]`` where bright
means dense (bone white), whatever the storage convention of the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cxr_audit.errors import BadInputError

DICOM_SUFFIXES = {".dcm", ".dicom"}


def read_image(path: str | Path) -> np.ndarray:
    """Read one image as a ``(H, W)`` float32 array in ``[0, 1]``.

    RGB images are converted to luminance; 16-bit PNGs keep their full precision.
    Raises :class:`BadInputError` with the file name for missing or unreadable files.
    """
    path = Path(path)
    if path.is_dir():
        raise BadInputError(f"{path} is a directory, not an image")
    if not path.is_file():
        raise BadInputError(f"image not found: {path}")
    if is_dicom(path):
        return read_dicom(path)
    try:
        with Image.open(path) as img:
            img.load()
            return _pil_to_float(img)
    except Image.DecompressionBombError as exc:  # a header claiming e.g. 20000 x 20000 pixels
        raise BadInputError(f"image {path} is too large to decode safely: {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise BadInputError(f"cannot read image {path}: {exc}") from None


def is_dicom(path: str | Path) -> bool:
    """A DICOM file: by suffix, or "DICM" after the 128-byte preamble (files without a suffix)."""
    return Path(path).suffix.lower() in DICOM_SUFFIXES or _has_dicom_preamble(Path(path))


def _has_dicom_preamble(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def _pil_to_float(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        # 16-bit PNGs arrive as mode I/I;16; scale by the container's range, not the image max,
        # so that exposure differences between images are preserved.
        top = 65535.0 if arr.max() <= 65535 else float(arr.max())
        return (np.clip(arr, 0, None) / top).astype(np.float32)
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    if img.mode != "L":
        img = img.convert("L")
    return np.asarray(img, dtype=np.float32) / 255.0


def read_dicom(path: str | Path) -> np.ndarray:
    """Read a DICOM radiograph: rescale slope/intercept, VOI window, MONOCHROME1 inversion.

    Returns a ``(H, W)`` float32 array in ``[0, 1]``; multi-frame files use the first frame.
    """
    import pydicom

    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array.astype(np.float64)
    except Exception as exc:  # pydicom raises many types for broken files
        raise BadInputError(f"cannot read DICOM {path}: {exc}") from None
    if pixels.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 1:
        pixels = pixels[0]
    elif pixels.ndim == 3:
        pixels = pixels.mean(axis=-1)
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    pixels = pixels * slope + intercept
    center, width = _first(getattr(ds, "WindowCenter", None)), _first(getattr(ds, "WindowWidth", None))
    if center is not None and width is not None and float(width) > 0:
        lo, hi = float(center) - float(width) / 2, float(center) + float(width) / 2
    else:
        lo, hi = float(pixels.min()), float(pixels.max())
    out = np.clip((pixels - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(pixels)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32)


def _first(value):
    if value is None:
        return None
    try:
        return value[0]
    except (TypeError, IndexError):
        return value


def read_mask(path: str | Path) -> np.ndarray:
    """Read a binary mask PNG as a ``(H, W)`` bool array (any non-zero pixel is foreground)."""
    return read_image(path) > 0


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Write a ``(H, W)`` float image in ``[0, 1]`` (or a bool mask) as an 8-bit PNG."""
    arr = np.asarray(image)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    else:
        arr = (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
