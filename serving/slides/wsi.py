"""Whole-slide files through OpenSlide: what is a slide, opening it, its microns per pixel, thumbnails, handles.

OpenSlide returns transparent black for reads outside the slide without an
error, so callers check bounds themselves (serving/slides/tiling.py).
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np

from serving.core.errors import SlideError
from serving.core.imageio import to_rgb_u8

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm")
MASK_MAX_SIDE = 2048  # the tissue mask's resolution cap (pixels along the long side)
# The decoded-tile cache the reader threads of one slide share: OpenSlide's own default for one handle. With a
# cache per handle every reader thread decoded the slide tiles its runs touched, and held its own 32 MiB; shared,
# a tile is decoded once for all of them (the real SVS read by two threads: 0.27 against 0.34 CPU-ms per tile).
SHARED_CACHE_BYTES = 32 * 2 ** 20


def _openslide():
    try:
        import openslide
    except ImportError as exc:  # pragma: no cover - openslide is a dependency
        raise SlideError("whole-slide input needs openslide-python and openslide-bin") from exc
    return openslide


def is_slide(path: str | Path) -> bool:
    """True when ``path`` is a file OpenSlide recognises as a slide."""
    p = Path(path)
    if not p.is_file() or p.suffix.lower() not in SLIDE_SUFFIXES:
        return False
    try:
        return _openslide().OpenSlide.detect_format(str(p)) is not None
    except Exception:  # noqa: BLE001 - unreadable: not a slide we can use
        return False


def refuse_ome_tiff(path: str | Path) -> None:
    """SlideError for an OME-TIFF (QuPath's and Bio-Formats' export): OpenSlide reads neither its SubIFD
    pyramid nor the pixel size in its OME-XML, so it would serve level 0 alone at an unknown resolution."""
    p = Path(path)
    if p.suffix.lower() not in (".tif", ".tiff"):
        return
    try:
        import tifffile

        with tifffile.TiffFile(p) as tif:
            ome = tif.is_ome
    except Exception:  # noqa: BLE001 - not a TIFF tifffile reads: OpenSlide says what is wrong with it
        return
    if ome:
        raise SlideError(f"{p}: an OME-TIFF, which OpenSlide cannot tile (it reads neither its SubIFD pyramid nor "
                         "its OME-XML pixel size); export it as a plain pyramidal TIFF (every level a page, the "
                         "resolution in its tags) or as SVS, e.g. with vips tiffsave --tile --pyramid")


MPP_TOLERANCE = 0.05  # levels whose recorded resolution strays further from level 0's x downsample disagree


def level_mpp_problem(path: str | Path, slide) -> str | None:
    """Why the pyramid's levels disagree on the resolution (a TIFF whose pages' resolution tags, or a DICOM
    series whose levels' pixel spacing, do not scale with their size), or None."""
    p = Path(path)
    recorded: list[tuple[int, float]] = []  # (level width, mpp) as the file records them
    if p.suffix.lower() in (".tif", ".tiff"):
        try:
            import tifffile

            with tifffile.TiffFile(p) as tif:
                for page in tif.pages:
                    xres, unit = page.tags.get("XResolution"), page.tags.get("ResolutionUnit")
                    per_unit = {2: 25400.0, 3: 1e4}.get(int(unit.value) if unit is not None else 0)
                    if xres is None or per_unit is None:
                        continue
                    num, den = xres.value
                    if num > 0:
                        recorded.append((int(page.imagewidth), per_unit * den / num))
        except Exception:  # noqa: BLE001 - tifffile cannot read it: OpenSlide's reading decides
            return None
    elif slide.properties.get("openslide.vendor") == "dicom":
        from serving.slides.dicom import level_spacings

        recorded = level_spacings(p)
    if len(recorded) < 2:
        return None
    widths = dict(recorded)
    w0 = slide.dimensions[0]
    mpp0 = widths.get(w0) or recorded[0][1]
    for width, mpp in sorted(widths.items(), reverse=True):
        expected = mpp0 * w0 / width
        if abs(mpp - expected) > MPP_TOLERANCE * expected:
            return (f"{p}: its pyramid levels disagree on the resolution: the {width}-px-wide level records "
                    f"{mpp:.4g} um/px, level 0 ({w0} px at {mpp0:.4g} um/px) makes it {expected:.4g}; pass --mpp "
                    "(a manifest's mpp column) to say which is right")
    return None


