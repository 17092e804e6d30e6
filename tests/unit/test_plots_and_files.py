"""Readable plots (whole epochs, the best epoch marked, a heatmap legend) and files that follow the umask."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest


def _history(n: int, best: int) -> list[dict]:
    # As history.csv reads back: strings, best_epoch "so far" on each row.
    return [{"epoch": str(e), "train_loss": str(1 / e), "train_accuracy": str(1 - 0.5 / e), "val_loss": str(1.2 / e),
             "val_accuracy": str(0.6 + 0.03 * e), "test_loss": str(1.3 / e), "test_accuracy": str(0.55 + 0.03 * e),
             "balanced_accuracy": "0.5", "best_epoch": str(min(e, best))} for e in range(1, n + 1)]


def test_learning_curves_have_whole_epoch_ticks_every_series_and_the_best_epoch_marked():
    from serving.evaluation.plots import curve_prefixes, training_curves_figure

    assert curve_prefixes(list(_history(2, 1)[0])) == ["train", "val", "test"]
    fig = training_curves_figure(_history(3, 2))
    fig.canvas.draw()
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
        assert ticks == [1.0, 2.0, 3.0]  # 3 epochs: no 1.5, 2.5
        labels = ax.get_legend_handles_labels()[1]
        assert labels == ["train", "val", "test", "best epoch (2)"]
        star = [ln for ln in ax.get_lines() if ln.get_marker() == "*"]
        assert len(star) == 1 and list(star[0].get_xdata()) == [2]
    assert [ax.get_xlabel() for ax in fig.axes] == ["epoch", "epoch"]


def test_heatmap_has_a_title_band_and_a_colour_bar_from_0_to_1():
    from serving.slides.heatmap import LEGEND_BAR_H, _with_legend, colormap, legend_layout

    heat = np.full((300, 400, 3), 200, np.uint8)
    img = np.asarray(_with_legend(heat, "slide_0.tiff", "tumour"))
    _, title_h, legend_h = legend_layout(400)
    assert img.shape == (title_h + 300 + legend_h, 400, 3)
    np.testing.assert_array_equal(img[title_h:title_h + 300], heat)
    assert (img[:title_h] < 128).any()  # the title's text
    bar = img[title_h + 300 + 6 + LEGEND_BAR_H // 2]
    lo, hi = colormap(np.array([0.0]))[0], colormap(np.array([1.0]))[0]
    first, last = np.flatnonzero((bar == lo).all(1))[0], np.flatnonzero((bar == hi).all(1))[-1]
    assert first < last  # 0 on the left, 1 on the right


@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_heatmap_blends_each_scored_cell_over_the_thumbnail_and_keeps_the_rest(tmp_path, alpha):
    from types import SimpleNamespace

    from PIL import Image

    from serving.slides.heatmap import BLEND_ROWS, colormap, legend_layout, write_heatmap

    rng = np.random.default_rng(1)
    # 20 x 25 cells of 8 x 8 thumbnail pixels: a picture taller than two bands of blended rows.
    grid = SimpleNamespace(rows=20, cols=25, stride0=(64, 64), dims0=(1600, 1280), path="s.tiff")
    thumb = rng.integers(0, 256, (160, 200, 3), dtype=np.uint8)
    assert thumb.shape[0] > 2 * BLEND_ROWS
    rows = [{"row": r, "col": c, "prob_t": float(rng.random())} for r in range(20) for c in range(25)
            if rng.random() < 0.6]
    path = write_heatmap(grid, thumb, rows, "t", tmp_path / "h.png", alpha=alpha)
    title_h = legend_layout(200)[1]
    got = np.asarray(Image.open(path).convert("RGB"))[title_h:title_h + 160, :200]
    expected = thumb.astype(np.float64)
    for r in rows:
        cell = np.s_[r["row"] * 8:(r["row"] + 1) * 8, r["col"] * 8:(r["col"] + 1) * 8]
        expected[cell] = thumb[cell] * (1 - alpha) + colormap(np.array([r["prob_t"]]))[0] * alpha
    np.testing.assert_array_equal(got, np.round(expected).astype(np.uint8))


def _tile_features(grid, rows, class_names) -> dict:
    """The GeoJSON document the slide's tiles make, as nested dicts: what write_geojson's text must be."""
    from serving.slides.heatmap import _CLASS_COLOURS

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



def test_geojson_text_is_what_json_dumps_writes_of_the_features(tmp_path):
    """The GeoJSON is written as text a feature at a time; it must be, byte for byte, the document of
    ``_tile_features``: edge tiles clipped to the slide, a NaN probability, a class outside the model's
    (grey), names JSON must escape."""
    import json
    from types import SimpleNamespace

    from serving.slides.heatmap import write_geojson

    grid = SimpleNamespace(tile_size0=(96.0, 96.0), dims0=(1000, 700))
    classes = ["normal", 'tum"our', "stroma\\ü"]
    rng = np.random.default_rng(3)
    rows = []
    for i, (x, y) in enumerate([(0, 0), (960, 0), (0, 672), (960, 672), (480, 96), (288, 384)]):
        probs = rng.dirichlet(np.ones(3))
        predicted = classes[int(np.argmax(probs))] if i != 4 else "unknown"
        rows.append({"x": x, "y": y, "col": x // 96, "row": y // 96, "predicted": predicted,
                     **{f"prob_{c}": float(p) for c, p in zip(classes, probs)}})
    rows[5]["prob_normal"] = float("nan")
    path = write_geojson(grid, rows, classes, tmp_path / "s.geojson")
    assert path.read_text(encoding="utf-8") == json.dumps(_tile_features(grid, rows, classes))
    doc = json.loads(path.read_text(encoding="utf-8"), parse_constant=lambda c: c)
    assert doc["features"][1]["geometry"]["coordinates"][0][1] == [1000.0, 0.0]  # clipped to the slide
    assert doc["features"][4]["properties"]["classification"]["color"] == [128, 128, 128]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_atomic_files_follow_the_umask(tmp_path, umask, mode):
    from serving.core.atomic import atomic_write_text

    old = os.umask(umask)
    try:
        path = atomic_write_text(tmp_path / "f.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temporary file left


def test_demo_prints_test_and_shifted_metrics_side_by_side():
    from patchserve.demo import side_by_side

    text = side_by_side({"accuracy": 0.9, "auc": 0.95}, {"accuracy": 0.7, "auc": 0.8})
    assert text.splitlines() == ["    metric                  test  test_shifted",
                                 "    accuracy               0.900         0.700",
                                 "    auc                    0.950         0.800"]


def test_score_accepts_any_split_folder_name_but_not_a_path():
    from serving.core.errors import InputError
    from serving.jobs.engine import ScoreConfig

    assert ScoreConfig(inputs=("d",), urls=("localhost:1",), model="m", out="o.parquet",
                       split="test_shifted").split == "test_shifted"
    with pytest.raises(InputError, match="--split: expected the name of a split folder"):
        ScoreConfig(inputs=("d",), urls=("localhost:1",), model="m", out="o.parquet", split="../x")
