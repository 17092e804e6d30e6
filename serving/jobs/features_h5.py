"""A scored slide's features as the HDF5 file CLAM and TRIDENT read: ``coords`` and ``features``, with attributes.

``results.parquet`` and a slide named ``case_001`` give
``results.case_001.features.h5``, written from the slide's committed parts,
one part at a time (memory follows the largest part, never the slide or the
job), atomically. The layout is the one of CLAM's ``extract_features_fp.py``
(``save_hdf5``) and TRIDENT's ``WSI.extract_patch_features`` (``save_h5``):

- ``coords``: N x 2 int64, each tile's top-left corner (x, y) in level-0 pixels;
- ``features``: N x D float32, row i the features of the tile at ``coords[i]``.

``coords`` carries the attributes their readers use: CLAM's
``Whole_Slide_Bag_FP`` reads ``patch_level`` and ``patch_size``, its stitching
``downsample``, ``level_dim``, ``downsampled_level_dim`` and ``name``; TRIDENT's
``read_coords`` users read ``patch_size``, ``level0_magnification``,
``target_magnification`` and ``overlap``, its slide encoders
``patch_size_level0``, and its coords writer adds ``level0_width``,
``level0_height`` and ``name``. ``features`` carries TRIDENT's ``name`` and
``encoder``. Magnifications follow the usual convention, 10 / (um per pixel)
(0.25 um/px is 40x). ``patch_size`` is the tile's side in the pixels the
model saw (the target resolution), which is TRIDENT's meaning and CLAM's
(pixels at ``patch_level``) whenever the slide is read at a level's own
resolution; ``patch_size_level0`` is exact in both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from serving.core.atomic import atomic_path
from serving.inputs.units import SlideWork
from serving.jobs.output import FEATURES_COLUMN
from serving.jobs.slide_outputs import slide_output

FEATURES_H5 = "features.h5"
ROWS_PER_CHUNK = 256  # HDF5 chunk rows: a slide's features are read whole or in runs of tiles


def features_h5_path(out: Path, name: str) -> Path:
    """``OUT`` + slide name + ``features.h5``."""
    return slide_output(out, name, FEATURES_H5)


def magnification(mpp: float) -> float:
    """The objective magnification conventionally said of ``mpp`` um per pixel (10 / mpp: 0.25 -> 40x)."""
    return round(10.0 / mpp, 4)


def _levels(path: str, read_level: int) -> tuple[tuple[float, float], tuple[int, int]] | None:
    """The read level's downsample (x, y) and dimensions, or None when the slide cannot say."""
    from serving.slides.wsi import open_slide

    try:
        slide = open_slide(path)
    except Exception:  # noqa: BLE001 - the attributes that need it are left out, the others written
        return None
    try:
        ds = float(slide.level_downsamples[read_level])
        return (ds, ds), tuple(int(v) for v in slide.level_dimensions[read_level])
    except (AttributeError, IndexError):
        return None
    finally:
        slide.close()


def coords_attributes(work: SlideWork, model: str) -> dict:
    """The ``coords`` attributes of CLAM's and TRIDENT's readers, from the slide's tiling."""
    g = work.grid
    w0, h0 = (int(v) for v in g.dims0)
    attrs = {"patch_size": int(g.patch_hw[1]), "patch_level": int(g.read_level),
             "patch_size_level0": int(round(g.tile_size0[0])), "level0_magnification": magnification(g.mpp0),
             "target_magnification": magnification(g.target_mpp), "overlap": int(g.patch_hw[1] - g.stride_hw[1]),
             "name": work.info["name"], "level0_width": w0, "level0_height": h0,
             # patchserve's own, exact: what the tiles were read at.
             "mpp0": float(g.mpp0), "target_mpp": float(g.target_mpp), "stride": int(g.stride_hw[1]),
             "model": model}
    levels = _levels(g.path, g.read_level)
    if levels is not None:
        ds, dims = levels
        attrs.update(downsample=np.array(ds), level_dim=np.array(dims), downsampled_level_dim=np.array(dims))
    return attrs


def write_features_h5(job, work: SlideWork, parts: Sequence[tuple[Path, object]]) -> Path:
    """The slide's HDF5 of coords and features, from its committed parts (in item order), one part at a time."""
    import h5py
    import pyarrow.parquet as pq

    spec = job.spec
    d = spec.feature_size
    n = sum(meta.rows for _, meta in parts)
    path = features_h5_path(job.out, work.info["name"])
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            chunk = max(1, min(n, ROWS_PER_CHUNK))
            # maxshape None: CLAM's save_hdf5 appends to them; chunked, so can any reader that does the same.
            coords = f.create_dataset("coords", (n, 2), np.int64, chunks=(chunk, 2), maxshape=(None, 2))
            feats = f.create_dataset("features", (n, d), np.float32, chunks=(chunk, d), maxshape=(None, d))
            at = 0
            for part, _meta in parts:
                t = pq.read_table(part, columns=["x", "y", FEATURES_COLUMN])
                k = t.num_rows
                coords[at:at + k] = np.stack([t.column("x").to_numpy(), t.column("y").to_numpy()], axis=1)
                feats[at:at + k] = t.column(FEATURES_COLUMN).combine_chunks().flatten().to_numpy().reshape(k, d)
                at += k
            for key, value in coords_attributes(work, job.cfg.model).items():
                coords.attrs[key] = value
            feats.attrs.update({"name": work.info["name"], "encoder": job.cfg.model,
                                "feature_layer": spec.feature_layer, "model_version": int(spec.version),
                                "weights_sha256": job.served.weights_sha256})
    return path
