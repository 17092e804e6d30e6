"""Pre-flight scan: find unusable image files before a long job starts.

Every file's header is checked first (format, and the --max-image-pixels
limit, before any pixel is decoded), then it is decoded once with
serving.core.imageio.inspect_image (the same checks the client uses). Zero-byte,
truncated, over-limit, non-image and unreadable files are listed with their
paths; training refuses to start unless --skip-bad. Files DALI would decode
differently from the reference decode (RGBA, palette, 16-bit, CMYK..., or an
EXIF orientation other than 1) are converted once to upright RGB PNGs in a
cache folder, so DALI and serving see the same pixels.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serving.core.errors import ImageReadError
from serving.core.imageio import DEFAULT_MAX_IMAGE_PIXELS, dali_decodes_alike, inspect_image, load_rgb_u8
from serving.inputs.datasets import Sample, parse_hdf5_source
from training.errors import DataError
from serving.core.progress import bar_disable

MAX_LISTED = 20  # bad files named in the error message; the rest are counted


@dataclass
class ScanResult:
    samples: list[Sample]  # usable samples; converted files point into the cache
    origins: list[str] = field(default_factory=list)  # the original path of each usable sample
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    converted: int = 0


def _cache_name(path: Path) -> str:
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()
    return hashlib.sha1(key).hexdigest()[:20] + ".png"


def convert_to_cache(path: Path, cache_dir: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Path:
    """Write ``path`` as an RGB PNG in ``cache_dir`` (once; reused while the file is unchanged)."""
    from PIL import Image

    from serving.core.atomic import atomic_path

    out = cache_dir / _cache_name(path)
    if not out.exists():
        rgb = load_rgb_u8(path, max_pixels=max_pixels)
        with atomic_path(out) as tmp:
            Image.fromarray(np.ascontiguousarray(rgb)).save(tmp, format="PNG")
    return out


def scan_samples(samples: list[Sample], cache_dir: Path | None, *, progress: bool = True,
                 desc: str = "scan", max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> ScanResult:
    """Decode every file once; list bad ones and convert odd modes into ``cache_dir``."""
    from tqdm import tqdm

    result = ScanResult(samples=[])
    for s in tqdm(samples, desc=desc, unit="img", disable=bar_disable(progress), leave=False):
        if parse_hdf5_source(s.source) is not None:
            result.samples.append(s)  # HDF5 rows are validated by their reader
            result.origins.append(s.source)
            continue
        path = Path(s.source)
        try:
            header = inspect_image(path, max_pixels=max_pixels)
            if dali_decodes_alike(header):
                result.samples.append(s)
                result.origins.append(s.source)
                continue
            if cache_dir is None:
                raise DataError(f"{path}: image mode {header.mode} (orientation {header.orientation}) needs "
                                "conversion but no cache folder was given")
            result.samples.append(Sample(str(convert_to_cache(path, cache_dir, max_pixels)), s.label))
            result.origins.append(s.source)
            result.converted += 1
        except ImageReadError as exc:
            # The message already names the file; keep only the reason.
            why = str(exc)
            prefix = f"{path}: "
            result.bad.append((str(path), why[len(prefix):] if why.startswith(prefix) else why))
    return result


def refuse_bad(result: ScanResult, skip_bad: bool) -> None:
    """Raise DataError listing the bad files unless ``skip_bad``."""
    if not result.bad or skip_bad:
        return
    lines = [f"  {p}: {why}" for p, why in result.bad[:MAX_LISTED]]
    more = len(result.bad) - MAX_LISTED
    if more > 0:
        lines.append(f"  ... and {more} more")
    raise DataError(f"{len(result.bad)} unusable image file(s); fix or remove them, or pass --skip-bad "
                    "to train without them:\n" + "\n".join(lines))


def describe_skipped(result: ScanResult, listing: Path) -> str | None:
    """What --skip-bad left out, and where the full list is (None when nothing was)."""
    if not result.bad:
        return None
    lines = [f"  {p}: {why}" for p, why in result.bad[:MAX_LISTED]]
    more = len(result.bad) - MAX_LISTED
    if more > 0:
        lines.append(f"  ... and {more} more")
    return (f"--skip-bad: left out {len(result.bad)} unusable image file(s), all listed in {listing}:\n"
            + "\n".join(lines))


def write_bad_list(result: ScanResult, path: Path) -> Path | None:
    """Record skipped files as CSV (path,reason) so a long job's losses are visible."""
    import csv
    import io

    from serving.core.atomic import atomic_write_text

    if not result.bad:
        return None
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "reason"])
    w.writerows(result.bad)
    return atomic_write_text(path, buf.getvalue())
