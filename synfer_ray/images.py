"""Image bytes in and out: PNG encoding of generated faces, decoding of references."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from synfer_ray.errors import SynferError


def png_bytes(image: np.ndarray) -> bytes:
    """(H, W, 3) or (H, W) uint8 -> PNG bytes (lossless, deterministic)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_rgb(data: bytes, size: int | None = None, field: str = "image") -> np.ndarray:
    """Image bytes of any PIL format -> (size, size, 3) uint8 RGB."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError) as error:
        raise SynferError(field, f"{len(data)} bytes", f"a readable image (PNG, JPEG, ...): {error}") from error
    image = image.convert("RGB")
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def read_rgb(path: Path, size: int | None = None, field: str = "image") -> np.ndarray:
    if not Path(path).is_file():
        raise SynferError(field, str(path), "an existing image file")
    return decode_rgb(Path(path).read_bytes(), size, field)
