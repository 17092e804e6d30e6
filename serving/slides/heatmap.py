"""Per-slide outputs: a probability heatmap over the thumbnail, and GeoJSON tiles for QuPath."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from serving.core.atomic import atomic_path, atomic_write_text
from serving.slides.tiling import SlideGrid

# Blue (0) -> cyan -> yellow -> red (1): readable over pink tissue, no matplotlib needed.
_ANCHORS = np.array([[0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0]], np.float64)
# The heatmap is drawn over a thumbnail of at most this many pixels along
# its long side: enough to see tiles, and at 2048 the PNG encode alone took
# longer than scoring a small slide (benchmarks/bench_slide.py).
HEATMAP_MAX_SIDE = 1024
BLEND_ROWS = 64  # rows of the heatmap blended at a time
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
                  path: str | Path, alpha: float = 0.5, title: str | None = None) -> Path:
    """The probability of ``class_name`` per tile, painted over the slide's thumbnail."""
    values = probability_grid(grid, rows, f"prob_{class_name}")
    th, tw = thumb_rgb_u8.shape[:2]
    colour = np.zeros((th, tw, 3), np.uint8)
    painted = np.zeros((th, tw), bool)
    sx0, sy0 = grid.stride0
    kx, ky = grid.dims0[0] / tw, grid.dims0[1] / th
    rgb = colormap(values)
    # Each tile paints the stride cell it starts, so overlapping tiles do not hide each other.
    for r, c in zip(*np.nonzero(~np.isnan(values))):
        x0, y0 = int(c * sx0 / kx), int(r * sy0 / ky)
        x1, y1 = max(x0 + 1, int((c + 1) * sx0 / kx)), max(y0 + 1, int((r + 1) * sy0 / ky))
        colour[y0:y1, x0:x1] = rgb[r, c]
        painted[y0:y1, x0:x1] = True
    # Blended where painted, a band of rows at a time: float64 copies of the whole picture were the scoring
    # client's peak memory.
    out = np.array(thumb_rgb_u8, np.uint8)
    for y in range(0, th, BLEND_ROWS):
        band, sel = out[y:y + BLEND_ROWS], painted[y:y + BLEND_ROWS]
        band[sel] = np.round(band[sel] * (1 - alpha) + colour[y:y + BLEND_ROWS][sel] * alpha).astype(np.uint8)
    image = _with_legend(out, title or Path(grid.path).name, class_name)
    path = Path(path)
    with atomic_path(path) as tmp:
        # Light compression: level 6 cost 4x the time for a file about 15% smaller.
        image.save(tmp, format="PNG", compress_level=2)
    return path


LEGEND_BAR_H = 14  # colour bar height in pixels
LEGEND_MIN_WIDTH = 320  # a narrow thumbnail still gets a readable bar and title


def legend_layout(width: int) -> tuple[int, int, int]:
    """(font size, title band height, colour-bar band height) for a heatmap ``width`` pixels wide."""
    size = max(11, min(18, width // 40))
    return size, size + 12, LEGEND_BAR_H + size + 16


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable when Pillow has FreeType
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def _with_legend(heat_rgb_u8: np.ndarray, slide_name: str, class_name: str) -> Image.Image:
    """The heatmap under a title (slide, class) and above a colour bar from 0 to 1 with ticks."""
    from PIL import ImageDraw

    h, w = heat_rgb_u8.shape[:2]
    size, title_h, legend_h = legend_layout(w)
    font = _font(size)
    width = max(w, LEGEND_MIN_WIDTH)
    canvas = Image.new("RGB", (width, title_h + h + legend_h), (255, 255, 255))
    canvas.paste(Image.fromarray(heat_rgb_u8), (0, title_h))
    draw = ImageDraw.Draw(canvas)
    draw.text((6, 5), f"{slide_name}: probability of {class_name}", fill=(0, 0, 0), font=font)
    bar_w = min(width - 140, 400)
    x0, y0 = 40, title_h + h + 6
    bar = colormap(np.linspace(0.0, 1.0, bar_w))[None].repeat(LEGEND_BAR_H, axis=0)
    canvas.paste(Image.fromarray(bar), (x0, y0))
    draw.rectangle((x0 - 1, y0 - 1, x0 + bar_w, y0 + LEGEND_BAR_H), outline=(0, 0, 0))
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = x0 + int(round(v * (bar_w - 1)))
        draw.line((x, y0 + LEGEND_BAR_H, x, y0 + LEGEND_BAR_H + 3), fill=(0, 0, 0))
        label = f"{v:g}"
        tw = draw.textlength(label, font=font)
        draw.text((x - tw / 2, y0 + LEGEND_BAR_H + 4), label, fill=(0, 0, 0), font=font)
    draw.text((x0 + bar_w + 8, y0), f"P({class_name})", fill=(0, 0, 0), font=font)
    return canvas


def _number(v: float) -> str:
    """A float as ``json.dumps`` writes it (NaN and the infinities included)."""
    return repr(v) if math.isfinite(v) else json.dumps(v)


def geojson_text(grid: SlideGrid, rows: Sequence[dict], class_names: Sequence[str]) -> str:
    """A GeoJSON FeatureCollection of scored tiles in level-0 pixels (QuPath's coordinates): a detection per
    tile, classified by its predicted class (in that class's colour, grey for another), its probabilities
    as measurements and properties. Written a feature at a time as text, as ``json.dumps`` would write the
    document: built as nested lists and dicts, a slide's features made the collector sweep the whole heap
    (0.07 s for 5,693 tiles, 0.3 s when a full collection fell into it, every other slide)."""
    tw0, th0 = grid.tile_size0
    w0, h0 = grid.dims0
    names = {c: json.dumps(c) for c in class_names}
    keys = [json.dumps(f"prob_{c}") for c in class_names]
    classes = {c: "{" + f'"name": {names[c]}, "color": {json.dumps(list(_CLASS_COLOURS[i % len(_CLASS_COLOURS)]))}'
               + "}" for i, c in enumerate(class_names)}
    parts = []
    for r in rows:
        x0, y0 = float(r["x"]), float(r["y"])
        x0s, y0s = _number(x0), _number(y0)
        x1s, y1s = _number(min(x0 + tw0, w0)), _number(min(y0 + th0, h0))
        probs = ", ".join(f"{k}: {_number(float(r[f'prob_{c}']))}" for k, c in zip(keys, class_names))
        predicted = r["predicted"]
        name = names.get(predicted) or json.dumps(predicted)
        classification = classes.get(predicted) or "{" + f'"name": {name}, "color": [128, 128, 128]' + "}"
        parts.append(
            '{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": '
            f"[[[{x0s}, {y0s}], [{x1s}, {y0s}], [{x1s}, {y1s}], [{x0s}, {y1s}], [{x0s}, {y0s}]]]}}, "
            f'"properties": {{"objectType": "detection", "classification": {classification}, '
            f'"measurements": {{{probs}}}, {probs}, "predicted": {name}, "col": {int(r["col"])}, '
            f'"row": {int(r["row"])}}}}}')
    return '{"type": "FeatureCollection", "features": [' + ", ".join(parts) + "]}"


def write_geojson(grid: SlideGrid, rows: Sequence[dict], class_names: Sequence[str], path: str | Path) -> Path:
    return atomic_write_text(Path(path), geojson_text(grid, rows, class_names))
