"""Deterministic synthetic datasets: ``patchserve synth``.

One call writes the same data in every layout users have: class-folder trees
per split, a second centre's test set with a shifted stain, a CSV manifest,
PatchCamelyon-style HDF5 files and (optionally) a pyramidal whole-slide image
with its ground-truth masks. The same seed gives the same bytes in every file.
Textures come from :mod:`serving.synth.texture`; numpy/PIL/h5py only.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from serving.core.errors import InputError
from serving.inputs.datasets import MPP_ATTRIBUTE
from serving.core.options import option
from serving.synth.slide import MPP as PATCH_MPP
from serving.synth.texture import REFERENCE_SIZE, class_names_for, make_patch
from serving.core.progress import bar_disable

__all__ = ["SynthConfig", "SynthSummary", "synthesize", "make_patch", "class_names_for", "REFERENCE_SIZE"]

FORMATS = {"png": ".png", "jpg": ".jpg", "tif": ".tif"}
SPLITS = ("train", "val", "test")
SHIFTED_SPLIT = "test_shifted"  # the test tissue again, stained at a second centre
SHIFTED_STAIN = 1.0
# Classes overlap in morphology and stain by default: a model cannot reach 1.0 (texture.patch_look).
DEFAULT_OVERLAP = 1.0
NOISY_SPLITS = ("train", "val")  # label noise is in the annotations learnt from; test labels stay true
MAX_CLASSES = 8
# Everything synthesize writes; --overwrite removes exactly these, nothing else.
OUTPUTS = (*SPLITS, SHIFTED_SPLIT, "pcam", "slides", "manifest.csv", "synth.json")
_SPLIT_KEYS = {"train": 1, "val": 2, "test": 3}
_NOISE_KEY = 99


@dataclass(frozen=True)
class SynthConfig:
    """Options of :func:`synthesize`, validated on construction (errors name the flag)."""

    classes: int = option(2, f"number of classes, 2..{MAX_CLASSES} (2: normal/tumour; more: colorectal tissue types)")
    per_class: int = option(60, "images of the largest class, over train+val+test (at least 3)")
    imbalance: float = option(1.0, "ratio of the largest (first) class to the smallest, >= 1 "
                                   "(3: the chest X-ray study's 3:1)")
    size: int = option(64, "patch side in pixels, 16..1024")
    fmt: str = option("png", "image format", flag="--format", choices=tuple(FORMATS))
    seed: int = option(0, "same seed, same bytes")
    slide: bool = option(False, "also write slides/slide_0.tiff with tumour and tissue masks")
    slide_size: int = option(4096, "slide level-0 width in pixels (height is 3/4)")
    split_fractions: tuple[float, float, float] = option((0.6, 0.2, 0.2), cli=False)
    overlap: float = option(DEFAULT_OVERLAP, "how far patches stray towards another class's morphology and "
                            "stain, 0..1 (0: classes apart, a model reaches 1.0)")
    label_noise: float = option(0.0, "share of train/val images filed under a wrong class, 0..0.5 "
                                "(synth.json lists them)")

    def __post_init__(self) -> None:
        def integer(flag: str, v: object, lo: int, hi: int) -> None:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
                raise InputError(f"{flag}: expected an integer in {lo}..{hi}, got {v!r}")

        integer("--classes", self.classes, 2, MAX_CLASSES)
        integer("--per-class", self.per_class, 3, 1_000_000)
        integer("--size", self.size, 16, 1024)
        integer("--seed", self.seed, 0, 2**32 - 1)
        integer("--slide-size", self.slide_size, 512, 65536)
        if self.fmt not in FORMATS:
            raise InputError(f"--format: invalid format {self.fmt!r}. Only {', '.join(FORMATS)} are supported.")
        if not (isinstance(self.imbalance, (int, float)) and math.isfinite(self.imbalance) and self.imbalance >= 1):
            raise InputError(f"--imbalance: expected a number >= 1 (largest / smallest class), got {self.imbalance!r}")
        if not (isinstance(self.overlap, (int, float)) and 0.0 <= self.overlap <= 1.0):
            raise InputError(f"--overlap: expected a number in [0, 1] (0: classes apart), got {self.overlap!r}")
        if not (isinstance(self.label_noise, (int, float)) and 0.0 <= self.label_noise < 0.5):
            raise InputError(f"--label-noise: expected a fraction in [0, 0.5) of train/val labels to flip, "
                             f"got {self.label_noise!r}")
        smallest = self.counts()[-1]
        if smallest < 3:
            raise InputError(
                f"--imbalance: {self.imbalance} with --per-class {self.per_class} leaves {smallest} images in the "
                "smallest class; each class needs at least 3 (one per split). Raise --per-class or lower --imbalance."
            )
        fr = tuple(float(f) for f in self.split_fractions)
        if len(fr) != 3 or min(fr) < 0 or fr[1] == 0 or fr[2] == 0 or not math.isclose(sum(fr), 1.0, abs_tol=1e-6):
            raise InputError(f"split_fractions: expected (train, val, test) fractions summing to 1 with val and "
                             f"test > 0, got {self.split_fractions!r}")
        object.__setattr__(self, "split_fractions", fr)

    @property
    def class_names(self) -> tuple[str, ...]:
        return class_names_for(self.classes)

    def counts(self) -> list[int]:
        """Images per class: geometric from ``per_class`` down to ``per_class / imbalance``."""
        n = self.classes
        return [int(round(self.per_class * self.imbalance ** (-i / (n - 1)))) for i in range(n)]

    def split_counts(self) -> dict[str, list[int]]:
        """Per split, per class. Every class gets at least one image in val and test."""
        out: dict[str, list[int]] = {s: [] for s in SPLITS}
        for total in self.counts():
            val = max(1, int(round(total * self.split_fractions[1])))
            test = max(1, int(round(total * self.split_fractions[2])))
            out["train"].append(total - val - test)
            out["val"].append(val)
            out["test"].append(test)
        return out


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`synthesize` wrote. ``counts[split][class]`` is a number of images."""

    out: Path
    class_names: tuple[str, ...]
    counts: dict[str, dict[str, int]]
    manifest: Path
    hdf5: dict[str, tuple[Path, Path]]  # split -> (x file, y file)
    info: Path
    slide: Path | None = None
    slide_mask: Path | None = None
    slide_tissue_mask: Path | None = None
    slide_mask_json: Path | None = None
    files: tuple[Path, ...] = field(default=(), repr=False)

    def total(self, split: str) -> int:
        return sum(self.counts[split].values())