def open_slide(path: str | Path):
    p = Path(path)
    if not p.is_file():
        raise SlideError(f"{p}: no such slide file")
    refuse_ome_tiff(p)
    osl = _openslide()
    try:
        return osl.OpenSlide(str(p))
    except Exception as exc:  # noqa: BLE001 - OpenSlideError, OpenSlideUnsupportedFormatError, OSError
        raise SlideError(f"{p}: OpenSlide cannot open it ({exc})") from exc


def slide_open_error(path: str | Path) -> str:
    """Why ``path`` cannot be scored as a slide: OpenSlide's error, or that it is not one."""
    try:
        open_slide(path).close()
    except SlideError as exc:
        return str(exc)
    return f"{path}: OpenSlide does not recognise it as a slide"


def slide_mpp(slide, path: str | Path, fallback_mpp: float | None = None) -> float:
    """Level-0 microns per pixel: OpenSlide's mpp-x, then the TIFF resolution tags, then ``--mpp``."""
    props = slide.properties
    osl = _openslide()
    try:
        v = float(props.get(osl.PROPERTY_NAME_MPP_X, "nan"))
        if math.isfinite(v) and v > 0:
            return v
    except ValueError:
        pass
    try:
        xres = float(props.get("tiff.XResolution", "nan"))
        unit = props.get("tiff.ResolutionUnit", "").lower()
        per_unit_um = {"centimeter": 1e4, "inch": 25400.0}.get(unit)
        if per_unit_um and math.isfinite(xres) and xres > 0:
            return per_unit_um / xres
    except ValueError:
        pass
    if fallback_mpp:
        return float(fallback_mpp)
    raise SlideError(f"{path}: the slide records no microns per pixel (no {osl.PROPERTY_NAME_MPP_X}, no "
                     "tiff.XResolution in centimeters or inches); pass --mpp")


def thumbnail(slide, max_side: int = MASK_MAX_SIDE) -> np.ndarray:
    w, h = slide.dimensions
    k = max(w, h) / max_side if max(w, h) > max_side else 1.0
    size = (max(1, int(round(w / k))), max(1, int(round(h / k))))
    thumb = slide.get_thumbnail(size).convert("RGB")
    return to_rgb_u8(thumb if thumb.size == size else thumb.resize(size))


class SlideHandles:
    """One OpenSlide handle per thread and slide (handles are not shared across threads), all of them over one
    decoded-tile cache (OpenSlide's caches are thread-safe)."""

    def __init__(self, cache_bytes: int = SHARED_CACHE_BYTES) -> None:
        self._local = threading.local()
        self._all: list = []
        self._lock = threading.Lock()
        self._cache_bytes = cache_bytes
        self._cache = None

    def get(self, path: str):
        cache = getattr(self._local, "slides", None)
        if cache is None:
            cache = self._local.slides = {}
        if path not in cache:
            slide = open_slide(path)
            self._share_cache(slide)
            cache[path] = slide
            with self._lock:
                self._all.append(slide)
        return cache[path]

    def _share_cache(self, slide) -> None:
        try:
            with self._lock:
                if self._cache is None:
                    self._cache = _openslide().OpenSlideCache(self._cache_bytes)
            slide.set_cache(self._cache)
        except Exception:  # noqa: BLE001 - an OpenSlide before 4.0 has no shared caches: each handle keeps its own
            pass

    def reopen(self, path: str) -> None:
        """Drop this thread's handle of ``path``: after a read error OpenSlide keeps failing on that
        handle (its error state is sticky), so the next tile gets a fresh one."""
        cache = getattr(self._local, "slides", None) or {}
        slide = cache.pop(path, None)
        if slide is not None:
            with self._lock:
                if slide in self._all:
                    self._all.remove(slide)
            try:
                slide.close()
            except Exception:  # noqa: BLE001 - already broken
                pass

    def close(self) -> None:
        with self._lock:
            for s in self._all:
                s.close()
            self._all.clear()
