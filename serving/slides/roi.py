"""Regions of interest from QuPath: GeoJSON polygons in level-0 pixels, and the tiles inside them.

QuPath's "Export objects as GeoJSON" writes a FeatureCollection (older
versions: a bare list of Features) whose Polygon and MultiPolygon geometries
are in level-0 pixel coordinates, the same frame as a slide grid's tiles. A
tile is in the region when its centre is: inside a polygon's outer ring and
outside its holes (even-odd rule), in any of the polygons.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from serving.core.errors import InputError
from serving.slides.tiling import SlideGrid

Polygon = list[np.ndarray]  # rings: the outer one first, then holes; each (N, 2) float64 x, y


def _geometries(doc, where: str) -> list[dict]:
    if isinstance(doc, list):
        return [g for d in doc for g in _geometries(d, where)]
    if not isinstance(doc, dict):
        raise InputError(f"{where}: expected a GeoJSON object or a list of Features, got {type(doc).__name__}")
    kind = doc.get("type")
    if kind == "FeatureCollection":
        return _geometries(doc.get("features", []), where)
    if kind == "Feature":
        return [doc["geometry"]] if doc.get("geometry") else []
    if kind == "GeometryCollection":
        return [g for d in doc.get("geometries", []) for g in _geometries(d, where)]
    return [doc]


def _ring(coords, where: str) -> np.ndarray:
    ring = np.asarray(coords, np.float64)
    if ring.ndim != 2 or ring.shape[0] < 3 or ring.shape[1] < 2:
        raise InputError(f"{where}: a polygon ring needs at least 3 [x, y] points")
    return ring[:, :2]


def load_roi(path: str | Path) -> list[Polygon]:
    """The polygons of a GeoJSON file (Polygon and MultiPolygon geometries; points and lines are ignored)."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except OSError as exc:
        raise InputError(f"ROI {p}: cannot read it ({exc})") from exc
    except ValueError as exc:
        raise InputError(f"ROI {p}: not valid JSON ({exc})") from exc
    polygons: list[Polygon] = []
    try:
        for g in _geometries(doc, f"ROI {p}"):
            if g.get("type") == "Polygon":
                polygons.append([_ring(r, f"ROI {p}") for r in g["coordinates"]])
            elif g.get("type") == "MultiPolygon":
                polygons.extend([_ring(r, f"ROI {p}") for r in poly] for poly in g["coordinates"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"ROI {p}: malformed GeoJSON geometry ({exc})") from exc
    polygons = [poly for poly in polygons if poly]
    if not polygons:
        raise InputError(f"ROI {p}: no Polygon or MultiPolygon geometry; export the annotations from QuPath "
                         "as GeoJSON")
    return polygons


def _in_ring(points: np.ndarray, ring: np.ndarray) -> np.ndarray:
    """Ray casting towards +x: a point is inside when it crosses an odd number of edges."""
    x, y = points[:, 0:1], points[:, 1:2]
    x0, y0 = ring[:, 0], ring[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    straddles = (y0 > y) != (y1 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_cross = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
    return (straddles & (x < x_cross)).sum(axis=1) % 2 == 1


def points_in_roi(points_xy: np.ndarray, polygons: list[Polygon]) -> np.ndarray:
    """Bool per (x, y) point: inside some polygon's outer ring and outside its holes."""
    pts = np.asarray(points_xy, np.float64).reshape(-1, 2)
    inside = np.zeros(len(pts), bool)
    for rings in polygons:
        here = _in_ring(pts, rings[0])
        for hole in rings[1:]:
            here &= ~_in_ring(pts, hole)
        inside |= here
    return inside


def restrict_grid(grid: SlideGrid, polygons: list[Polygon]) -> SlideGrid:
    """The grid with only the tiles whose centre lies in the region of interest."""
    tw0, th0 = grid.tile_size0
    centres = np.array([[t.x + tw0 / 2, t.y + th0 / 2] for t in grid.tiles], np.float64).reshape(-1, 2)
    keep = points_in_roi(centres, polygons)
    return dataclasses.replace(grid, tiles=[t for t, k in zip(grid.tiles, keep) if k])
