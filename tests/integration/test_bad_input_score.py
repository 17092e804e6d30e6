"""Bad input to ``patchserve score`` and to the server: recorded skips or clear errors, never a crash mid-job.

Already covered: zero-byte and truncated PNG recorded (test_score_cli.py),
unknown model / spec disagreement / float32 refused by the client
(test_client_server.py), shapes refused before sending (test_client_units.py).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from patchserve.cli import main as cli
from serving.core.imageio import load_rgb_u8, resize_u8
from serving.jobs.output import read_results
from serving.core.views import view_boxes
from tests.unit.test_bad_input_decode import RNG_IMAGE, jpeg_bytes, png_header_only

ATOL = 1e-5


def _score(server, *args):
    return cli(["score", *map(str, args), "--url", server.grpc, "--model", server.spec.name, "--no-progress"])


def _odd_folder(root):
    """Files that must score (any mode, wrong extension, tiny) and files that must be recorded."""
    root.mkdir()
    grey = RNG_IMAGE[:, :, 0]
    Image.fromarray(RNG_IMAGE).save(root / "a_rgb.png")
    Image.fromarray(grey).save(root / "b_grey.png")
    Image.fromarray(np.dstack([RNG_IMAGE, np.full((40, 40), 200, np.uint8)]), "RGBA").save(root / "c_rgba.png")
    Image.fromarray(RNG_IMAGE).convert("P", palette=Image.ADAPTIVE).save(root / "d_palette.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(root / "e_16bit.png")
    (root / "f_png_named.jpg").write_bytes((root / "a_rgb.png").read_bytes())
    Image.fromarray(RNG_IMAGE[:5, :5]).save(root / "g_tiny.png")
    (root / "h_photo.jpg").write_bytes(jpeg_bytes())
    bad = {"v_zero.png": (b"", "empty file (0 bytes)"),
           "w_cut.jpg": (jpeg_bytes()[:600], "cannot decode image"),
           "x_text.png": (b"patient notes, not pixels\n", "not an image file PIL can decode"),
           "y_huge.png": (png_header_only(45_000, 45_000), "image too large: 45000x45000 = 2025000000 pixels")}
    for name, (data, _) in bad.items():
        (root / name).write_bytes(data)
    return {name: why for name, (_, why) in bad.items()}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_odd_and_broken_images_score_or_are_recorded_with_the_reason(triton_server, ort_reference, tmp_path):
    spec = triton_server.spec
    folder = tmp_path / "odd"
    bad = _odd_folder(folder)
    out = tmp_path / "results.csv"
    assert _score(triton_server, folder, "--out", out, "--batch-size", "3") == 0
    rows = read_results(out)
    good = sorted(p for p in folder.iterdir() if p.name not in bad)
    assert [r["source"] for r in rows] == [str(p) for p in good]
    (top, left, _), = view_boxes("none", spec.source_hw, spec.input_hw)
    h, w = spec.input_hw
    crops = np.stack([resize_u8(load_rgb_u8(p), spec.source_hw)[top:top + h, left:left + w] for p in good])
    probs = np.array([[r[f"prob_{c}"] for c in spec.class_names] for r in rows])
    np.testing.assert_allclose(probs, ort_reference.probs(crops), atol=ATOL)
    by_name = {p.name: i for i, p in enumerate(good)}
    # The PNG named .jpg was read as the PNG it is: the same row as the real PNG.
    np.testing.assert_array_equal(probs[by_name["f_png_named.jpg"]], probs[by_name["a_rgb.png"]])
    errors = (tmp_path / "results.csv.errors.csv").read_text().splitlines()[1:]
    assert [e.split(",")[0] for e in errors] == [str(folder / n) for n in sorted(bad)]
    for line, name in zip(errors, sorted(bad)):
        assert f"{name}: {bad[name]}" in line, line


def _plain_tiff(path, mpp=None):
    import tifffile

    kw = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER") if mpp else {}
    image = np.full((512, 512, 3), 235, np.uint8)
    image[:, :200] = (150, 90, 160)  # stained tissue over the first 200 columns (100 um at 0.5 um/px), glass beyond
    tifffile.imwrite(path, image, tile=(32, 32), photometric="rgb", **kw)
    return path


def test_unreadable_slide_and_slide_without_mpp_are_recorded_and_the_rest_scores(triton_server, synth_data,
                                                                                 tmp_path):
    garbage = tmp_path / "garbage.tiff"
    garbage.write_bytes(b"II*\x00" + bytes(range(256)) * 8)
    no_mpp = _plain_tiff(tmp_path / "no_mpp.tiff")
    folder = synth_data / "val" / "normal"
    out = tmp_path / "results.csv"
    assert _score(triton_server, garbage, no_mpp, folder, "--out", out) == 0
    assert len(read_results(out)) == len(list(folder.glob("*.png")))
    errors = (tmp_path / "results.csv.errors.csv").read_text().splitlines()[1:]
    assert errors[0].startswith(f"{garbage},") and "OpenSlide cannot open it" in errors[0]
    assert errors[1].startswith(f"{no_mpp},") and "records no microns per pixel" in errors[1] and "pass --mpp" in errors[1]
    # Given --mpp, the same slide tiles and scores.
    out2 = tmp_path / "slide.csv"
    assert _score(triton_server, no_mpp, "--out", out2, "--mpp", "0.5") == 0
    got = {(r["col"], r["row"]) for r in read_results(out2)}
    assert {c for c, _ in got} == set(range(7)) and {r for _, r in got} == set(range(16))  # the tissue columns
    assert (tmp_path / "slide.csv.errors.csv").read_text() == "source,reason\n"


def test_malformed_manifest_rows_are_recorded_and_good_rows_scored(triton_server, synth_data, tmp_path):
    good = sorted((synth_data / "val" / "tumour").glob("*.png"))[:3]
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n" + f"{good[0]},tumour\n,tumour\n{good[1]},cat\n{good[2]},tumour,extra\n"
                        + f"{good[2]},tumour\n")
    out = tmp_path / "results.csv"
    assert _score(triton_server, manifest, "--out", out) == 0
    assert [r["source"] for r in read_results(out)] == [str(good[0]), str(good[2])]
    import csv

    with open(tmp_path / "results.csv.errors.csv", newline="") as fh:
        errors = {r["source"]: r["reason"] for r in csv.DictReader(fh)}
    assert errors == {f"{manifest}:3": "malformed manifest row: empty path",
                      f"{manifest}:4": "malformed manifest row: label 'cat' is not one of ['normal', 'tumour']",
                      f"{manifest}:5": "malformed manifest row: more fields than the header"}


@pytest.mark.parametrize("make, match", [
    (lambda p: p.mkdir(), r"empty: .*holds no images and no class folders"),
    (lambda p: _h5(p, np.zeros((2, 8, 8), np.uint8)), r"bad_x\.h5: dataset 'x' must be N x H x W x 3 uint8"),
])
def test_empty_folder_and_hdf5_of_wrong_shape_stop_before_scoring_naming_them(triton_server, tmp_path, capsys,
                                                                              make, match):
    import re

    target = tmp_path / ("empty" if "empty" in match else "bad_x.h5")
    make(target)
    assert _score(triton_server, target, "--out", tmp_path / "r.csv") == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "r.csv").exists()


def _h5(path, x):
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=x)


def test_unknown_model_name_stops_the_job_naming_the_flag(triton_server, synth_data, tmp_path, capsys):
    code = cli(["score", str(synth_data / "val"), "--url", triton_server.grpc, "--model", "no_such_model",
                "--out", str(tmp_path / "r.csv"), "--no-progress"])
    assert code == 2
    assert "--model no_such_model: the server at" in capsys.readouterr().err


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_raw_request_of_wrong_dtype_or_shape_gets_tritons_own_error(triton_server, protocol):
    import importlib

    from tritonclient.utils import InferenceServerException

    spec = triton_server.spec
    lib = importlib.import_module(f"tritonclient.{protocol}")
    client = lib.InferenceServerClient(triton_server.grpc if protocol == "grpc" else triton_server.http)
    try:
        for array, wire, match in (
                (np.zeros((2, *spec.input_hw, 3), np.float32), "FP32", "expected .*UINT8|data-type"),
                (np.zeros((2, spec.input_height + 1, spec.input_width, 3), np.uint8), "UINT8",
                 r"unexpected shape for input"),
                (np.zeros((2, *spec.input_hw), np.uint8), "UINT8", r"unexpected shape for input")):
            inp = lib.InferInput(spec.input_name, list(array.shape), wire)
            inp.set_data_from_numpy(array)
            with pytest.raises(InferenceServerException, match=match):
                client.infer(spec.name, [inp])
    finally:
        client.close()
