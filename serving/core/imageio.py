"""Decoding images to 8-bit RGB, the same way everywhere.

The decode rule (the first step of the reference preprocessing,
serving/core/preprocess.py):

1. The header is read first: the format must be PNG, JPEG, TIFF or BMP and
   width x height must not exceed the pixel limit (``--max-image-pixels``),
   so a decompression bomb is refused before any pixel is decoded.
2. EXIF orientation (tag 274, values 1..8) is applied: pixels come out as a
   viewer shows them.
3. Modes become ``uint8`` HWC RGB: grey (``L``) is replicated to three
   channels; 16-bit grey is scaled by 255/65535 and rounded (32-bit integer
   grey too when its values pass 255); float grey in [0, 1] is scaled by 255;
   palette images are expanded through RGBA; alpha (RGBA, LA, PA, palette
   transparency) is composited over white, the background of a slide scan;
   CMYK (and every other mode) goes through PIL's ``convert("RGB")``.

Training's pre-flight scan uses :func:`inspect_image`, and files DALI would
decode differently (any mode but RGB and L, or an EXIF orientation other than
1) are converted through this module, so DALI and serving see the same pixels.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from serving.core.errors import ImageReadError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
FORMATS = ("PNG", "JPEG", "TIFF", "BMP")
# The default per-image limit (--max-image-pixels): 8192 x 8192, about 200 MB as
# decoded RGB. Far above any patch or tile, far below a bomb's gigabytes.
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192
MAX_PIXELS = DEFAULT_MAX_IMAGE_PIXELS  # the name older callers import
# PIL's own bomb check warns or raises at its own threshold; ours (from the
# header, with the user's limit) replaces it.
Image.MAX_IMAGE_PIXELS = None
# Modes DALI's decoder already turns into the same RGB as to_rgb_u8 below.
DALI_SAFE_MODES = ("RGB", "L")
EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class ImageHeader:
    """What the header says, read without decoding pixels."""

    width: int
    height: int
    format: str
    mode: str
    orientation: int  # EXIF orientation, 1 when absent

    @property
    def pixels(self) -> int:
        return self.width * self.height


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def check_max_pixels(max_pixels: int, flag: str = "--max-image-pixels") -> int:
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ImageReadError(f"{flag}: expected a positive number of pixels, got {max_pixels!r}")
    return max_pixels


def to_rgb_u8(img: Image.Image) -> np.ndarray:
    """Convert a PIL image of any common mode to uint8 HWC RGB (the rule in the module docstring)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # Integer arithmetic: a float64 copy of a large image would cost 8 bytes a pixel.
        arr = np.asarray(img)
        top = 65535 if img.mode.startswith("I;16") or int(arr.max(initial=0)) > 255 else 255
        grey = ((np.clip(arr, 0, top).astype(np.uint32) * 255 + top // 2) // top).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        scale = np.float32(255.0) if float(arr.max(initial=0.0)) <= 1.0 else np.float32(1.0)
        grey = np.clip(np.round(arr * scale), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        rgba_u8 = np.asarray(img, dtype=np.uint8)
        if rgba_u8.size and int(rgba_u8[..., 3].min()) == 255:
            # Opaque (every slide read inside the slide): compositing over white would keep the pixels.
            return np.ascontiguousarray(rgba_u8[..., :3])
    if img.mode in ("RGBA", "LA", "PA"):
        # Transparent pixels become white: the background of a slide scan.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy()


def _label(source, name: str | None) -> str:
    return name or (str(source) if not isinstance(source, (bytes, bytearray)) else "<bytes>")


def not_a_file(p: Path) -> str | None:
    """Why ``p`` is not a regular file that can be read (a symlink loop, a dangling link, a FIFO, no read
    permission ...), or None when it is one."""
    import errno
    import os
    import stat as st

    try:
        mode = os.stat(p).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symlink loop"
        if os.path.islink(p):
            return f"a dangling symlink (to {os.readlink(p)})"
        if exc.errno == errno.EACCES:
            return "permission denied (its folder cannot be searched)"
        return "no such file"
    if not st.S_ISREG(mode):
        kind = {st.S_ISDIR(mode): "a folder", st.S_ISFIFO(mode): "a FIFO (named pipe)", st.S_ISSOCK(mode): "a socket",
                st.S_ISCHR(mode) or st.S_ISBLK(mode): "a device"}.get(True, "not a regular file")
        return f"{kind}, not a file"
    if not os.access(p, os.R_OK):
        return "permission denied"
    return None


def _check_file(p: Path, label: str) -> None:
    why = not_a_file(p)
    if why is not None:
        raise ImageReadError(f"{label}: {why}")
    if p.stat().st_size == 0:
        raise ImageReadError(f"{label}: empty file (0 bytes)")


def _exif(img: Image.Image) -> Image.Exif:
    """The EXIF block without decoding pixels (PIL's PNG getexif() would decode the image to look for it)."""
    if img.format == "PNG":
        exif = Image.Exif()
        raw = img.info.get("exif")  # an eXIf chunk before the pixel data, read with the header
        if raw:
            exif.load(raw)
        return exif
    return img.getexif()


def _open_checked(source, label: str, max_pixels: int) -> tuple[Image.Image, ImageHeader]:
    """Open lazily (header only) and refuse what the header says is unusable."""
    fh = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    img = Image.open(fh)
    if img.format not in FORMATS:
        img.close()
        raise ImageReadError(f"{label}: unsupported image format {img.format}; expected PNG, JPEG, TIFF or BMP")
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise ImageReadError(f"{label}: image too large: {w}x{h} = {w * h} pixels is over the limit of "
                             f"{max_pixels} (--max-image-pixels)")
    try:
        orientation = int(_exif(img).get(EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a damaged EXIF block: treat as upright, like a viewer
        orientation = 1
    return img, ImageHeader(w, h, img.format, img.mode, orientation if 1 <= orientation <= 8 else 1)


def _reraise(exc: BaseException, label: str, unidentified: str = "not an image file",
             corrupt: str = "truncated or corrupt image") -> None:
    if isinstance(exc, ImageReadError):
        raise exc
    if isinstance(exc, UnidentifiedImageError):
        raise ImageReadError(f"{label}: {unidentified}") from exc
    if isinstance(exc, (OSError, SyntaxError, ValueError, Image.DecompressionBombError)):
        raise ImageReadError(f"{label}: {corrupt} ({exc})") from exc
    raise exc


def read_header(source: str | Path | bytes, name: str | None = None,
                max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> ImageHeader:
    """Read only the header: size, format, mode, EXIF orientation; ImageReadError if over the limit."""
    label = _label(source, name)
    if not isinstance(source, (bytes, bytearray)):
        _check_file(Path(source), label)
    try:
        img, header = _open_checked(source, label, max_pixels)
        img.close()
        return header
    except Exception as exc:  # noqa: BLE001 - sorted into ImageReadError by _reraise
        _reraise(exc, label)
        raise


def load_rgb_u8(source: str | Path | bytes, name: str | None = None,
                max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode a file (or its bytes) into upright uint8 HWC RGB; ImageReadError names the file."""
    label = _label(source, name)
    if not isinstance(source, (bytes, bytearray)):
        _check_file(Path(source), label)
    try:
        img, header = _open_checked(source, label, max_pixels)
        with img:
            img.load()  # decode now so a truncated file fails here, not later
            if header.orientation != 1:
                img = ImageOps.exif_transpose(img)
            return to_rgb_u8(img)
    except Exception as exc:  # noqa: BLE001 - sorted into ImageReadError by _reraise
        _reraise(exc, label, "not an image file PIL can decode", "cannot decode image")
        raise


def inspect_image(path: str | Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> ImageHeader:
    """Check the header, then fully decode ``path``; its header, or ImageReadError if unusable."""
    p = Path(path)
    _check_file(p, str(p))
    try:
        img, header = _open_checked(p, str(p), max_pixels)
        with img:
            img.load()
        return header
    except Exception as exc:  # noqa: BLE001 - sorted into ImageReadError by _reraise
        _reraise(exc, str(p))
        raise


def dali_decodes_alike(header: ImageHeader) -> bool:
    """True when DALI's decoder gives the pixels of :func:`load_rgb_u8` (no conversion needed)."""
    return header.mode in DALI_SAFE_MODES and header.orientation == 1 and header.format in ("PNG", "JPEG")


def equalize_grey_u8(image_hwc_u8: np.ndarray) -> np.ndarray:
    """Grey-scale + histogram equalisation of one image, as training's DALI pipeline does it.

    DALI's ``color_space_conversion`` (ITU-R 601 weights in float32) then
    ``equalize`` (OpenCV's equalizeHist, matched exactly). DALI rounds about
    2 grey pixels in 10,000 the other way at exact halves; after equalisation
    that moved 0.3% of pixels by a few levels on tissue patches.
    """
    w = np.array([0.299, 0.587, 0.114], np.float32)
    grey = np.floor(image_hwc_u8.astype(np.float32) @ w + np.float32(0.5)).clip(0, 255).astype(np.uint8)
    hist = np.bincount(grey.ravel(), minlength=256)
    cdf = hist.cumsum()
    cdf_min = cdf[hist > 0][0]
    lut = np.round((cdf - cdf_min) * 255.0 / max(grey.size - cdf_min, 1)).clip(0, 255).astype(np.uint8)
    return np.repeat(lut[grey][:, :, None], 3, axis=2)


def grey_equalize_u8(images_nhwc_u8: np.ndarray) -> np.ndarray:
    """:func:`equalize_grey_u8` of every image of a batch."""
    out = np.empty_like(images_nhwc_u8)
    for i, img in enumerate(images_nhwc_u8):
        out[i] = equalize_grey_u8(img)
    return out


def resize_u8(image_hwc_u8: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bilinear (antialiased) resize of a uint8 HWC image; a no-op when the size already matches."""
    if image_hwc_u8.shape[:2] == tuple(hw):
        return image_hwc_u8
    img = Image.fromarray(image_hwc_u8)
    return np.asarray(img.resize((hw[1], hw[0]), Image.BILINEAR), dtype=np.uint8)
