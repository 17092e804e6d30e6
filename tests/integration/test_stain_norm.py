"""Stain normalisation inside the model (training/stain_norm.py).

The arithmetic agrees with torchstain on the real Aperio SVS; degenerate
patches pass through; the exported graph computes the same; a model trained
with ``--stain-normalize macenko`` answers the same on every path, a raw-pixel
Triton client included; the gate holds the spec, the configs and the graph
together; bad targets are refused before training.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from training.stain_norm import BETA, IO, MIN_TISSUE, StainNormalizer, fit_target

# torchstain returns uint8 by truncation; ours is float. Measured on the 41 tiles of 224 px of the real SVS
# with over 30% of their pixels stained: every pixel within 1.01 grey levels, mean 0.57 (Macenko) and 0.60
# (Reinhard) per tile at most.
TORCHSTAIN_MAX = 1.5
TORCHSTAIN_MEAN = 0.75
PROB_TOL = 0.01


def _normalise(params: dict, images_u8: np.ndarray) -> np.ndarray:
    import torch

    module = StainNormalizer(params).eval()
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(images_u8, np.float32)).permute(0, 3, 1, 2)
        return module(x).permute(0, 2, 3, 1).numpy()


def _stained(tile: np.ndarray) -> float:
    od = -np.log((tile.astype(np.float32) + 1.0) / IO)
    return float((od >= BETA).all(axis=-1).mean())


@pytest.fixture(scope="module")
def svs_tiles(real_slides):
    """224 px tiles of the real SVS's level 0 on a grid, with the share of their pixels stained."""
    import openslide

    slide = openslide.OpenSlide(str(real_slides["svs"]))
    try:
        width, height = slide.dimensions
        tiles = [np.asarray(slide.read_region((x, y), 0, (224, 224)).convert("RGB"))
                 for y in range(0, height - 224, 224) for x in range(0, width - 224, 224)]
    finally:
        slide.close()
    return [(t, _stained(t)) for t in tiles]