def _noisy_label(key: list[int], c: int, classes: int, label_noise: float) -> int:
    """The class an image is filed under: with probability ``label_noise`` another one, drawn uniformly."""
    if label_noise <= 0:
        return c
    rng = np.random.default_rng([*key, _NOISE_KEY])  # its own stream: the image's pixels do not change
    if rng.random() >= label_noise:
        return c
    other = int(rng.integers(classes - 1))
    return other + (other >= c)


def _encode(patch: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(patch)
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=95)
    elif fmt == "tif":
        img.save(buf, format="TIFF")
    else:
        img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise InputError(f"{out}: folder is not empty; pass --overwrite to replace its synthetic data")
        for name in OUTPUTS:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()


def _write_hdf5(out: Path, split: str, images: np.ndarray, labels: np.ndarray,
                class_names: tuple[str, ...]) -> tuple[Path, Path]:
    import h5py

    xpath, ypath = out / "pcam" / f"{split}_x.h5", out / "pcam" / f"{split}_y.h5"
    xpath.parent.mkdir(parents=True, exist_ok=True)
    # track_times=False: the same seed must give byte-identical files.
    with h5py.File(xpath, "w", track_order=False) as fx:
        fx.create_dataset("x", data=images, track_times=False)
        fx.attrs["class_names"] = np.array(class_names, dtype=h5py.string_dtype())
        fx.attrs[MPP_ATTRIBUTE] = PATCH_MPP
    with h5py.File(ypath, "w") as fy:
        fy.create_dataset("y", data=labels.astype(np.uint8).reshape(-1, 1, 1, 1), track_times=False)
    return xpath, ypath


@dataclass(frozen=True)
class SynthJob:
    """Options of ``patchserve synth``: where to write, and what (:class:`SynthConfig`)."""

    out: Path = option(help="output folder (must be empty unless --overwrite)", positional=True, metavar="OUT")
    overwrite: bool = option(False, "replace the synthetic data already in OUT (other files are kept)")
    progress: bool = option(True, "show progress bars (on a terminal only)")
    data: SynthConfig = option(default_factory=SynthConfig, help="what the data holds")

    def run(self) -> "SynthSummary":
        return synthesize(Path(self.out), overwrite=self.overwrite, progress=self.progress, **asdict(self.data))


