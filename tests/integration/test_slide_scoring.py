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
    from serving.slides.tiling import TilingConfig, plan_tiles
    from tests.unit.test_slides import near_tissue

    _, slide, rows = scored_slide
    tissue, _, ds = _masks(synth_slide)
    size = triton_server.spec.input_height
    grid = plan_tiles(slide, triton_server.spec.input_hw, TilingConfig(stride=64))
    assert len(rows) > 100
    assert _at_centres(near_tissue(tissue, ds, grid), ds, rows, size).all()  # on tissue, or within its margin
    assert _at_centres(tissue, ds, rows, size).mean() > 0.8
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


def _levels_of(slide_path):
    slide = open_slide(slide_path)
    try:
        return [np.asarray(slide.read_region((0, 0), k, slide.level_dimensions[k]).convert("RGB"))
                for k in range(slide.level_count)]
    finally:
        slide.close()


def test_slides_of_one_file_name_in_two_folders_keep_both_outputs(triton_server, synth_slide, tmp_path):
    import shutil

    slide = synth_slide / "slides" / "slide_0.tiff"
    for site in ("site_a", "site_b"):
        (tmp_path / site).mkdir()
        shutil.copy(slide, tmp_path / site / "case_001.tiff")
    manifest = tmp_path / "slides.csv"
    manifest.write_text("slide\nsite_a/case_001.tiff\nsite_b/case_001.tiff\n")
    out = tmp_path / "r.parquet"
    assert cli(["score", str(manifest), "--url", triton_server.grpc, "--model", triton_server.spec.name,
                "--out", str(out), "--stride", "96", "--no-progress"]) == 0
    rows = read_results(out)
    assert {r["slide"] for r in rows} == {"site_a__case_001", "site_b__case_001"}
    for name in ("site_a__case_001", "site_b__case_001"):
        for what in ("heatmap.png", "geojson", "tissue_mask.png", "tissue.png"):
            assert (tmp_path / f"r.{name}.{what}").stat().st_size > 0
    n = sum(r["slide"] == "site_a__case_001" for r in rows)
    assert n == sum(r["slide"] == "site_b__case_001" for r in rows) > 0  # the same pixels, both kept


def test_a_model_trained_at_half_a_micron_reads_a_quarter_micron_slide_at_half_a_micron(mpp_server, synth_slide,
                                                                                      tmp_path, capsys):
    from serving.synth.slide import write_pyramid_tiff

    fine = tmp_path / "fine.tiff"
    write_pyramid_tiff(fine, _levels_of(synth_slide / "slides" / "slide_0.tiff"), 0.25)
    out = tmp_path / "r.parquet"
    args = ["score", str(fine), "--url", mpp_server.grpc, "--model", mpp_server.spec.name, "--no-progress"]
    assert cli([*args, "--out", str(out)]) == 0
    assert "slides: read at 0.5 um/px, the resolution the model was trained at (its spec)" in capsys.readouterr().out
    (slide,) = json.loads((tmp_path / "r.parquet.job.json").read_text())["slides"]
    assert (slide["mpp0"], slide["target_mpp"], slide["scale"], slide["read_level"], slide["mpp_from"]) == \
        (0.25, 0.5, 2.0, 0, "the model's spec")
    rows = read_results(out)
    assert all(r["x"] % 64 == 0 and r["y"] % 64 == 0 for r in rows)  # 32-px tiles of 0.5 um/px: 64 level-0 px
    # --mpp-target still overrides, and says so.
    assert cli([*args, "--out", str(tmp_path / "q.parquet"), "--mpp-target", "0.25"]) == 0
    assert "slides: read at 0.25 um/px, --mpp-target (the model was trained at 0.5 um/px)" in capsys.readouterr().out
    (slide,) = json.loads((tmp_path / "q.parquet.job.json").read_text())["slides"]
    assert (slide["target_mpp"], slide["scale"]) == (0.25, 1.0)
    # A slide coarser than the model's resolution is that slide's error, recorded; the job goes on.
    coarse = tmp_path / "coarse.tiff"
    write_pyramid_tiff(coarse, _levels_of(synth_slide / "slides" / "slide_0.tiff")[1:], 2.0)
    capsys.readouterr()
    assert cli([*args[:1], str(coarse), *args[2:], "--out", str(tmp_path / "c2.parquet")]) == 0
    errors = (tmp_path / "c2.parquet.errors.csv").read_text()
    assert "the model was trained at 0.5 um/px (the model's spec), but" in errors and "pass --mpp-target" in errors


def test_a_slide_whose_levels_disagree_on_its_resolution_is_recorded_and_the_job_goes_on(triton_server, synth_slide,
                                                                                        tmp_path):
    import tifffile

    levels = _levels_of(synth_slide / "slides" / "slide_0.tiff")
    odd = tmp_path / "odd.tiff"
    with tifffile.TiffWriter(odd) as tif:
        for k, (img, mpp) in enumerate(zip(levels, (0.5, 1.0, 8.0))):  # level 1 is 4x smaller: 2.0 um/px, says 1.0
            tif.write(img, photometric="rgb", tile=(256, 256), subfiletype=1 if k else 0,
                      resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    out = tmp_path / "r.parquet"
    assert cli(["score", str(odd), str(synth_slide / "slides" / "slide_0.tiff"), "--url", triton_server.grpc,
                "--model", triton_server.spec.name, "--out", str(out), "--stride", "96", "--no-progress"]) == 0
    (line,) = (tmp_path / "r.parquet.errors.csv").read_text().splitlines()[1:]
    assert line.startswith(f"{odd},") and "its pyramid levels disagree on the resolution: the 512-px-wide level " \
                                         "records 1 um/px, level 0 (2048 px at 0.5 um/px) makes it 2" in line
    assert {r["slide"] for r in read_results(out)} == {"slide_0"}
