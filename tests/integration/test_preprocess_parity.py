"""Parity matrix: the same pixels give the same answer on every path.

Images of several sizes (smaller, equal to, larger than the 32 px input, and
the 37 px source size), RGB, grey, RGBA, palette, 16-bit PNG, CMYK JPEG and
JPEGs with each EXIF orientation 1..8 go through every path and are compared
with the reference preprocessing (serving/core/preprocess.py): the DALI evaluation
pipeline (after training's pre-flight scan), the DALI preprocessing model
behind the ensemble, the client's readers; then the served probabilities of
score (pixels and encoded), evaluate, HDF5 rows and slide tiles.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serving.core.imageio import load_rgb_u8
from serving.core.preprocess import reference_views
from serving.inputs.datasets import Sample, discover
from tests.matrix_images import write_matrix

# Grey levels per pixel. Same decoder (PNG, and the scan's converted PNGs) at
# the input size: exact. Resized images: PIL's bilinear and DALI's linear
# antialiased filter round differently by one level here. JPEGs DALI decodes
# itself (libjpeg-turbo in both, seen equal here) get the same one level.
SAME_DECODER_IDENTITY = 0
RESIZED = 1
JPEG = 1
PROB_TOL = 0.01


def _tolerance(name: str) -> int:
    if name.endswith(".jpg") and not name.startswith("cmyk"):
        return JPEG  # DALI decodes JPEGs itself; CMYK is converted by the scan (a PNG)
    return SAME_DECODER_IDENTITY if "equal" in name else RESIZED


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    return write_matrix(tmp_path_factory.mktemp("parity") / "data")


@pytest.fixture(scope="module")
def spec():
    from serving.core.spec import ModelSpec

    return ModelSpec(name="parity", class_names=("normal", "tumour"), input_height=32, input_width=32,
                     mean=(0.7, 0.5, 0.7), std=(0.15, 0.2, 0.15), max_batch_size=8)


@pytest.fixture(scope="module")
def served_spec(triton_server):
    assert triton_server.spec.input_hw == (32, 32) and triton_server.spec.source_hw == (37, 37)
    return triton_server.spec


@pytest.fixture(scope="module")
def crop_spec(spec):
    # A --random-crop model trained on 40 px images: a centre cut of 40 px, no resampling anywhere.
    return spec.replace(eval_geometry="crop", source_height=40, source_width=40)


def _crop_tolerance(name: str) -> int:
    return JPEG if name.endswith(".jpg") and not name.startswith("cmyk") else SAME_DECODER_IDENTITY


def _ref(path, spec) -> np.ndarray:
    return reference_views(path, spec, "none")[0]


def test_dali_evaluation_pipeline_follows_the_reference(matrix, spec, tmp_path):
    from training.pipeline import build_eval_pipeline, iterate
    from training.scan import scan_samples

    names = sorted(matrix)
    scan = scan_samples([Sample(str(matrix[n]), 0) for n in names], tmp_path / "cache", progress=False)
    assert not scan.bad and len(scan.samples) == len(names)
    assert scan.converted == 4 + 7  # rgba, palette, 16-bit, cmyk; and EXIF orientations 2..8
    pipe = build_eval_pipeline(scan.samples, spec=spec, batch_size=8, num_threads=1)
    got = np.concatenate([x.numpy() for x, _ in iterate(pipe, scan.samples)])
    for name, image in zip(names, got):
        diff = np.abs(image.astype(int) - _ref(matrix[name], spec).astype(int)).max()
        assert diff <= _tolerance(name), (name, diff)


def test_dali_preprocessing_model_follows_the_reference(matrix, spec, tmp_path):
    from export.preprocess import run_serialized, serialize_pipeline
    from serving.core.imageio import read_header

    dali = serialize_pipeline(spec, tmp_path / "model.dali", batch_size=4)
    names = [n for n in sorted(matrix) if read_header(matrix[n]).mode in ("RGB", "L")]
    assert len(names) == 6 + 1 + 8  # RGB PNG/JPEG, grey, EXIF 1..8: not RGBA, palette, 16-bit, CMYK
    got = run_serialized(dali, [matrix[n].read_bytes() for n in names], input_name=spec.encoded_name,
                         batch_size=4)
    for name, image in zip(names, got):
        assert image.shape == (32, 32, 3)
        diff = np.abs(image.astype(int) - _ref(matrix[name], spec).astype(int)).max()
        assert diff <= _tolerance(name), (name, diff)


def test_crop_geometry_dali_paths_follow_the_reference(matrix, crop_spec, tmp_path):
    from export.preprocess import run_serialized, serialize_pipeline
    from serving.core.imageio import read_header
    from training.pipeline import build_eval_pipeline, iterate
    from training.scan import scan_samples

    names = sorted(matrix)
    scan = scan_samples([Sample(str(matrix[n]), 0) for n in names], tmp_path / "cache", progress=False)
    pipe = build_eval_pipeline(scan.samples, spec=crop_spec, batch_size=8, num_threads=1)
    got = np.concatenate([x.numpy() for x, _ in iterate(pipe, scan.samples)])
    resize_spec = crop_spec.replace(eval_geometry="resize_crop")
    differ = 0
    for name, image in zip(names, got):
        ref = _ref(matrix[name], crop_spec)
        diff = np.abs(image.astype(int) - ref.astype(int)).max()
        assert diff <= _crop_tolerance(name), ("evaluation pipeline", name, diff)
        differ += np.abs(_ref(matrix[name], resize_spec).astype(int) - ref.astype(int)).max() > 1
    assert differ >= 3, "the matrix must hold images where cutting and resizing differ"
    dali = serialize_pipeline(crop_spec, tmp_path / "model.dali", batch_size=4)
    names = [n for n in names if read_header(matrix[n]).mode in ("RGB", "L")]
    got = run_serialized(dali, [matrix[n].read_bytes() for n in names], input_name=crop_spec.encoded_name,
                         batch_size=4)
    for name, image in zip(names, got):
        diff = np.abs(image.astype(int) - _ref(matrix[name], crop_spec).astype(int)).max()
        assert diff <= _crop_tolerance(name), ("preprocessing model", name, diff)


def test_client_readers_give_the_reference_pixels(matrix, spec, tmp_path):
    from serving.inputs.units import PatchUnit, ReadOptions

    ds = discover(matrix["rgb_equal.png"].parents[1])
    work = PatchUnit(0, "u", ds.kind, tuple(ds.samples), ds.classes).open(ReadOptions(spec))
    items = [it for task in work.tasks([(0, work.n)]) for it in task()]
    assert [it.error for it in items] == [None] * len(items)
    for it in items:
        np.testing.assert_array_equal(reference_views(it.image, spec, "none")[0], _ref(it.source, spec))
        assert it.image.shape[:2] == ((32, 32) if "equal" in Path(it.source).name else (37, 37))


def _score(spec, server, inputs, out: Path, **kw) -> dict[str, np.ndarray]:
    from serving.jobs.output import iter_results
    from serving.jobs.engine import ScoreConfig, run_score

    cfg = ScoreConfig(inputs=tuple(str(i) for i in inputs), urls=(server.grpc,), model=spec.name, out=str(out),
                      progress=False, **kw)
    run_score(cfg, log=lambda _: None)
    cols = [f"prob_{c}" for c in spec.class_names]
    return {(r["source"], r["col"], r["row"]): np.array([r[c] for c in cols])
            for r in iter_results(out, columns=["source", "col", "row", *cols])}


def test_every_path_gives_the_same_probabilities(matrix, served_spec, triton_server, export_run_dir, tmp_path):
    from training.evaluate import evaluate_run

    spec = served_spec
    root = matrix["rgb_equal.png"].parents[1]
    pixels = {k[0]: v for k, v in _score(spec, triton_server, [root], tmp_path / "pixels.parquet").items()}
    encoded = {k[0]: v for k, v in _score(spec, triton_server, [root], tmp_path / "enc.parquet",
                                          send="encoded").items()}
    ev = evaluate_run(export_run_dir, root, tmp_path / "eval", tta="none", workers=1, device="cpu",
                      dali_device="cpu", progress=False)
    evaluated = dict(zip(ev.paths, ev.probs))
    assert set(pixels) == set(evaluated) == {str(p) for p in matrix.values()}
    assert set(encoded) == {s for s in pixels if not any(m in s for m in ("rgba", "palette", "grey16", "cmyk"))}
    for src, p in pixels.items():
        assert np.abs(p - evaluated[src]).max() < PROB_TOL, ("evaluate", src, p, evaluated[src])
        if src in encoded:
            assert np.abs(p - encoded[src]).max() < PROB_TOL, ("encoded", src, p, encoded[src])
    # The model tells these images apart: agreement within 0.01 is not agreement by default.
    spread = np.ptp(np.stack(list(pixels.values()))[:, 1])
    assert spread > 5 * PROB_TOL, spread


def test_folder_hdf5_and_slide_tiles_of_the_same_pixels_agree(served_spec, triton_server, tmp_path):
    import h5py
    from PIL import Image

    from serving.synth.dataset import make_patch
    from serving.synth.slide import write_pyramid_tiff
    from serving.slides.tiling import TilingConfig

    spec = served_spec
    rng = np.random.default_rng(5)
    grid = [[make_patch(rng, (r + c) % 2, 32) for c in range(4)] for r in range(4)]
    level0 = np.concatenate([np.concatenate(row, axis=1) for row in grid], axis=0)
    slide = tmp_path / "slide.tiff"
    write_pyramid_tiff(slide, [level0], mpp=0.5)
    mask = tmp_path / "all_tissue.png"
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(mask)
    folder = tmp_path / "tiles"
    folder.mkdir()
    for r in range(4):
        for c in range(4):
            Image.fromarray(grid[r][c]).save(folder / f"r{r}_c{c}.png")
    with h5py.File(tmp_path / "tiles.h5", "w") as f:
        f.create_dataset("x", data=np.stack([grid[r][c] for r in range(4) for c in range(4)]))

    tiles = _score(spec, triton_server, [slide], tmp_path / "slide.parquet",
                   tiling=TilingConfig(tissue_mask=str(mask), min_tissue=0.01))
    files = _score(spec, triton_server, [folder], tmp_path / "folder.parquet")
    rows = _score(spec, triton_server, [tmp_path / "tiles.h5"], tmp_path / "h5.parquet")
    assert len(tiles) == len(files) == len(rows) == 16
    by_tile = {(k[2], k[1]): v for k, v in tiles.items()}
    for r in range(4):
        for c in range(4):
            p_file = files[(str(folder / f"r{r}_c{c}.png"), None, None)]
            p_row = rows[(f"{tmp_path / 'tiles.h5'}#{r * 4 + c}", None, None)]
            np.testing.assert_allclose(by_tile[(r, c)], p_file, atol=1e-5)
            np.testing.assert_allclose(p_row, p_file, atol=1e-5)


def test_reference_decodes_the_scan_cache_to_the_same_pixels(matrix, tmp_path):
    from training.scan import scan_samples

    for name in ("rgba_equal.png", "exif_6.jpg", "cmyk_equal.jpg"):
        scan = scan_samples([Sample(str(matrix[name]), 0)], tmp_path / "cache", progress=False)
        np.testing.assert_array_equal(load_rgb_u8(scan.samples[0].source), load_rgb_u8(matrix[name]))


def _png_header_only(side: int) -> bytes:
    """A PNG whose header claims side x side RGB pixels (the limits are read from the header)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def test_ensemble_refuses_an_over_limit_image_per_request_and_stays_ready(served_spec, triton_server, matrix):
    import tritonclient.grpc as grpcclient

    spec = served_spec
    client = grpcclient.InferenceServerClient(triton_server.grpc)

    def send(data: bytes):
        arr = np.frombuffer(data, np.uint8)[None]
        inp = grpcclient.InferInput(spec.encoded_name, list(arr.shape), "UINT8")
        inp.set_data_from_numpy(arr)
        return client.infer(spec.ensemble_model_name, [inp]).as_numpy(spec.output_name)

    try:
        with pytest.raises(Exception, match=r"image too large: 20000x20000 = 400000000 pixels is over the limit"):
            send(_png_header_only(20_000))
        with pytest.raises(Exception, match=r"expected an RGB or grey PNG or JPEG, got a RGBA PNG"):
            send(matrix["rgba_equal.png"].read_bytes())
        assert send(matrix["rgb_equal.png"].read_bytes()).shape == (1, 2)
        assert client.is_server_ready() and client.is_model_ready(spec.ensemble_model_name)
    finally:
        client.close()


def test_scoring_records_an_over_limit_file_without_decoding_it(served_spec, triton_server, tmp_path):
    import csv

    from PIL import Image

    from serving.jobs.output import errors_path

    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(folder / "ok.png")
    (folder / "bomb.png").write_bytes(_png_header_only(20_000))
    for send in ("pixels", "encoded"):
        out = tmp_path / f"{send}.parquet"
        rows = _score(served_spec, triton_server, [folder], out, send=send)
        assert list(rows) == [(str(folder / "ok.png"), None, None)]
        with open(errors_path(out), newline="") as fh:
            (err,) = list(csv.DictReader(fh))
        assert err["source"] == str(folder / "bomb.png")
        assert "image too large: 20000x20000 = 400000000 pixels is over the limit of 67108864" in err["reason"]
