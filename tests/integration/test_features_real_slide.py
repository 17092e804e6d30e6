"""``score --features`` on the real Aperio SVS through the real server, its HDF5 read the way CLAM and TRIDENT read it.

CLAM's ``Whole_Slide_Bag_FP`` (dataset_modules/dataset_h5.py) takes ``patch_level`` and ``patch_size`` from the
``coords`` attributes and reads each tile with OpenSlide at its coordinates; TRIDENT's ``read_coords`` and
``WSI.extract_slide_features`` (trident/IO.py, trident/wsi_objects/WSI.py) take ``coords``, ``features`` and the
``coords`` attributes as they are. Tiles read so are fed to ONNX Runtime (the served graph) and to a torchvision
ResNet with the run's weights under CLAM's eval transforms; both must give the served vectors.
"""

from __future__ import annotations

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from export.features import FEATURE_TOLERANCE, relative_errors
from patchserve.cli import main as cli
from tests.fixtures_serve import find_onnx

STRIDE = 96  # 32-px tiles every 96 px of level 0: about 300 of the SVS's tissue tiles, not 3,000
SAMPLED = 12  # tiles recomputed in this process
NAME = "cmu_small_region"


@pytest.fixture(scope="module")
def scored_svs(triton_server, real_svs, tmp_path_factory):
    out = tmp_path_factory.mktemp("real_features") / "svs.parquet"
    assert cli(["score", str(real_svs), "--url", triton_server.grpc, "--model", triton_server.spec.name,
                "--out", str(out), "--no-progress", "--stride", str(STRIDE), "--features"]) == 0
    return out, pq.read_table(out)


def _clam_tiles(wsi, h5_path, indices) -> np.ndarray:
    """Tiles as CLAM's Whole_Slide_Bag_FP.__getitem__ reads them: the coords file opened per item."""
    with h5py.File(h5_path, "r") as f:
        patch_level, patch_size = f["coords"].attrs["patch_level"], f["coords"].attrs["patch_size"]
    tiles = []
    for i in indices:
        with h5py.File(h5_path, "r") as f:
            coord = f["coords"][i]
        tiles.append(np.asarray(wsi.read_region(tuple(int(v) for v in coord), int(patch_level),
                                                (int(patch_size), int(patch_size))).convert("RGB")))
    return np.stack(tiles)


def _torchvision_features(run, spec, tiles: np.ndarray) -> np.ndarray:
    """The run's weights in a plain torchvision ResNet (fc dropped: the pooled body), under CLAM's
    get_eval_transforms (ToTensor, Normalize by the spec's mean/std): a computation apart from the export's."""
    import torch
    import torchvision
    from torchvision import transforms

    from training.checkpoint import read_checkpoint

    state = read_checkpoint(run)["model"]
    net = getattr(torchvision.models, spec.arch)(weights=None)
    net.fc = torch.nn.Identity()
    net.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")
                         and not k.startswith("backbone.fc.")})
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)])
    batch = torch.stack([transform(t) for t in tiles])
    with torch.inference_mode():
        return net.eval()(batch).numpy()


def test_the_svs_features_file_reads_as_clams_and_tridents_loaders_read_it_and_holds_the_served_vectors(
        scored_svs, real_svs, triton_server, export_run_dir, capsys):
    import onnxruntime as ort

    from serving.slides.wsi import open_slide

    out, table = scored_svs
    spec = triton_server.spec
    h5_path = out.with_name(f"{out.stem}.{NAME}.features.h5")
    n = table.num_rows
    assert n > 200 and set(table.column("slide").to_pylist()) == {NAME}
    assert table.schema.field("features").type == pa.list_(pa.float32(), spec.feature_size)
    col = table.column("features").combine_chunks()
    parquet_feats = col.flatten().to_numpy().reshape(n, spec.feature_size)

    # TRIDENT: read_coords, then extract_slide_features' reads of the features file.
    with h5py.File(h5_path, "r") as f:
        attrs, coords = dict(f["coords"].attrs), f["coords"][:]
        feats = f["features"][:]
        fattrs = dict(f["features"].attrs)
    assert coords.shape == (n, 2) and np.issubdtype(coords.dtype, np.integer)
    assert feats.shape == (n, spec.feature_size) and feats.dtype == np.float32
    assert coords.tolist() == [[x, y] for x, y in zip(table.column("x").to_pylist(), table.column("y").to_pylist())]
    np.testing.assert_array_equal(feats, parquet_feats)
    h, w = spec.input_hw
    assert (attrs["patch_size"], attrs["patch_level"], attrs["patch_size_level0"]) == (w, 0, w)
    assert attrs["patch_size"] - attrs["overlap"] == STRIDE  # TRIDENT's step: patch_size - overlap
    # 0.499 um/px, as the SVS records it; read at its own resolution (the spec names none).
    assert attrs["level0_magnification"] == attrs["target_magnification"] == round(10 / 0.499, 4)
    assert (attrs["level0_width"], attrs["level0_height"], attrs["name"]) == (2220, 2967, NAME)
    assert list(attrs["downsample"]) == [1.0, 1.0] and list(attrs["level_dim"]) == [2220, 2967]
    assert int(attrs["patch_size_level0"]) == w  # what TRIDENT's slide encoders cast to int
    assert (fattrs["name"], fattrs["encoder"], fattrs["feature_layer"]) == (NAME, spec.name, "layer4")
    x0, y0 = coords.min(0)
    x1, y1 = coords.max(0)
    assert 0 <= x0 and 0 <= y0 and x1 + w <= 2220 and y1 + h <= 2967

    # CLAM: the tiles its loader reads at those coordinates, through the served graph in this process and through
    # torchvision with the run's weights.
    indices = np.linspace(0, n - 1, SAMPLED).round().astype(int)
    wsi = open_slide(real_svs)
    try:
        tiles = _clam_tiles(wsi, h5_path, indices)
    finally:
        wsi.close()
    assert tiles.shape == (SAMPLED, h, w, 3) and tiles.std() > 10  # tissue, not blank glass
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(find_onnx(triton_server.repo, spec)), options,
                                   providers=["CPUExecutionProvider"])
    onnx = session.run([spec.features_name], {spec.input_name: tiles})[0]
    torch_feats = _torchvision_features(export_run_dir, spec, tiles)
    rel_onnx = relative_errors(feats[indices], onnx)
    rel_torch = relative_errors(feats[indices], torch_feats)
    with capsys.disabled():
        print(f"\nreal SVS, {SAMPLED} of {n} tiles: served vs ONNX Runtime max relative error {rel_onnx.max():.3g}, "
              f"vs torchvision {rel_torch.max():.3g} (fp32 tolerance {FEATURE_TOLERANCE['fp32']:g})")
    assert rel_onnx.max() <= FEATURE_TOLERANCE["fp32"]
    assert rel_torch.max() <= FEATURE_TOLERANCE["fp32"]
