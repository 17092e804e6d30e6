"""Finding labelled or unlabelled patches in every layout users have.

Layouts: a class-folder tree (``root/<class>/*``), the same with split
folders (``root/train/<class>``, ``root/val``, ``root/test``), a flat folder of
images, a CSV manifest (``path,label[,split]``), and PatchCamelyon HDF5 files
(``x``: N x H x W x 3 uint8, ``y``: N x 1 x 1 x 1, in one file or in sibling
``*_x.h5`` / ``*_y.h5`` files). Torch-free: training and the client share it.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serving.core.errors import InputError
from serving.core.imageio import IMAGE_SUFFIXES, is_image_file, not_a_file

SPLITS = ("train", "val", "test")
HDF5_SUFFIXES = (".h5", ".hdf5")
PCAM_CLASSES = ("normal", "tumour")  # PatchCamelyon: y == 1 means tumour tissue
# PatchCamelyon's resolution: Camelyon16 scans at 40x (0.243 um/px) undersampled to 10x (its README, "Details").
PCAM_MPP = 0.972
PCAM_NAME = "camelyonpatch_level_2_split_"  # the official files' names: camelyonpatch_level_2_split_train_x.h5
MPP_ATTRIBUTE = "mpp"  # an HDF5 file's attribute: microns per pixel of its patches (patchserve synth writes it)


@dataclass(frozen=True)
class Sample:
    """One patch: a file path, or ``file.h5#index`` for an HDF5 row."""

    source: str
    label: int | None = None


