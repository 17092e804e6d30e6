"""Per-slide outputs: a probability heatmap over the thumbnail, and GeoJSON tiles for QuPath."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from serving.atomic import atomic_path, atomic_write_text
from serving.slides import SlideGrid

# Blue (0) -> cyan -> yellow -> red (1): readable over pink tissue, no matplotlib needed.
_ANCHORS = np.array([[0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0]], np.float64)
# The heatmap is drawn over a thumbnail of at most this many pixels along
# its long side: enough to see tiles, and at 2048 the PNG encode alone took
# longer than scoring a small slide (benchmarks/bench_slide.py).
HEATMAP_MAX_SIDE = 1024
# Class colours for QuPath (cycled when there are more classes).
_CLASS_COLOURS = ((64, 160, 64), (200, 0, 0), (0, 90, 200), (220, 140, 0), (150, 0, 150), (0, 160, 160))


def colormap(values: np.ndarray) -> np.ndarray:
    """Map probabilities in [0, 1] to uint8 RGB."""
    v = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * (len(_ANCHORS) - 1)
    lo = np.minimum(v.astype(int), len(_ANCHORS) - 2)
    t = (v - lo)[..., None]
    return np.round(_ANCHORS[lo] * (1 - t) + _ANCHORS[lo + 1] * t).astype(np.uint8)


def probability_grid(grid: SlideGrid, rows: Sequence[dict], column: str) -> np.ndarray:
    """rows x cols array of ``column`` from scored rows (NaN where no tile was scored)."""
    out = np.full((grid.rows, grid.cols), np.nan, np.float64)
    for r in rows:
        out[r["row"], r["col"]] = r[column]
    return out


def write_heatmap(grid: SlideGrid, thumb_rgb_u8: np.ndarray, rows: Sequence[dict], class_name: str,
                  path: str | Path, alpha: float = 0.5) -> Path:
    """The probability of ``class_name`` per tile, painted over the slide's thumbnail."""
    values = probability_grid(grid, rows, f"prob_{class_name}")
    th, tw = thumb_rgb_u8.shape[:2]
    colour = np.zeros((th, tw, 3), np.float64)
    weight = np.zeros((th, tw), np.float64)
    sx0, sy0 = grid.stride0
    kx, ky = grid.dims0[0] / tw, grid.dims0[1] / th
    rgb = colormap(values)
    # Each tile paints the stride cell it starts, so overlapping tiles do not hide each other.
    for r, c in zip(*np.nonzero(~np.isnan(values))):
        x0, y0 = int(c * sx0 / kx), int(r * sy0 / ky)
        x1, y1 = max(x0 + 1, int((c + 1) * sx0 / kx)), max(y0 + 1, int((r + 1) * sy0 / ky))
        colour[y0:y1, x0:x1] = rgb[r, c]
        weight[y0:y1, x0:x1] = alpha
    out = thumb_rgb_u8 * (1 - weight[..., None]) + colour * weight[..., None]
    path = Path(path)
    with atomic_path(path) as tmp:
        # Light compression: level 6 cost 4x the time for a file about 15% smaller.
        Image.fromarray(np.round(out).astype(np.uint8)).save(tmp, format="PNG", compress_level=2)
    return path


def tile_features(grid: SlideGrid, rows: Sequence[dict], class_names: Sequence[str]) -> dict:
    """A GeoJSON FeatureCollection of scored tiles in level-0 pixels (QuPath's coordinates)."""
    tw0, th0 = grid.tile_size0
    colours = {c: list(_CLASS_COLOURS[i % len(_CLASS_COLOURS)]) for i, c in enumerate(class_names)}
    features = []
    for r in rows:
        x0, y0 = float(r["x"]), float(r["y"])
        x1, y1 = min(x0 + tw0, grid.dims0[0]), min(y0 + th0, grid.dims0[1])
        probs = {f"prob_{c}": float(r[f"prob_{c}"]) for c in class_names}
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
            "properties": {
                "objectType": "detection",
                "classification": {"name": r["predicted"], "color": colours.get(r["predicted"], [128, 128, 128])},
                "measurements": probs,
                **probs,
                "predicted": r["predicted"],
                "col": int(r["col"]),
                "row": int(r["row"]),
            },
        })
    return {"type": "FeatureCollection", "features": features}


def write_geojson(grid: SlideGrid, rows: Sequence[dict], class_names: Sequence[str], path: str | Path) -> Path:
    return atomic_write_text(Path(path), json.dumps(tile_features(grid, rows, class_names)))
