"""The input registry (units, listing, slide names), slide manifests, QuPath regions of interest, without a server."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from serving.core.atomic import publish_once
from serving.jobs.dask_config import DaskConfig
from serving.core.errors import FlagError, InputError
from serving.slides.roi import load_roi, points_in_roi, restrict_grid
from serving.inputs.slide_lists import SlideEntry, is_slide_folder, is_slide_manifest, plan_slide, read_slide_manifest
from serving.slides.tiling import TilingConfig, plan_tiles
from serving.inputs.registry import plan_inputs, slide_names
from serving.inputs.units import FailedUnit, SlideUnit

SQUARE_WITH_HOLE = {"type": "Polygon", "coordinates": [[[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]],
                                                      [[40, 40], [60, 40], [60, 60], [40, 60], [40, 40]]]}


def _write_roi(path, *geometries, as_list=False):
    features = [{"type": "Feature", "geometry": g, "properties": {"objectType": "annotation"}} for g in geometries]
    path.write_text(json.dumps(features if as_list else {"type": "FeatureCollection", "features": features}))
    return path


def test_publish_once_keeps_the_first_of_two_racing_writers(tmp_path):
    part = tmp_path / "part-000000.parquet"
    with publish_once(part) as (first_tmp, first_won):
        with publish_once(part) as (second_tmp, second_won):
            second_tmp.write_bytes(b"second")
        first_tmp.write_bytes(b"first")
    assert (second_won, first_won) == ([True], [False])
    assert part.read_bytes() == b"second"
    umask = os.umask(0)
    os.umask(umask)
    assert part.stat().st_mode & 0o777 == 0o666 & ~umask  # readable by colleagues as the user's files are
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-000000.parquet"]  # no temporary left behind


def test_units_cut_datasets_in_fixed_runs_and_slides_one_each(synth_data, synth_slide):
    slide = synth_slide / "slides" / "slide_0.tiff"
    inputs = (str(synth_data / "test"), str(synth_data / "pcam" / "val_x.h5"), str(slide))
    plan = plan_inputs(inputs, unit_patches=5, classes=("normal", "tumour"))
    units = plan.units
    assert [(u.index, type(u).__name__, u.planned_items) for u in units] == [
        (0, "PatchUnit", 5), (1, "PatchUnit", 5), (2, "PatchUnit", 5), (3, "PatchUnit", 1),
        (4, "PatchUnit", 5), (5, "PatchUnit", 5), (6, "PatchUnit", 5), (7, "PatchUnit", 1), (8, "SlideUnit", None)]
    assert [u.kind for u in units[:8]] == ["folder"] * 4 + ["hdf5"] * 4
    assert units[8].entry.path == str(slide) and units[8].name == "slide_0"
    assert units[4].samples[0].source == f"{synth_data / 'pcam' / 'val_x.h5'}#0" and units[4].labelled
    assert plan_inputs(inputs, unit_patches=5, classes=("normal", "tumour")) == plan
    # The fingerprint's lines: each file once (the HDF5 file with its row count), the slide; the unit size is
    # an option of the fingerprint, not part of the listing.
    lines = plan.listing
    assert len(lines) == 16 + 1 + 1 and lines[-1].startswith(f"{slide}\t{slide.stat().st_size}\t")
    assert lines[0].split("\t")[0] == units[0].samples[0].source
    assert lines[16].split("\t")[0] == str(synth_data / "pcam" / "val_x.h5") and lines[16].split("\t")[3] == "16"
    assert plan_inputs(inputs, unit_patches=3, classes=("normal", "tumour")).listing == lines
    with pytest.raises(FlagError, match="--unit-patches: expected a positive integer, got 0"):
        plan_inputs((str(slide),), unit_patches=0)
    with pytest.raises(FlagError, match="--send encoded: only for image files; .*slide_0.tiff is a whole-slide"):
        plan_inputs((str(slide),), unit_patches=4, send="encoded")
    with pytest.raises(FlagError, match="--send encoded: only for image files; .*val_x.h5 is an HDF5 file"):
        plan_inputs((inputs[1],), unit_patches=4, send="encoded")


def test_slide_manifest_rows_resolve_paths_and_record_unusable_rows(synth_slide, tmp_path):
    slide = synth_slide / "slides" / "slide_0.tiff"
    shutil.copy(slide, tmp_path / "a.tiff")
    roi = _write_roi(tmp_path / "a.geojson", SQUARE_WITH_HOLE)
    manifest = tmp_path / "slides.csv"
    manifest.write_text("slide,roi,mpp\na.tiff,a.geojson,0.25\nmissing.tiff,,\na.tiff,,fast\na.tiff,nope.geojson,\n"
                        f"{slide},,\n")
    assert is_slide_manifest(manifest) and not is_slide_manifest(roi)
    rows = read_slide_manifest(manifest)
    assert rows[0] == SlideEntry(str(tmp_path / "a.tiff"), str(roi), 0.25, where=f"{manifest}:2")
    assert rows[1].error == f"{manifest}:3: no such slide {tmp_path / 'missing.tiff'}"
    assert rows[2].error == f"{manifest}:4: mpp must be a positive number of microns per pixel, got 'fast'"
    assert rows[3].error == f"{manifest}:5: no such ROI file {tmp_path / 'nope.geojson'}"
    assert rows[4] == SlideEntry(str(slide), where=f"{manifest}:6")
    units = plan_inputs((str(manifest),), unit_patches=8).units
    assert [type(u) for u in units] == [SlideUnit, FailedUnit, FailedUnit, FailedUnit, SlideUnit]
    assert units[1].errors == ((str(tmp_path / "missing.tiff"), rows[1].error),)
    # Two slides called a.tiff and slide_0.tiff: their own stems name their outputs.
    assert [units[0].name, units[4].name] == ["a", "slide_0"]
    bad = tmp_path / "bad.csv"
    bad.write_text("slide,stain\na.tiff,HE\n")
    with pytest.raises(InputError, match=r"bad.csv: unknown slide manifest columns \['stain'\]; expected slide"):
        read_slide_manifest(bad)


def test_a_folder_of_slides_is_listed_in_name_order(synth_slide, tmp_path):
    for name in ("b.tiff", "a.tiff"):
        shutil.copy(synth_slide / "slides" / "slide_0.tiff", tmp_path / name)
    (tmp_path / "label.png").write_bytes(b"")  # files beside the slides are left alone
    assert is_slide_folder(tmp_path) and not is_slide_folder(synth_slide)  # synth_slide has sub-folders
    units = plan_inputs((str(tmp_path),), unit_patches=8).units
    assert [u.entry.path for u in units] == [str(tmp_path / "a.tiff"), str(tmp_path / "b.tiff")]


def test_points_in_roi_follow_outer_rings_holes_and_multipolygons(tmp_path):
    far = {"type": "MultiPolygon", "coordinates": [[[[200, 200], [300, 200], [250, 300], [200, 200]]]]}
    roi = _write_roi(tmp_path / "roi.geojson", SQUARE_WITH_HOLE, far, {"type": "Point", "coordinates": [5, 5]},
                     as_list=True)
    polygons = load_roi(roi)
    assert len(polygons) == 2 and len(polygons[0]) == 2
    pts = np.array([[10, 10], [50, 50], [150, 50], [250, 250], [99, 1], [-1, 50]])
    assert points_in_roi(pts, polygons).tolist() == [True, False, False, True, True, False]


def test_bad_roi_files_name_the_file_and_what_is_expected(tmp_path):
    (tmp_path / "a.geojson").write_text("{not json")
    with pytest.raises(InputError, match=r"ROI .*a.geojson: not valid JSON"):
        load_roi(tmp_path / "a.geojson")
    _write_roi(tmp_path / "b.geojson", {"type": "Point", "coordinates": [1, 2]})
    with pytest.raises(InputError, match=r"ROI .*b.geojson: no Polygon or MultiPolygon geometry"):
        load_roi(tmp_path / "b.geojson")
    _write_roi(tmp_path / "c.geojson", {"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]})
    with pytest.raises(InputError, match=r"ROI .*c.geojson: a polygon ring needs at least 3"):
        load_roi(tmp_path / "c.geojson")


def test_roi_keeps_only_tiles_centred_inside_and_mpp_override_rescales(synth_slide, tmp_path):
    slide = synth_slide / "slides" / "slide_0.tiff"
    full = plan_tiles(slide, (48, 48), TilingConfig())
    left = {"type": "Polygon", "coordinates": [[[0, 0], [1024, 0], [1024, 1536], [0, 1536], [0, 0]]]}
    roi = _write_roi(tmp_path / "left.geojson", left)
    grid = plan_slide(SlideEntry(str(slide), str(roi)), (48, 48), TilingConfig())
    assert 0 < len(grid.tiles) < len(full.tiles)
    assert grid.tiles == [t for t in full.tiles if t.x + 24 < 1024]
    assert restrict_grid(full, load_roi(roi)).tiles == grid.tiles
    # The slide records 0.5 um/px; a manifest saying 0.25 halves the tiles' footprint at --mpp-target 0.5.
    coarse = plan_slide(SlideEntry(str(slide), mpp=0.25), (48, 48), TilingConfig(mpp_target=0.5))
    assert (coarse.mpp0, coarse.scale, coarse.cols) == (0.25, 2.0, 22)


def test_distributed_config_names_the_flag_that_is_wrong():
    assert not DaskConfig().enabled and DaskConfig(workers=2).enabled
    with pytest.raises(InputError, match="--scheduler and --workers: give one of them, not both"):
        DaskConfig(scheduler="tcp://127.0.0.1:8786", workers=2)
    with pytest.raises(InputError, match=r"--scheduler: expected an address like tcp://HOST:PORT, got '127.0.0.1'"):
        DaskConfig(scheduler="127.0.0.1")
    with pytest.raises(InputError, match="--workers: expected a positive number of worker processes, got 0"):
        DaskConfig(workers=0)


def test_a_dask_run_takes_csv_output_but_refuses_chunked_stops_naming_the_flag(tmp_path):
    from serving.jobs.config import ScoreConfig

    base = dict(inputs=(str(tmp_path),), urls=("127.0.0.1:1",), model="m", dask=DaskConfig(workers=1))
    assert ScoreConfig(out=str(tmp_path / "r.csv"), **base).dask.enabled  # one output layout for both executors
    with pytest.raises(FlagError, match="--stop-after-parts: this process only"):
        ScoreConfig(out=str(tmp_path / "r.parquet"), stop_after_parts=2, **base)


def test_slides_of_one_name_get_distinct_names_from_their_folders_and_suffixes(tmp_path):
    def entry(rel, roi=None):
        return SlideEntry(str(tmp_path / rel), roi and str(tmp_path / roi))

    entries = [entry("site_a/case_001.svs"), entry("site_b/case_001.svs"), entry("x/b.svs"), entry("x/b.ndpi"),
               entry("c.tiff", "rois/left.geojson"), entry("c.tiff", "rois/right.geojson"), entry("d e!.tiff")]
    assert slide_names(entries) == ["site_a__case_001", "site_b__case_001", "b.svs", "b.ndpi", "c.left", "c.right",
                                    "d_e"]
    assert slide_names(entries) == slide_names(list(entries))  # deterministic


def test_the_same_slide_twice_with_the_same_roi_is_refused_naming_both_entries(synth_slide, tmp_path):
    slide = synth_slide / "slides" / "slide_0.tiff"
    link = tmp_path / "again.tiff"
    link.symlink_to(slide)
    with pytest.raises(FlagError, match=r"slide .*slide_0.tiff is listed twice \(INPUT .*slide_0.tiff and INPUT "
                                        r".*again.tiff\); list each slide once"):
        plan_inputs((str(slide), str(link)), unit_patches=8)
    manifest = tmp_path / "slides.csv"
    manifest.write_text(f"slide\n{slide}\n")
    with pytest.raises(FlagError, match=r"listed twice \(INPUT .*slide_0.tiff and .*slides.csv:2\)"):
        plan_inputs((str(slide), str(manifest)), unit_patches=8)
    roi = _write_roi(tmp_path / "left.geojson", SQUARE_WITH_HOLE)
    both = tmp_path / "both.csv"
    both.write_text(f"slide,roi\n{slide},\n{slide},{roi}\n")
    units = plan_inputs((str(both),), unit_patches=8).units
    assert [u.name for u in units] == ["slide_0", "slide_0.left"]  # two ROIs of one slide: allowed, kept apart