@dataclass
class Dataset:
    kind: str  # "folder", "images", "manifest" or "hdf5"
    root: Path
    classes: tuple[str, ...] | None
    samples: list[Sample]
    bad_rows: list[tuple[str, str]] = field(default_factory=list)  # (where, why)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, why): entries that are no readable file

    @property
    def labelled(self) -> bool:
        return self.classes is not None and all(s.label is not None for s in self.samples)

    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.int64)


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _walk_images(folder: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """Image files under ``folder`` (links followed, each real folder once), and (path, why) of what looks like
    an image but cannot be read: symlink loops, dangling links, FIFOs, files or folders without permission."""
    import os

    found: list[Path] = []
    bad: list[tuple[str, str]] = []
    seen: set[tuple[int, int]] = set()

    def onerror(exc: OSError) -> None:
        bad.append((str(exc.filename), f"cannot list this folder ({exc.strerror})"))

    for root, dirs, files in os.walk(folder, onerror=onerror, followlinks=True):
        st = os.stat(root)
        if (st.st_dev, st.st_ino) in seen:  # a link back up the tree: listed once
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in dirs:
            why = not_a_file(Path(root) / name)
            if why in ("a symlink loop",) or (why or "").startswith("a dangling"):
                bad.append((str(Path(root) / name), why))
        for name in files:
            p = Path(root) / name
            if name.startswith(".") or p.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            why = not_a_file(p)
            if why is None:
                found.append(p)
            else:
                bad.append((str(p), why))
    return sorted(found), sorted(bad)


def _images_in(folder: Path) -> list[Path]:
    return _walk_images(folder)[0]


def has_splits(root: Path) -> bool:
    return root.is_dir() and (root / "train").is_dir()


def split_root(root: Path, split: str) -> Path:
    """``root/split`` if ``root`` has split folders, else ``root``."""
    return root / split if has_splits(root) else root


def read_class_folders(root: Path, classes: tuple[str, ...] | None = None) -> Dataset:
    """A class-folder tree; ``classes`` fixes the label order (else sorted folder names)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: no such folder")
    dirs = _class_dirs(root)
    if not dirs:
        raise InputError(f"{root}: expected one sub-folder per class, found none")
    found = tuple(d.name for d in dirs)
    if classes is None:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise InputError(f"{root}: class folders {unknown} are not among the model's classes {list(classes)}")
    samples: list[Sample] = []
    unreadable: list[tuple[str, str]] = []
    for d in dirs:
        files, bad = _walk_images(d)
        unreadable += bad
        if not files and not bad:
            raise InputError(f"{d}: class folder '{d.name}' holds no images ({', '.join(('.png', '.jpg', '.tif'))} ...)")
        label = classes.index(d.name)
        samples.extend(Sample(str(p), label) for p in files)
    return Dataset("folder", root, tuple(classes), samples, unreadable=unreadable)


def read_manifest(path: Path, split: str | None = None, classes: tuple[str, ...] | None = None,
                  strict: bool = True) -> Dataset:
    """A CSV manifest with a ``path`` column and optional ``label`` and ``split``.

    Relative paths are relative to the CSV's folder. A malformed row raises
    (``strict``) or is recorded in ``bad_rows`` with its line number.
    """
    path = Path(path)
    try:
        fh = open(path, newline="")
    except OSError as exc:
        raise InputError(f"{path}: cannot read manifest ({exc.strerror})") from exc
    with fh:
        reader = csv.DictReader(fh)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        if "path" not in cols:
            raise InputError(f"{path}: manifest needs a 'path' column (header 'path,label[,split]'), got {cols}")
        rows = []
        bad: list[tuple[str, str]] = []
        for lineno, row in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() if isinstance(v, str) else v for k, v in row.items()}
            if None in row or "" in row and row[""]:
                bad.append((f"{path}:{lineno}", "more fields than the header"))
                continue
            if not row.get("path"):
                bad.append((f"{path}:{lineno}", "empty path"))
                continue
            if split is not None and "split" in cols and row.get("split") != split:
                continue
            rows.append((lineno, row))
    labelled = "label" in cols
    if labelled:
        names = classes or tuple(sorted({r["label"] for _, r in rows if r.get("label")}))
    else:
        names = None
    _refuse_duplicates(path, rows)
    if labelled and classes is not None:
        given = sorted({r.get("label", "") for _, r in rows} - {""})
        if given and not set(given) & set(classes):
            raise InputError(f"{path}: no label of the manifest is one of the model's classes {list(classes)}; "
                             f"it has {given[:10]}{' ...' if len(given) > 10 else ''} (wrong manifest or model?)")
    samples = []
    for lineno, row in rows:
        p = Path(row["path"])
        p = p if p.is_absolute() else path.parent / p
        label = None
        if labelled:
            lab = row.get("label", "")
            if lab not in names:
                bad.append((f"{path}:{lineno}", f"label {lab!r} is not one of {list(names)}"))
                continue
            label = names.index(lab)
        samples.append(Sample(str(p), label))
    if bad and strict:
        where, why = bad[0]
        raise InputError(f"{where}: malformed manifest row: {why} ({len(bad)} bad rows in all)")
    if not samples:
        raise InputError(f"{path}: manifest lists no samples" + (f" for split {split!r}" if split else ""))
    return Dataset("manifest", path, names, samples, bad)


def _refuse_duplicates(path: Path, rows: list[tuple[int, dict]]) -> None:
    """A path listed twice would be scored twice and counted twice in the metrics: refuse, listing them."""
    seen: dict[str, list[int]] = {}
    for lineno, row in rows:
        p = Path(row["path"])
        key = str((p if p.is_absolute() else path.parent / p).resolve())
        seen.setdefault(key, []).append(lineno)
    dupes = [(k, lines) for k, lines in seen.items() if len(lines) > 1]
    if dupes:
        shown = "; ".join(f"{k} (lines {', '.join(map(str, lines))})" for k, lines in dupes[:10])
        more = f"; and {len(dupes) - 10} more" if len(dupes) > 10 else ""
        raise InputError(f"{path}: {len(dupes)} paths are listed more than once: {shown}{more}. "
                         "List each patch once")


def _pcam_pair(path: Path) -> tuple[Path, Path | None]:
    """The x file and (if any) the y file of a PCam-style set."""
    stem = path.name
    for sx, sy in (("_x.h5", "_y.h5"), ("_x.hdf5", "_y.hdf5")):
        if stem.endswith(sx):
            y = path.with_name(stem[: -len(sx)] + sy)
            return path, (y if y.exists() else None)
    return path, path


def _check_x(fx, xpath: Path):
    import h5py

    if "x" not in fx:
        raise InputError(f"{xpath}: HDF5 file has no dataset 'x' (keys: {list(fx.keys())})")
    x = fx["x"]
    if not isinstance(x, h5py.Dataset):
        raise InputError(f"{xpath}: 'x' is a {type(x).__name__}, expected a dataset of N x H x W x 3 uint8 images")
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
        raise InputError(f"{xpath}: dataset 'x' must be N x H x W x 3 uint8, got {x.shape} {x.dtype}")
    if x.shape[1] < 1 or x.shape[2] < 1:
        raise InputError(f"{xpath}: dataset 'x' holds empty images of {x.shape[1]}x{x.shape[2]} pixels")
    return x


def _read_y(fy, ypath: Path, n: int) -> np.ndarray | None:
    """Labels of dataset ``y`` as int64: integral values only (a PCam label of 0.7 is refused)."""
    import h5py

    if "y" not in fy:
        return None
    y = fy["y"]
    if not isinstance(y, h5py.Dataset):
        raise InputError(f"{ypath}: 'y' is a {type(y).__name__}, expected a dataset of N labels")
    if y.dtype.kind not in "biuf":
        raise InputError(f"{ypath}: dataset 'y' must hold integer labels, got dtype {y.dtype}")
    values = np.asarray(y).reshape(-1)
    if values.shape[0] != n:
        raise InputError(f"{ypath}: dataset 'y' has {values.shape[0]} labels for {n} images in 'x'")
    if values.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)))
        if bad.size:
            raise InputError(f"{ypath}: dataset 'y' must hold integer labels; row {int(bad[0])} is "
                             f"{values[bad[0]]!r} ({bad.size} non-integral labels)")
    return values.astype(np.int64)


def read_hdf5(path: Path, classes: tuple[str, ...] | None = None) -> Dataset:
    """A PatchCamelyon HDF5 file (``x`` and maybe ``y``, or an ``_x``/``_y`` pair), validated.

    ``x`` must be a dataset of N x H x W x 3 uint8; ``y`` (if any) N integral
    labels within the classes. Errors name the file and the dataset.
    """
    import h5py

    path = Path(path)
    xpath, ypath = _pcam_pair(path)
    try:
        with h5py.File(xpath, "r") as fx:
            n = _check_x(fx, xpath).shape[0]
            stored = fx.attrs.get("class_names")
            labels = None
            if ypath is not None:
                try:
                    fy = fx if ypath == xpath else h5py.File(ypath, "r")
                except OSError as exc:
                    raise InputError(f"{ypath}: not a readable HDF5 file ({exc})") from exc
                try:
                    labels = _read_y(fy, ypath, n)
                finally:
                    if fy is not fx:
                        fy.close()
    except OSError as exc:
        raise InputError(f"{path}: not a readable HDF5 file ({exc})") from exc
    if classes is None:
        classes = tuple(str(c.decode() if isinstance(c, bytes) else c) for c in stored) if stored is not None else PCAM_CLASSES
    if labels is not None and (labels.min(initial=0) < 0 or labels.max(initial=0) >= len(classes)):
        bad = int(np.flatnonzero((labels < 0) | (labels >= len(classes)))[0])
        raise InputError(f"{ypath}: labels in dataset 'y' must be in 0..{len(classes) - 1} for classes "
                         f"{list(classes)}; row {bad} is {int(labels[bad])}")
    samples = [Sample(f"{xpath}#{i}", None if labels is None else int(labels[i])) for i in range(n)]
    return Dataset("hdf5", xpath, classes, samples)


def discover(path: str | Path, split: str | None = None, classes: tuple[str, ...] | None = None,
             strict: bool = True) -> Dataset:
    """Read any supported layout. ``split`` picks ``train``/``val``/``test`` where the layout has splits."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    if p.is_file():
        if p.suffix.lower() == ".csv":
            return read_manifest(p, split=split, classes=classes, strict=strict)
        if p.suffix.lower() in HDF5_SUFFIXES:
            return read_hdf5(p, classes=classes)
        raise InputError(f"{p}: expected a folder, a .csv manifest or a .h5 file")
    if split is not None and has_splits(p):
        if not (p / split).is_dir():
            raise InputError(f"{p}: has split folders but no '{split}' folder")
        return read_class_folders(p / split, classes)
    if has_splits(p):
        # Scoring train/ silently when the user meant test/ gives plausible, wrong numbers.
        names = ", ".join(d.name for d in _class_dirs(p))
        raise InputError(f"{p}: holds the splits {names}; pass --split to pick one")
    subdirs = _class_dirs(p)
    if subdirs and not any(is_image_file(f) for f in p.iterdir() if f.is_file()):
        return read_class_folders(p, classes)
    files, bad = _walk_images(p)
    if not files and not bad:
        raise InputError(f"{p}: folder holds no images and no class folders")
    return Dataset("images", p, classes, [Sample(str(f)) for f in files], unreadable=bad)


def read_hdf5_rows(xpath: str | Path, indices: np.ndarray) -> np.ndarray:
    """Rows of a PCam ``x`` dataset (h5py wants sorted indices: sort and restore)."""
    import h5py

    order = np.argsort(indices)
    with h5py.File(xpath, "r") as fx:
        rows = fx["x"][np.asarray(indices)[order]]
    out = np.empty_like(rows)
    out[order] = rows
    return out


def parse_hdf5_source(source: str) -> tuple[str, int] | None:
    """``file.h5#12`` -> (``file.h5``, 12); None for a plain path."""
    if "#" in source:
        f, _, idx = source.rpartition("#")
        if f.lower().endswith(HDF5_SUFFIXES) and idx.isdigit():
            return f, int(idx)
    return None


def recorded_mpp(path: str | Path) -> tuple[float | None, str]:
    """The microns per pixel a data set records for its patches, and where it says so (None, "" if nowhere):
    ``synth.json`` beside or above it (patchserve synth), an HDF5 file's ``mpp`` attribute, PatchCamelyon's
    own file names."""
    import json

    p = Path(path)
    if p.is_file() and p.suffix.lower() in HDF5_SUFFIXES:
        try:
            import h5py

            with h5py.File(p, "r") as f:
                value = f.attrs.get(MPP_ATTRIBUTE)
            if value is not None and float(value) > 0:
                return float(value), f"{p} (attribute {MPP_ATTRIBUTE!r})"
        except (OSError, ValueError, TypeError):
            pass
        if p.name.startswith(PCAM_NAME):
            return PCAM_MPP, f"{p.name} (PatchCamelyon: 40x scans undersampled to 10x)"
    for folder in (p if p.is_dir() else p.parent, *(p if p.is_dir() else p.parent).parents[:2]):
        info = folder / "synth.json"
        if info.is_file():
            try:
                value = json.loads(info.read_text()).get("patch_mpp")
            except (OSError, ValueError, AttributeError):
                value = None
            if value:
                return float(value), str(info)
    return None, ""
