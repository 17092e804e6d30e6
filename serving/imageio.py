"""Decoding images to 8-bit RGB, the same way everywhere.

Grey, grey+alpha, RGBA, palette, CMYK and 16-bit images all become ``uint8``
HWC RGB here. Training's pre-flight scan uses :func:`inspect_image` so the
files DALI decodes are exactly the files this module accepts, and files whose
mode DALI would treat differently are converted through this module.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from serving.errors import ImageReadError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# Refuse decompression bombs early, with a clear error, rather than exhausting memory.
MAX_PIXELS = 40_000 * 40_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# Modes DALI's decoder already turns into the same RGB as to_rgb_u8 below.
DALI_SAFE_MODES = ("RGB", "L")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def to_rgb_u8(img: Image.Image) -> np.ndarray:
    """Convert a PIL image of any common mode to uint8 HWC RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit (or 32-bit integer) grey: scale the full range down to 8 bits.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        grey = np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        grey = np.clip(np.round(arr * 255.0 if arr.max() <= 1.0 else arr), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        # Transparent pixels become white: the background of a slide scan.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy()


def _open(source: str | Path | bytes) -> Image.Image:
    fh = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    img = Image.open(fh)
    # PIL only warns between MAX_IMAGE_PIXELS and twice that: refuse from the header, before allocating.
    if img.size[0] * img.size[1] > MAX_PIXELS:
        raise Image.DecompressionBombError(f"{img.size[0]}x{img.size[1]} pixels is over the limit of {MAX_PIXELS}")
    img.load()  # decode now so a truncated file fails here, not later
    return img


def _check_file(p: Path, label: str) -> None:
    if not p.is_file():
        raise ImageReadError(f"{label}: no such file")
    if p.stat().st_size == 0:
        raise ImageReadError(f"{label}: empty file (0 bytes)")


def load_rgb_u8(source: str | Path | bytes, name: str | None = None) -> np.ndarray:
    """Decode a file (or its bytes) into uint8 HWC RGB; ImageReadError names the file."""
    label = name or (str(source) if not isinstance(source, (bytes, bytearray)) else "<bytes>")
    if not isinstance(source, (bytes, bytearray)):
        _check_file(Path(source), label)
    try:
        img = _open(source)
        return to_rgb_u8(img)
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{label}: image too large ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageReadError(f"{label}: not an image file PIL can decode") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{label}: cannot decode image ({exc})") from exc


def inspect_image(path: str | Path) -> str:
    """Fully decode ``path`` and return its PIL mode; ImageReadError if unusable."""
    p = Path(path)
    _check_file(p, str(p))
    try:
        img = _open(p)
        _ = img.size
        if img.format not in ("PNG", "JPEG", "TIFF", "BMP"):
            raise ImageReadError(f"{p}: unsupported image format {img.format}; expected PNG, JPEG, TIFF or BMP")
        return img.mode
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{p}: image too large ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageReadError(f"{p}: not an image file") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{p}: truncated or corrupt image ({exc})") from exc


def grey_equalize_u8(images_nhwc_u8: np.ndarray) -> np.ndarray:
    """Grey-scale + histogram equalisation per image, as training's DALI pipeline does it.

    DALI's ``color_space_conversion`` (ITU-R 601 weights in float32) then
    ``equalize`` (OpenCV's equalizeHist, matched exactly). DALI rounds about
    2 grey pixels in 10,000 the other way at exact halves; after equalisation
    that moved 0.3% of pixels by a few levels on tissue patches.
    """
    w = np.array([0.299, 0.587, 0.114], np.float32)
    out = np.empty_like(images_nhwc_u8)
    for i, img in enumerate(images_nhwc_u8):
        grey = np.floor(img.astype(np.float32) @ w + np.float32(0.5)).clip(0, 255).astype(np.uint8)
        hist = np.bincount(grey.ravel(), minlength=256)
        cdf = hist.cumsum()
        cdf_min = cdf[hist > 0][0]
        lut = np.round((cdf - cdf_min) * 255.0 / max(grey.size - cdf_min, 1)).clip(0, 255).astype(np.uint8)
        out[i] = lut[grey][:, :, None]
    return out


def resize_u8(image_hwc_u8: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a uint8 HWC image (a no-op when the size already matches)."""
    if image_hwc_u8.shape[:2] == tuple(hw):
        return image_hwc_u8
    img = Image.fromarray(image_hwc_u8)
    return np.asarray(img.resize((hw[1], hw[0]), Image.BILINEAR), dtype=np.uint8)
