"""``patchserve score --features``: the served model's features beside the probabilities, through the job engine.

A synthetic slide scored against the real server gives a fixed-size float32
list column in Parquet and a CLAM/TRIDENT HDF5 file whose vectors are ONNX
Runtime's features of the same tiles; the Dask executor gives the same
vectors; a job SIGKILLed mid-slide resumes with each tile once; bad requests
are refused in one line.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from export.features import relative_errors
from patchserve.cli import main as cli
from serving.jobs.output import parts_path
from serving.slides.wsi import open_slide
from tests.fixtures_serve import find_onnx

REL = 1e-5  # a tile's vector, whoever computed it (the server, ONNX Runtime in-process, another executor)
# The ensemble decodes and resizes with DALI, whose resize differs from PIL's by a grey level or two (as for the
# probabilities, test_score_cli.py ENCODED_ATOL): its features are those of slightly other pixels.
ENCODED_REL = 0.05
WAIT_S = 300.0


def _args(server, slide, out, *extra):
    return ["score", str(slide), "--url", server.grpc, "--model", server.spec.name, "--out", str(out),
            "--no-progress", "--stride", "96", "--features", *map(str, extra)]


def _h5(out: Path, name: str = "slide_0") -> Path:
    return out.with_name(f"{out.stem}.{name}.features.h5")


def _table_features(table) -> np.ndarray:
    col = table.column("features").combine_chunks()
    return col.flatten().to_numpy().reshape(len(col), col.type.list_size)


@pytest.fixture(scope="module")
def slide(synth_slide):
    return synth_slide / "slides" / "slide_0.tiff"


@pytest.fixture(scope="module")
def scored(triton_server, slide, tmp_path_factory):
    out = tmp_path_factory.mktemp("features") / "feats.parquet"
    assert cli(_args(triton_server, slide, out, "--part-rows", "64")) == 0
    return out, pq.read_table(out)


def test_slide_features_in_parquet_and_hdf5_are_onnx_runtimes_features_of_the_same_tiles(
        triton_server, scored, slide):
    import onnxruntime as ort

    out, table = scored
    spec = triton_server.spec
    assert table.schema.field("features").type == pa.list_(pa.float32(), spec.feature_size)
    assert "prob_" + spec.class_names[0] in table.column_names  # the probabilities too, from the same pass
    feats = _table_features(table)
    n = table.num_rows
    assert n > 50 and feats.shape == (n, 512)
    with h5py.File(_h5(out)) as f:
        coords, h5_feats = f["coords"][:], f["features"][:]
        attrs, fattrs = dict(f["coords"].attrs), dict(f["features"].attrs)
    # The layout CLAM's and TRIDENT's loaders read: level-0 top-left corners, N x D float32, in Parquet order.
    assert coords.dtype == np.int64 and h5_feats.dtype == np.float32 and h5_feats.shape == (n, 512)
    assert coords.tolist() == [[x, y] for x, y in zip(table.column("x").to_pylist(), table.column("y").to_pylist())]
    np.testing.assert_array_equal(h5_feats, feats)
    h, w = spec.input_hw
    assert (attrs["patch_size"], attrs["patch_level"], attrs["patch_size_level0"]) == (w, 0, w)
    assert (attrs["level0_magnification"], attrs["target_magnification"]) == (20.0, 20.0)  # 0.5 um/px
    assert (attrs["level0_width"], attrs["level0_height"], attrs["name"]) == (2048, 1536, "slide_0")
    assert list(attrs["downsample"]) == [1.0, 1.0] and list(attrs["level_dim"]) == [2048, 1536]
    assert (fattrs["encoder"], fattrs["feature_layer"]) == (spec.name, "layer4")
    # The same pixels through the same graph in this process.
    wsi = open_slide(slide)
    try:
        tiles = np.stack([np.asarray(wsi.read_region((int(x), int(y)), 0, (w, h)).convert("RGB")) for x, y in coords])
    finally:
        wsi.close()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(find_onnx(triton_server.repo, spec)), options,
                                   providers=["CPUExecutionProvider"])
    want = np.concatenate([session.run([spec.features_name], {spec.input_name: tiles[i:i + 8]})[0]
                           for i in range(0, n, 8)])
    rel = relative_errors(h5_feats, want)
    print(f"served vs in-process ONNX Runtime features, {n} tiles: max relative error {rel.max():.3g}")
    assert rel.max() <= REL


def test_the_dask_executor_and_another_batch_size_give_the_same_vectors(triton_server, scored, slide, tmp_path):
    out0, table0 = scored
    out = tmp_path / "dask.parquet"
    assert cli(_args(triton_server, slide, out, "--workers", "1", "--batch-size", "3")) == 0
    table = pq.read_table(out)
    assert table.column("x").to_pylist() == table0.column("x").to_pylist()
    assert table.column("y").to_pylist() == table0.column("y").to_pylist()
    rel = relative_errors(_table_features(table), _table_features(table0))
    print(f"Dask, batch 3 vs in-process: max relative error {rel.max():.3g}")
    assert rel.max() <= REL
    with h5py.File(_h5(out)) as f, h5py.File(_h5(out0)) as g:
        assert relative_errors(f["features"][:], g["features"][:]).max() <= REL


def _parts(out: Path) -> int:
    return len(list(parts_path(out).glob("unit-*/part-*.parquet")))


def test_a_job_sigkilled_mid_slide_resumes_with_each_tiles_vector_once(triton_server, scored, slide, tmp_path):
    _, whole = scored
    out = tmp_path / "killed.parquet"
    args = _args(triton_server, slide, out, "--part-rows", "8", "--batch-size", "4")
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "patchserve", *args], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + WAIT_S
        while _parts(out) < 3:
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "first.log").read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    committed = _parts(out)
    assert 3 <= committed < whole.num_rows // 8 and not _h5(out).exists()
    assert cli([*args, "--resume"]) == 0
    table = pq.read_table(out)
    xy = list(zip(table.column("x").to_pylist(), table.column("y").to_pylist()))
    assert len(xy) == len(set(xy)) == whole.num_rows  # each tile once
    assert xy == list(zip(whole.column("x").to_pylist(), whole.column("y").to_pylist()))
    assert relative_errors(_table_features(table), _table_features(whole)).max() <= REL
    with h5py.File(_h5(out)) as f:
        assert [tuple(c) for c in f["coords"][:]] == xy
        assert relative_errors(f["features"][:], _table_features(whole)).max() <= REL


def test_csv_out_with_features_is_refused_naming_out(triton_server, slide, tmp_path, capsys):
    out = tmp_path / "feats.csv"
    assert cli(_args(triton_server, slide, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].count("--out") >= 1 and ".parquet" in err[0], err
    assert not out.exists()


def test_a_resume_that_adds_or_drops_features_is_refused_and_changes_nothing(triton_server, slide, tmp_path,
                                                                             capsys):
    out = tmp_path / "mixed.parquet"
    plain = [a for a in _args(triton_server, slide, out, "--part-rows", "8") if a != "--features"]
    assert cli([*plain, "--stop-after-parts", "1"]) == 3
    record = Path(str(out) + ".job.json").read_bytes()
    capsys.readouterr()
    assert cli([*plain, "--features", "--resume"]) == 2
    assert "option features: None then, True now" in capsys.readouterr().err
    assert Path(str(out) + ".job.json").read_bytes() == record
    out2 = tmp_path / "mixed2.parquet"
    assert cli(_args(triton_server, slide, out2, "--part-rows", "8", "--stop-after-parts", "1")) == 3
    capsys.readouterr()
    assert cli([a for a in _args(triton_server, slide, out2, "--part-rows", "8") if a != "--features"]
               + ["--resume"]) == 2
    assert "option features: True then, None now" in capsys.readouterr().err


@pytest.fixture(scope="module")
def no_features_server(export_run_dir, synth_data, tmp_path_factory):
    """The export fixture's run exported without a features output (as before features existed), served."""
    from export.build import export_run
    from serving.server.embedded import EmbeddedTriton
    from tests.fixtures_export import EXPORT_MAX_BATCH

    repo = tmp_path_factory.mktemp("no_features") / "repo"
    result = export_run(export_run_dir, repo, formats=("python",), with_tta=False, with_dali=False,
                        max_batch_size=EXPORT_MAX_BATCH, data=synth_data, features="none")
    with EmbeddedTriton(repo) as server:
        yield server, result.spec