@pytest.fixture(scope="module")
def tissue_tiles(svs_tiles):
    tiles = [t for t, share in svs_tiles if share > 0.3]
    assert len(tiles) >= 30, len(tiles)
    return tiles


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_in_model_arithmetic_agrees_with_torchstain_on_the_real_svs(tissue_tiles, method):
    from torchstain.numpy.normalizers.macenko import NumpyMacenkoNormalizer
    from torchstain.numpy.normalizers.reinhard import NumpyReinhardNormalizer

    target = tissue_tiles[len(tissue_tiles) // 2]
    if method == "macenko":
        theirs = NumpyMacenkoNormalizer()
        theirs.fit(target)
        params = {"method": "macenko", "stain_matrix": theirs.HERef.T.tolist(),
                  "max_concentrations": theirs.maxCRef.tolist()}
        want = np.stack([theirs.normalize(I=t, stains=False)[0] for t in tissue_tiles])
    else:
        theirs = NumpyReinhardNormalizer()
        theirs.fit(target)
        params = {"method": "reinhard", "lab_mean": theirs.target_means.tolist(),
                  "lab_std": theirs.target_stds.tolist()}
        want = np.stack([theirs.normalize(t) for t in tissue_tiles])
    # Our own fit of the target gives torchstain's parameters.
    ours = fit_target([target], method)
    for key, value in params.items():
        if key != "method":
            np.testing.assert_allclose(ours[key], value, rtol=2e-3, atol=2e-3, err_msg=key)
    got = _normalise(params, np.stack(tissue_tiles))
    diff = np.abs(got - want.astype(np.float32))
    assert diff.max() <= TORCHSTAIN_MAX and diff.mean(axis=(1, 2, 3)).max() <= TORCHSTAIN_MEAN, \
        (diff.max(), diff.mean(axis=(1, 2, 3)).max())
    # Normalisation did something: the tiles moved towards the target by more than the tolerance.
    assert np.abs(got - np.stack(tissue_tiles)).mean() > 5 * TORCHSTAIN_MEAN


def _degenerate(size: int = 64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    white = np.full((size, size, 3), 255, np.uint8)
    background = rng.integers(228, 256, (size, size, 3)).astype(np.uint8)  # a slide's border: glass and noise
    black = np.zeros((size, size, 3), np.uint8)
    # Haematoxylin alone, at concentrations that vary: optical density along one stain vector.
    h = np.array([0.65, 0.70, 0.29])
    conc = rng.uniform(0.2, 1.5, (size, size, 1))
    single = np.clip(IO * np.exp(-conc * h), 0, 255).astype(np.uint8)
    pen = white.copy()
    pen[:, size // 3: size // 2] = (20, 140, 60)  # a green marker line across glass
    pen[size // 2:, :] = (30, 40, 160)  # blue ink
    flat = np.full((size, size, 3), (180, 90, 160), np.uint8)  # one colour, stained, no variance
    return {"white": white, "background": background, "black": black, "single_stain": single, "pen": pen,
            "flat": flat}


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_degenerate_patches_pass_through_or_stay_finite(method, tissue_tiles):
    params = fit_target(tissue_tiles[:4], method)
    cases = _degenerate()
    names = list(cases)
    got = _normalise(params, np.stack([cases[n] for n in names]))
    assert np.isfinite(got).all() and got.min() >= 0 and got.max() <= 255
    unchanged = {"white", "background", "black", "flat"} | ({"single_stain"} if method == "macenko" else set())
    for name, out in zip(names, got):
        if name in unchanged:
            np.testing.assert_array_equal(out, cases[name].astype(np.float32), err_msg=name)
    assert _stained(cases["background"]) < MIN_TISSUE and _stained(cases["black"]) == 1.0


def test_each_patch_is_normalised_alone(tissue_tiles):
    """Per patch: a patch's result does not depend on the batch it came in."""
    params = fit_target(tissue_tiles[:4], "macenko")
    batch = np.stack([tissue_tiles[5][:64, :64], _degenerate()["white"], tissue_tiles[9][:64, :64]])
    together = _normalise(params, batch)
    for i in range(len(batch)):
        np.testing.assert_allclose(_normalise(params, batch[i:i + 1])[0], together[i], atol=1e-3)


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_exported_graph_computes_what_torch_does(method, tissue_tiles, tmp_path):
    """The normaliser exports (no eigh: power iteration, top-k percentiles) and ONNX Runtime agrees with torch
    on real tissue and on every degenerate patch."""
    import torch

    from export.onnx_export import export_onnx, ort_session

    class Wrap(torch.nn.Module):
        def __init__(self, params):
            super().__init__()
            self.norm = StainNormalizer(params)

        def forward(self, x):
            return self.norm(x.float().permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    params = fit_target(tissue_tiles[:4], method)
    images = np.stack([t[:64, :64] for t in tissue_tiles[10:16]] + list(_degenerate().values()))
    path = export_onnx(Wrap(params).eval(), images[:2], tmp_path / "norm.onnx", input_name="x",
                       output_names=["y"])
    got = ort_session(path).run(["y"], {"x": images})[0]
    np.testing.assert_allclose(got, _normalise(params, images), atol=0.05)


# --- A model trained with --stain-normalize macenko, exported and served ---------------------------------


@pytest.fixture(scope="module")
def stain_run(synth_data, tmp_path_factory):
    import torch

    from tests.fixtures_train import small_train_config
    from training.train import train

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("stain_run") / "run"
    train(small_train_config(synth_data, out, epochs=3, stain_normalize="macenko"))
    return out


@pytest.fixture(scope="module")
def stain_served(stain_run, synth_data, tmp_path_factory):
    from export.build import export_run
    from serving.server.embedded import EmbeddedTriton
    from tests.fixtures_serve import Served

    repo = tmp_path_factory.mktemp("stain_repo") / "repo"
    result = export_run(stain_run, repo, formats=("python", "onnxruntime"), tta_views="five", with_tta=True,
                        with_dali=True, max_batch_size=8, data=synth_data)
    with EmbeddedTriton(repo) as server:
        yield Served(server, repo, result.spec, server.urls.grpc, server.urls.http)


def test_the_spec_records_the_target_fitted_from_the_training_set(stain_run):
    from serving.core.spec import ModelSpec

    spec = ModelSpec.from_json((stain_run / "spec.json").read_text())
    norm = spec.stain_normalization
    assert norm["method"] == "macenko" and np.array(norm["stain_matrix"]).shape == (2, 3)
    assert norm["target"] == "the training set: 48 images drawn with seed 0, pooled"
    # Haematoxylin first: it absorbs red more than eosin does.
    assert norm["stain_matrix"][0][0] > norm["stain_matrix"][1][0]


def test_every_path_gives_the_normalised_answer(stain_served, stain_run, tmp_path):
    import tritonclient.grpc as grpcclient

    from serving.client.patch_client import PatchClient
    from serving.core.preprocess import reference_views
    from tests.integration.test_preprocess_parity import _score
    from tests.matrix_images import write_matrix
    from training.evaluate import evaluate_run

    spec = stain_served.spec
    matrix = write_matrix(tmp_path / "data")
    root = matrix["rgb_equal.png"].parents[1]
    ev = evaluate_run(stain_run, root, tmp_path / "eval", tta="none", workers=1, device="cpu", dali_device="cpu",
                      progress=False)
    evaluated = dict(zip(ev.paths, ev.probs))
    pixels = {k[0]: v for k, v in _score(spec, stain_served, [root], tmp_path / "pixels.parquet").items()}
    encoded = {k[0]: v for k, v in _score(spec, stain_served, [root], tmp_path / "enc.parquet",
                                          send="encoded").items()}
    assert set(pixels) == set(evaluated) and len(encoded) >= 15
    for src, p in pixels.items():
        assert np.abs(p - evaluated[src]).max() < PROB_TOL, ("pixels", src, p, evaluated[src])
        if src in encoded:
            assert np.abs(encoded[src] - evaluated[src]).max() < PROB_TOL, ("encoded", src)

    # A plain Triton client sending raw uint8 pixels, no patchserve: the same answers.
    names = sorted(pixels)
    raw_in = np.stack([reference_views(n, spec, "none")[0] for n in names])
    client = grpcclient.InferenceServerClient(stain_served.grpc)
    try:
        inp = grpcclient.InferInput(spec.input_name, list(raw_in[:8].shape), "UINT8")
        inp.set_data_from_numpy(raw_in[:8])
        raw = client.infer(spec.name, [inp]).as_numpy(spec.output_name)
    finally:
        client.close()
    np.testing.assert_allclose(raw, np.stack([evaluated[n] for n in names[:8]]), atol=PROB_TOL)

    # Client-side and in-server TTA agree: each of the five views is normalised on its own, in the server.
    larger = [_load(matrix[n]) for n in ("rgb_larger.png", "rgb_source.png", "exif_1.jpg")]
    with PatchClient(stain_served.grpc, spec.name) as pc:
        assert pc.spec.stain_normalization == spec.stain_normalization
        five = pc.predict(larger, tta="five")
        np.testing.assert_allclose(pc.predict(larger, tta="server"), five, atol=1e-4)
        assert np.abs(five - pc.predict(larger)).max() > 1e-4  # five views are not one

    # The normalisation is in the served graph: the same weights without it answer otherwise.
    without = _without_normalisation(stain_run, raw_in[:8])
    assert np.abs(without - raw).max() > 5 * PROB_TOL


def _load(path):
    from serving.core.imageio import load_rgb_u8

    return load_rgb_u8(path)


def _without_normalisation(run, images_u8):
    import torch

    from training.checkpoint import load_for_inference

    model, _, _ = load_for_inference(run)
    model.normalize.stain = None
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(images_u8)).float(), dim=1).numpy()


def test_folder_hdf5_and_slide_tiles_of_real_tissue_agree(stain_served, tissue_tiles, tmp_path):
    """Real SVS tissue cut into the model's tiles: as a slide, a folder and HDF5 rows, the same answers."""
    import h5py
    from PIL import Image

    from serving.slides.tiling import TilingConfig
    from serving.synth.slide import write_pyramid_tiff
    from tests.integration.test_preprocess_parity import _score

    spec = stain_served.spec
    side = spec.input_hw[0]
    region = tissue_tiles[3][: 4 * side, : 4 * side]
    grid = [[region[r * side:(r + 1) * side, c * side:(c + 1) * side] for c in range(4)] for r in range(4)]
    slide = tmp_path / "slide.tiff"
    write_pyramid_tiff(slide, [np.ascontiguousarray(region)], mpp=spec.trained_mpp or 0.5)
    mask = tmp_path / "all_tissue.png"
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(mask)
    folder = tmp_path / "tiles"
    folder.mkdir()
    for r in range(4):
        for c in range(4):
            Image.fromarray(np.ascontiguousarray(grid[r][c])).save(folder / f"r{r}_c{c}.png")
    with h5py.File(tmp_path / "tiles.h5", "w") as f:
        f.create_dataset("x", data=np.stack([grid[r][c] for r in range(4) for c in range(4)]))
    tiles = _score(spec, stain_served, [slide], tmp_path / "slide.parquet",
                   tiling=TilingConfig(tissue_mask=str(mask), min_tissue=0.01))
    files = _score(spec, stain_served, [folder], tmp_path / "folder.parquet")
    rows = _score(spec, stain_served, [tmp_path / "tiles.h5"], tmp_path / "h5.parquet")
    assert len(tiles) == len(files) == len(rows) == 16
    by_tile = {(k[2], k[1]): v for k, v in tiles.items()}
    for r in range(4):
        for c in range(4):
            p_file = files[(str(folder / f"r{r}_c{c}.png"), None, None)]
            np.testing.assert_allclose(by_tile[(r, c)], p_file, atol=1e-5)
            np.testing.assert_allclose(rows[(f"{tmp_path / 'tiles.h5'}#{r * 4 + c}", None, None)], p_file, atol=1e-5)


# --- The gate ------------------------------------------------------------------------------------------------


def test_the_gate_passes_a_normalised_repository(stain_served):
    from export.check import check_repository

    report = check_repository(stain_served.repo, serve=False)
    from export.check_report import OK

    assert not report.failed(), report.table()
    stain_rows = [r for r in report.rows if r.check == "stain"]
    assert len(stain_rows) == 2, report.table()  # the classifier's graph and the _tta model's
    assert all(r.status == OK and "(macenko)" in r.detail for r in stain_rows), report.table()


@pytest.fixture
def stain_copy(stain_served, tmp_path):
    from tests.fixtures_export import link_copy

    return link_copy(stain_served.repo, tmp_path / "repo"), stain_served.spec


def _rehash(folder):
    from export.manifest import read_manifest, write_manifest

    write_manifest(folder, 1, read_manifest(folder, 1).weights_sha256)


def _edited(norm: dict) -> dict:
    changed = json.loads(json.dumps(norm))
    changed["max_concentrations"][1] = round(changed["max_concentrations"][1] * 1.2, 6)
    return changed


def _failures(repo, model):
    from export.check import check_repository

    report = check_repository(repo, [model], serve=False)
    return {r.check: r.detail for r in report.failed()}


def test_the_gate_fails_a_spec_json_with_another_parameter(stain_copy):
    repo, spec = stain_copy
    folder = repo / spec.name
    (folder / "spec.json").write_text(spec.replace(stain_normalization=_edited(spec.stain_normalization)).to_json())
    _rehash(folder)
    failed = _failures(repo, spec.name)
    assert "field stain_normalization.max_concentrations[1]" in failed["agree"]
    assert "stain_normalization.max_concentrations[1]: the graph says" in failed["stain"], failed


def test_the_gate_fails_a_config_with_another_parameter(stain_copy):
    from google.protobuf import text_format

    from export import triton_config as tc

    repo, spec = stain_copy
    folder = repo / spec.tta_model_name
    path = folder / "configs" / "onnxruntime.pbtxt"
    cfg = tc.read_config(path)
    cfg.parameters[tc.SPEC_PARAMETER].string_value = tc.spec_json(
        spec.replace(stain_normalization=_edited(spec.stain_normalization)))
    path.write_text(text_format.MessageToString(cfg))
    _rehash(folder)
    failed = _failures(repo, spec.tta_model_name)
    assert failed["agree"].startswith("field stain_normalization.max_concentrations[1]: configs/onnxruntime.pbtxt")


def _edit_graph(path, edit):
    import onnx

    model = onnx.load(str(path))
    edit(model)
    path.unlink()  # a link to the shared repository's file
    onnx.save(model, str(path))


def test_the_gate_fails_a_graph_whose_record_or_constants_differ(stain_copy):
    import onnx

    from export.onnx_export import STAIN_METADATA

    repo, spec = stain_copy
    folder = repo / spec.name
    path = folder / "1" / "model.onnx"
    norm = spec.stain_normalization

    def record(model):
        (entry,) = [p for p in model.metadata_props if p.key == STAIN_METADATA]
        entry.value = json.dumps(_edited(norm))

    _edit_graph(path, record)
    _rehash(folder)
    assert "stain_normalization.max_concentrations[1]: the graph says" in _failures(repo, spec.name)["stain"]

    # The record put back, the constant the graph divides by changed: the gate finds it, and the fixture too.
    def constant(model):
        record_back(model)
        want = np.asarray(norm["max_concentrations"], np.float32)
        for init in model.graph.initializer:
            value = onnx.numpy_helper.to_array(init)
            if value.size == 2 and np.allclose(value.ravel(), want):
                init.CopyFrom(onnx.numpy_helper.from_array((value * 1.2).astype(np.float32), init.name))
                return
        raise AssertionError("no max_concentrations constant in the graph")

    def record_back(model):
        (entry,) = [p for p in model.metadata_props if p.key == STAIN_METADATA]
        entry.value = json.dumps(norm, sort_keys=True, separators=(",", ":"))

    _edit_graph(path, constant)
    _rehash(folder)
    failed = _failures(repo, spec.name)
    assert failed["stain"].startswith("stain_normalization.max_concentrations: the graph computes with no constant")
    assert "OUT OF TOLERANCE" in failed["fixture-onnx"]


def test_the_gate_fails_a_graph_without_normalisation_for_a_spec_with_one(stain_copy, exported_repo):
    """A graph of a model without normalisation under this spec: named, and the fixture fails too."""
    import shutil

    repo, spec = stain_copy
    other_repo, other_spec = exported_repo
    folder = repo / spec.name
    if other_spec.input_hw != spec.input_hw:
        pytest.skip("the shared export has another input size")  # pragma: no cover - both are 32 px
    (folder / "1" / "model.onnx").unlink()
    shutil.copyfile(other_repo / other_spec.name / "1" / "model.onnx", folder / "1" / "model.onnx")
    _rehash(folder)
    failed = _failures(repo, spec.name)
    assert failed["stain"] == "stain normalisation: the graph computes none, spec.json says macenko"


# --- Refused before training ---------------------------------------------------------------------------------


def _train_cli(args, capsys):
    from patchserve.cli import main

    code = main(["train", *args])
    return code, capsys.readouterr().err.strip()


def test_a_target_without_tissue_is_refused_before_training(synth_data, tmp_path, capsys):
    from PIL import Image

    glass = tmp_path / "glass.png"
    Image.fromarray(_degenerate()["background"]).save(glass)
    for method in ("macenko", "reinhard"):
        out = tmp_path / f"run_{method}"
        code, err = _train_cli([str(synth_data), "--out", str(out), "--epochs", "1", "--device", "cpu",
                                "--dali-device", "cpu", "--stain-normalize", method, "--stain-target", str(glass)],
                               capsys)
        assert code == 2 and len(err.splitlines()) == 1, err
        assert err.startswith(f"patchserve train: error: --stain-target {glass}: the target holds too little stained tissue: 0.0% of its pixels"), err
        assert not (out / "checkpoint_last.pt").exists()


def test_a_grey_scale_model_and_a_missing_target_are_refused(synth_data, tmp_path, capsys):
    base = [str(synth_data), "--out", str(tmp_path / "run"), "--device", "cpu"]
    code, err = _train_cli([*base, "--stain-normalize", "macenko", "--grayscale-equalize"], capsys)
    assert code == 2 and err == ("patchserve train: error: --stain-normalize: a grey-scale model (--grayscale-equalize) has no "
                                 "stains to normalise")
    code, err = _train_cli([*base, "--stain-normalize", "reinhard", "--stain-target", str(tmp_path / "no.png")],
                           capsys)
    assert code == 2 and err == f"patchserve train: error: --stain-target: no such image {tmp_path / 'no.png'}"
    code, err = _train_cli([*base, "--stain-target", str(tmp_path / "no.png")], capsys)
    assert code == 2 and err == "patchserve train: error: --stain-target: give --stain-normalize METHOD too"
