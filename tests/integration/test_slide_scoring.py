"""Whole-slide scoring against the real server: tissue only, coordinates, heatmaps, GeoJSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from patchserve.cli import main as cli
from serving.slides.heatmap import LEGEND_BAR_H, colormap, legend_layout, probability_grid
from serving.jobs.output import read_results
from serving.slides.wsi import open_slide

ATOL = 1e-5


def _masks(synth_slide):
    meta = json.loads((synth_slide / "slides" / "slide_0_mask.json").read_text())
    load = lambda name: np.asarray(Image.open(synth_slide / "slides" / meta[name])) > 0  # noqa: E731
    return load("tissue_mask"), load("tumour_mask"), meta["mask_downsample"]


def _at_centres(mask, ds, rows, size):
    return np.array([mask[(r["y"] + size // 2) // ds, (r["x"] + size // 2) // ds] for r in rows])


@pytest.fixture(scope="module")
def scored_slide(triton_server, synth_slide, tmp_path_factory):
    out = tmp_path_factory.mktemp("slide_scores") / "slides.parquet"
    slide = synth_slide / "slides" / "slide_0.tiff"
    code = cli(["score", str(slide), "--url", triton_server.grpc, "--model", triton_server.spec.name,
                "--out", str(out), "--stride", "64", "--min-tissue", "0.5", "--no-progress"])
    assert code == 0
    return out, slide, read_results(out)


def test_slide_tiles_lie_on_tissue_only(scored_slide, synth_slide, triton_server):
    _, _, rows = scored_slide
    tissue, _, ds = _masks(synth_slide)
    size = triton_server.spec.input_height
    assert len(rows) > 100
    assert _at_centres(tissue, ds, rows, size).all()
    assert all((r["x"], r["y"]) == (r["col"] * 64, r["row"] * 64) for r in rows)


def test_slide_rows_map_back_to_the_pixels_that_were_scored(scored_slide, triton_server, ort_reference):
    _, slide_path, rows = scored_slide
    spec = triton_server.spec
    h, w = spec.input_hw
    picked = rows[:: max(1, len(rows) // 12)]
    slide = open_slide(slide_path)
    try:
        tiles = np.stack([np.asarray(slide.read_region((r["x"], r["y"]), 0, (w, h)).convert("RGB")) for r in picked])
    finally:
        slide.close()
    got = np.array([[r[f"prob_{c}"] for c in spec.class_names] for r in picked])
    np.testing.assert_allclose(got, ort_reference.probs(tiles), atol=ATOL)


def test_slide_heatmap_and_geojson_are_written_from_the_grid(scored_slide, triton_server):
    out, _, rows = scored_slide
    spec = triton_server.spec
    heat = out.with_name("slides.slide_0.heatmap.png")
    _, title_h, legend_h = legend_layout(1024)
    with Image.open(heat) as im:
        # The thumbnail of the 2048x1536 slide, capped to HEATMAP_MAX_SIDE on its long side,
        # between a title band (slide, class) and a colour bar.
        assert im.size == (1024, title_h + 768 + legend_h)
        bar_row = np.asarray(im.convert("RGB"))[title_h + 768 + 6 + LEGEND_BAR_H // 2]
    # The colour bar runs from the colour of 0 to the colour of 1.
    assert (bar_row == colormap(np.array([0.0]))[0]).all(axis=1).any()
    assert (bar_row == colormap(np.array([1.0]))[0]).all(axis=1).any()
    geo = json.loads(out.with_name("slides.slide_0.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == len(rows)
    f, r = geo["features"][0], rows[0]
    x, y = r["x"], r["y"]
    h, w = spec.input_hw
    assert f["geometry"]["coordinates"] == [[[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]]
    assert f["properties"]["classification"]["name"] == r["predicted"]
    assert f["properties"]["measurements"][f"prob_{spec.class_names[-1]}"] == pytest.approx(r[f"prob_{spec.class_names[-1]}"])


@pytest.fixture(scope="module")
def trained_server(trained_run, tmp_path_factory):
    from export.build import export_run
    from serving.server.embedded import EmbeddedTriton

    repo = tmp_path_factory.mktemp("trained_repo") / "repo"
    result = export_run(trained_run, repo, formats=("python",), with_tta=False, with_dali=False)
    with EmbeddedTriton(repo) as server:
        yield server, result.spec


def test_trained_model_heatmap_is_high_inside_the_tumour_mask(trained_server, synth_slide, tmp_path):
    server, spec = trained_server
    out = tmp_path / "trained.parquet"
    code = cli(["score", str(synth_slide / "slides" / "slide_0.tiff"), "--url", server.urls.grpc, "--model", spec.name,
                "--out", str(out), "--heatmap-class", spec.class_names[-1], "--no-progress"])
    assert code == 0
    rows = read_results(out)
    tissue, tumour, ds = _masks(synth_slide)
    inside = _at_centres(tumour, ds, rows, spec.input_height)
    prob = np.array([r["prob_tumour"] for r in rows])
    print(f"tiles {len(rows)}, inside {inside.sum()}, mean tumour prob inside {prob[inside].mean():.3f}, "
          f"outside {prob[~inside].mean():.3f}")
    assert inside.sum() > 20 and (~inside).sum() > 20
    assert prob[inside].mean() > prob[~inside].mean() + 0.3
    # The heatmap grid holds the same numbers at the tiles' grid positions.
    from serving.slides.tiling import TilingConfig, plan_tiles

    grid = plan_tiles(synth_slide / "slides" / "slide_0.tiff", spec.input_hw, TilingConfig())
    values = probability_grid(grid, rows, "prob_tumour")
    assert np.count_nonzero(~np.isnan(values)) == len(rows)
    assert values[rows[0]["row"], rows[0]["col"]] == pytest.approx(rows[0]["prob_tumour"])
