"""Image decoding for the detector: any file Pillow reads -> an RGB image in display orientation."""

from __future__ import annotations

import io
import os
import struct
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DECODE_REASONS = ("empty", "truncated", "not_an_image", "unsupported", "too_large", "corrupt")

# Pillow's own default (about 89.5 megapixels); above it a file is refused as a decompression bomb.
DEFAULT_MAX_PIXELS = 89_478_485

# Pillow's bomb guard is a module global: hold this lock while it is changed for one call.
_PIL_LIMIT_LOCK = threading.Lock()


class ImageDecodeError(ValueError):
    """An input that cannot be turned into an RGB image; `reason` is one of DECODE_REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in DECODE_REASONS:
            raise ValueError(f"unknown ImageDecodeError reason {reason!r}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, compositing transparency on white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # Wide grey levels: scale the actual range to 0-255 instead of clipping (16-bit PNGs would be white).
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):  # a fixed range: 16-bit white stays white
            lo, hi = 0.0, 65535.0
        elif arr.size:
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        else:
            lo = hi = 0.0
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) * (255.0 / (hi - lo))
        grey = np.rint(np.nan_to_num(scaled, nan=0.0)).clip(0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([grey] * 3, axis=-1), mode="RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def load_image(
    source: bytes | bytearray | str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Decode bytes or a file path into an RGB PIL image (EXIF-rotated, first frame of animations)."""
    name = "<bytes>" if isinstance(source, bytes | bytearray) else str(source)
    if isinstance(source, bytes | bytearray):
        data = bytes(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ImageDecodeError("not_an_image", f"{name}: no such file")
        data = path.read_bytes()
    if len(data) == 0:
        raise ImageDecodeError("empty", f"{name}: the file is empty (0 bytes)")

    with _PIL_LIMIT_LOCK:
        old_limit = Image.MAX_IMAGE_PIXELS
        try:
            Image.MAX_IMAGE_PIXELS = max_pixels
            return _decode(data, name, max_pixels)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageDecodeError("too_large", f"{name}: {e}") from e
        finally:
            Image.MAX_IMAGE_PIXELS = old_limit


def _reason_for(error: OSError) -> str:
    """Map Pillow's OSError texts to a contract reason."""
    text = str(error).lower()
    if "truncated" in text or "premature end" in text:
        return "truncated"
    if "not available" in text or "unsupported" in text or "not supported" in text or "cannot handle" in text:
        return "unsupported"
    return "corrupt"


def _decode(data: bytes, name: str, max_pixels: int | None) -> Image.Image:
    """Open, check, load and convert one encoded image."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise ImageDecodeError(
                    "too_large", f"{name}: {img.width}x{img.height} pixels exceeds the limit of {max_pixels}"
                )
            img.seek(0)  # first frame of GIF/APNG/WebP animations
            img.load()
        except ImageDecodeError:
            raise
        except UnidentifiedImageError as e:
            raise ImageDecodeError("not_an_image", f"{name}: Pillow cannot identify an image format") from e
        except OSError as e:
            raise ImageDecodeError(_reason_for(e), f"{name}: {e}") from e
        except (SyntaxError, ValueError, IndexError, struct.error, EOFError) as e:
            raise ImageDecodeError("corrupt", f"{name}: {type(e).__name__}: {e}") from e
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block must not lose a decodable image
        pass
    try:
        return _to_rgb(img)
    except (ValueError, OSError) as e:
        raise ImageDecodeError("unsupported", f"{name}: cannot convert mode {img.mode!r} to RGB: {e}") from e