def test_features_from_a_model_without_them_is_refused_naming_it_and_the_export_to_run(
        no_features_server, slide, tmp_path, capsys):
    server, spec = no_features_server
    out = tmp_path / "none.parquet"
    assert cli(["score", str(slide), "--url", server.urls.grpc, "--model", spec.name, "--out", str(out),
                "--no-progress", "--features"]) == 2
    err = capsys.readouterr().err
    assert f"model {spec.name!r}" in err and "re-export with --features layer4" in err
    assert not out.exists() and not parts_path(out).exists()


def test_server_tta_features_are_the_mean_of_the_views_and_the_ensemble_returns_them(triton_server, synth_data,
                                                                                     tmp_path):
    folder = synth_data / "test"
    spec = triton_server.spec

    def features(name, *extra):
        out = tmp_path / f"{name}.parquet"
        assert cli(["score", str(folder), "--url", triton_server.grpc, "--model", spec.name, "--out", str(out),
                    "--no-progress", "--features", *extra]) == 0
        table = pq.read_table(out)
        return table.column("source").to_pylist(), _table_features(table)

    src, client_views = features("client", "--tta", "five")
    src2, server_views = features("server", "--tta", "server")
    assert src == src2 and len(src) == 16
    rel = relative_errors(server_views, client_views)
    print(f"--tta server vs the client's mean over the same five views: max relative error {rel.max():.3g}")
    assert rel.max() <= REL
    src3, pixels = features("pixels")
    src4, encoded = features("encoded", "--send", "encoded")
    assert src3 == src4 == src
    rel = relative_errors(encoded, pixels)
    print(f"--send encoded (the ensemble) vs pixels: max relative error {rel.max():.3g}")
    assert encoded.shape == (16, spec.feature_size) and rel.max() <= ENCODED_REL
