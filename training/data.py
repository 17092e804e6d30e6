"""Resolve DATA into training and validation samples, for every layout.

Layouts: split folders (``train/``, ``val/``, ``test/`` of class folders), a
single class-folder tree (validation drawn with a stratified
``--val-fraction``), a CSV manifest (``path,label[,split]``), and PCam HDF5
files (``train_x.h5`` with ``val_x.h5``/``valid_x.h5`` beside it, or a folder
holding them).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.core.errors import InputError
from serving.inputs.datasets import (HDF5_SUFFIXES, Dataset, Sample, has_splits, read_class_folders, read_hdf5,
                                     read_manifest)
from training.errors import DataError

_VAL_NAMES = ("val", "valid", "validation")
# The official PatchCamelyon files: camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5.
PCAM_PREFIX = "camelyonpatch_level_2_split_"


@dataclass(frozen=True)
class DataSplit:
    kind: str  # "splits", "folder", "manifest" or "hdf5"
    root: Path
    classes: tuple[str, ...]
    train: list[Sample]
    val: list[Sample]


def safe_model_name(text: str) -> str:
    """A Triton-safe model name derived from a folder or file name."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).replace("..", "_").lstrip("._-")[:64]
    return name or "model"


def default_model_name(data: str | Path) -> str:
    p = Path(data).resolve()
    stem = p.name if p.is_dir() else p.stem
    # "pcam/train_x.h5" or "data/manifest.csv" say little; the folder says more.
    if p.is_file() and (stem.endswith("_x") or stem in ("manifest", "labels", "train")):
        stem = p.parent.name
    return safe_model_name(stem)


def _as_data_error(fn, *args, **kwargs) -> Dataset:
    try:
        return fn(*args, **kwargs)
    except DataError:
        raise
    except InputError as exc:
        raise DataError(str(exc)) from exc


def _check_classes(classes: tuple[str, ...] | None, samples: list[Sample], where: str) -> tuple[str, ...]:
    if not classes or len(classes) < 2:
        raise DataError(f"{where}: found a single class {list(classes or ())}; a classifier needs at least two")
    counts = np.bincount([s.label for s in samples], minlength=len(classes))
    empty = [c for c, k in zip(classes, counts) if k == 0]
    if empty:
        raise DataError(f"{where}: class(es) {empty} have no training samples")
    return tuple(classes)