def synthesize(out: Path, *, classes: int = 2, per_class: int = 60, imbalance: float = 1.0, size: int = 64,
               fmt: str = "png", seed: int = 0, slide: bool = False, slide_size: int = 4096,
               overwrite: bool = False, split_fractions=(0.6, 0.2, 0.2), overlap: float = DEFAULT_OVERLAP,
               label_noise: float = 0.0, progress: bool = False) -> SynthSummary:
    """Write a deterministic synthetic dataset under ``out`` (see the module docstring).

    Splits ``train``/``val``/``test`` as ``out/<split>/<class>/*``, ``test_shifted``
    (the test tissue under a second centre's stain), ``manifest.csv``
    (``path,label,split``), ``pcam/<split>_x.h5`` and ``_y.h5`` rows in manifest
    order, ``synth.json`` last, and with ``slide`` ``slides/slide_0.tiff`` and masks.
    ``label_noise`` files that share of train/val images under a wrong class
    (``synth.json`` lists them); the file name keeps the true class.
    """
    from tqdm.auto import tqdm

    cfg = SynthConfig(classes=classes, per_class=per_class, imbalance=imbalance, size=size, fmt=fmt,
                      seed=seed, slide=slide, slide_size=slide_size, split_fractions=tuple(split_fractions),
                      overlap=overlap, label_noise=label_noise)
    out = Path(out)
    _check_out(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    names, ext = cfg.class_names, FORMATS[fmt]
    split_counts = cfg.split_counts()
    plan = [(s, c, i) for s in SPLITS for c in range(classes) for i in range(split_counts[s][c])]
    files: list[Path] = []
    rows: list[tuple[str, str, str]] = []
    arrays: dict[str, list[np.ndarray]] = {s: [] for s in (*SPLITS, SHIFTED_SPLIT)}
    labels: dict[str, list[int]] = {s: [] for s in arrays}
    flipped: list[str] = []
    for d in (*SPLITS, SHIFTED_SPLIT):
        for name in names:
            (out / d / name).mkdir(parents=True, exist_ok=True)
    for split, c, i in tqdm(plan, desc="synth patches", unit="img", disable=bar_disable(progress)):
        # One generator per image, keyed by its place: the data set does not
        # depend on iteration order, and the shifted copy replays the same draws.
        key = [seed, _SPLIT_KEYS[split], c, i]
        variants = [(split, 0.0)] + ([(SHIFTED_SPLIT, SHIFTED_STAIN)] if split == "test" else [])
        label = _noisy_label(key, c, classes, label_noise) if split in NOISY_SPLITS else c
        for where, shift in variants:
            patch = make_patch(np.random.default_rng(key), c, size, shift, num_classes=classes, overlap=overlap)
            rel = f"{where}/{names[label]}/{names[c]}_{i:04d}{ext}"
            (out / rel).write_bytes(_encode(patch, fmt))
            files.append(out / rel)
            rows.append((rel, names[label], where))
            arrays[where].append(patch)
            labels[where].append(label)
            if label != c:
                flipped.append(rel)
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(("path", "label", "split"))
        w.writerows(rows)
    files.append(manifest)
    hdf5 = {}
    for split in arrays:
        hdf5[split] = _write_hdf5(out, split, np.stack(arrays[split]), np.array(labels[split]), names)
        files.extend(hdf5[split])
    counts = {s: {n: int(sum(1 for lab in labels[s] if lab == k)) for k, n in enumerate(names)} for s in arrays}
    slide_paths: dict[str, Path] = {}
    slide_meta: dict = {}
    if slide:
        from serving.synth.slide import write_slide

        written = write_slide(out / "slides", seed=seed, patch_size=size, slide_size=slide_size, progress=progress)
        slide_paths = {"slide": written.slide, "slide_mask": written.tumour_mask,
                       "slide_tissue_mask": written.tissue_mask, "slide_mask_json": written.mask_json}
        slide_meta = {k: v.relative_to(out).as_posix() for k, v in slide_paths.items()}
        slide_meta["slide_levels"] = [list(d) for d in written.level_dimensions]
        files.extend(slide_paths.values())
    info = out / "synth.json"
    options = asdict(cfg)
    options["split_fractions"] = list(cfg.split_fractions)
    doc = {
        "generator": "patchserve synth",
        "options": options,
        "class_names": list(names),
        # The resolution the patches stand for: the synthetic slide's level 0 at this patch size.
        "patch_mpp": PATCH_MPP,
        "counts": counts,
        "stain_shift": {SHIFTED_SPLIT: SHIFTED_STAIN, **{s: 0.0 for s in SPLITS}},
        "mislabelled": flipped,
        "manifest": manifest.relative_to(out).as_posix(),
        "hdf5": {s: [p.relative_to(out).as_posix() for p in xy] for s, xy in hdf5.items()},
        **slide_meta,
    }
    info.write_text(json.dumps(doc, indent=2) + "\n")  # last: its presence means the set is complete
    files.append(info)
    return SynthSummary(out=out, class_names=names, counts=counts, manifest=manifest, hdf5=hdf5, info=info,
                        files=tuple(files), **slide_paths)