def stratified_split(samples: list[Sample], val_fraction: float, seed: int, where: str) -> tuple[list, list]:
    """Train/val lists with the class proportions kept (scikit-learn)."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"{where}: has no validation split; pass --val-fraction in (0, 1), got {val_fraction}")
    labels = [s.label for s in samples]
    try:
        tr, va = train_test_split(np.arange(len(samples)), test_size=val_fraction, random_state=seed,
                                  stratify=labels)
    except ValueError as exc:
        raise DataError(f"{where}: cannot split off --val-fraction {val_fraction} with every class in both "
                        f"parts ({exc})") from exc
    return [samples[i] for i in sorted(tr)], [samples[i] for i in sorted(va)]


def _manifest_has_split(path: Path) -> bool:
    with open(path, newline="") as fh:
        header = next(csv.reader(fh), [])
    return "split" in [c.strip() for c in header]


def _hdf5_file_for(root: Path, split: str, prefix: str | None = None) -> Path | None:
    """``root/{split}_x.h5`` (or the .hdf5 / ``valid`` spellings, or PatchCamelyon's own names) if present."""
    names = _VAL_NAMES if split == "val" else (split,)
    for pre in ((prefix,) if prefix is not None else ("", PCAM_PREFIX)):
        for n in names:
            for suf in HDF5_SUFFIXES:
                for f in (root / f"{pre}{n}_x{suf}", root / f"{pre}{n}{suf}"):
                    if f.is_file():
                        return f
    return None


def _hdf5_sibling(path: Path, split: str) -> Path | None:
    """The ``split`` file beside a training file: ``train_x.h5`` -> ``valid_x.h5``, same prefix."""
    m = re.match(r"(.*?)train(_x)?\.(h5|hdf5)\Z", path.name)  # \Z: a name ending in a newline is no match
    return _hdf5_file_for(path.parent, split, prefix=m.group(1)) if m else None


def resolve_training_data(data: str | Path, *, val_fraction: float = 0.2, seed: int = 0) -> DataSplit:
    """Training and validation samples of DATA; class names fixed by the training set."""
    p = Path(data)
    if not p.exists():
        raise DataError(f"DATA {p}: no such file or folder")
    if p.is_dir() and _hdf5_file_for(p, "train") is not None:
        p = _hdf5_file_for(p, "train")  # a folder of PCam files
    if p.is_file() and p.suffix.lower() in HDF5_SUFFIXES:
        train = _as_data_error(read_hdf5, p)
        if not train.labelled:
            raise DataError(f"{p}: HDF5 training data needs labels ('y' dataset or a *_y.h5 file)")
        classes = _check_classes(train.classes, train.samples, str(p))
        sib = _hdf5_sibling(p, "val")
        if sib is not None:
            val = _as_data_error(read_hdf5, sib, classes=classes).samples
            return DataSplit("hdf5", p, classes, train.samples, val)
        tr, va = stratified_split(train.samples, val_fraction, seed, str(p))
        return DataSplit("hdf5", p, classes, tr, va)
    if p.is_file() and p.suffix.lower() == ".csv":
        if _manifest_has_split(p):
            train = _as_data_error(read_manifest, p, split="train")
            classes = _check_classes(train.classes, train.samples, f"{p} (split train)")
            try:
                val = read_manifest(p, split="val", classes=classes).samples
            except InputError:
                tr, va = stratified_split(train.samples, val_fraction, seed, f"{p} (split train)")
                return DataSplit("manifest", p, classes, tr, va)
            return DataSplit("manifest", p, classes, train.samples, val)
        allrows = _as_data_error(read_manifest, p)
        if not allrows.labelled:
            raise DataError(f"{p}: training manifest needs a 'label' column")
        classes = _check_classes(allrows.classes, allrows.samples, str(p))
        tr, va = stratified_split(allrows.samples, val_fraction, seed, str(p))
        return DataSplit("manifest", p, classes, tr, va)
    if p.is_file():
        raise DataError(f"DATA {p}: expected a folder, a .csv manifest or a .h5 file")
    if has_splits(p):
        train = _as_data_error(read_class_folders, p / "train")
        classes = _check_classes(train.classes, train.samples, str(p / "train"))
        for n in _VAL_NAMES:
            if (p / n).is_dir():
                val = _as_data_error(read_class_folders, p / n, classes)
                return DataSplit("splits", p, classes, train.samples, val.samples)
        tr, va = stratified_split(train.samples, val_fraction, seed, str(p / "train"))
        return DataSplit("splits", p, classes, tr, va)
    tree = _as_data_error(read_class_folders, p)
    classes = _check_classes(tree.classes, tree.samples, str(p))
    tr, va = stratified_split(tree.samples, val_fraction, seed, str(p))
    return DataSplit("folder", p, classes, tr, va)


def resolve_eval_samples(data: str | Path, split: str, classes: tuple[str, ...]) -> list[Sample]:
    """Labelled samples of DATA's ``split`` (or all of DATA when it has no splits)."""
    p = Path(data)
    if not p.exists():
        raise DataError(f"DATA {p}: no such file or folder")
    if p.is_dir() and _hdf5_file_for(p, split) is not None:
        p = _hdf5_file_for(p, split)
    if p.is_file() and p.suffix.lower() in HDF5_SUFFIXES:
        ds = _as_data_error(read_hdf5, p, classes=classes)
    elif p.is_file() and p.suffix.lower() == ".csv":
        ds = _as_data_error(read_manifest, p, split=split if _manifest_has_split(p) else None, classes=classes)
    elif p.is_dir() and has_splits(p):
        if not (p / split).is_dir():
            raise DataError(f"{p}: has split folders but no '{split}' folder (--split)")
        ds = _as_data_error(read_class_folders, p / split, classes)
    elif p.is_dir():
        ds = _as_data_error(read_class_folders, p, classes)
    else:
        raise DataError(f"DATA {p}: expected a folder, a .csv manifest or a .h5 file")
    if not ds.labelled:
        raise DataError(f"{p}: evaluation needs labelled samples")
    return ds.samples
