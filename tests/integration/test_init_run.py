"""init-run: local torchvision weights into a run folder without training; export and the gate take it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.features import FEATURE_TOLERANCE, relative_errors
from patchserve.cli import main as cli_main
from serving.core.spec import IMAGENET_MEAN, IMAGENET_STD, ModelSpec
from tests.fixtures_export import EXPORT_MAX_BATCH


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """Random torchvision ResNet18 weights saved locally: what an ImageNet file looks like, nothing downloaded."""
    import torchvision

    torch.manual_seed(3)
    net = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(net.state_dict(), path)
    return path


def _init(run, weights_file, *extra):
    return cli_main(["init-run", str(run), "--pretrained", str(weights_file), "--arch", "resnet18",
                     "--image-size", "32", "--max-batch-size", str(EXPORT_MAX_BATCH), *extra])


def test_features_only_run_from_local_weights_exports_torchvisions_features_and_passes_the_gate(
        weights_file, synth_data, tmp_path, capsys):
    import torchvision

    from export.build import export_run
    from export.check import check_repository
    from export.fixture import load_fixture
    from export.onnx_export import ort_session
    from export.triton_config import read_config
    from training.checkpoint import read_checkpoint

    run, repo = tmp_path / "imagenet_r18", tmp_path / "repo"
    assert _init(run, weights_file, "--data", str(synth_data)) == 0
    spec = ModelSpec.load(run / "spec.json")
    assert spec.class_names == () and spec.features_only
    assert (spec.feature_layer, spec.feature_size) == ("layer4", 512)
    assert (spec.mean, spec.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert "feature_layer" in spec.requires  # a reader that ignores it would find no class to score
    payload = read_checkpoint(run)
    state = torch.load(weights_file, weights_only=True)
    for key, value in payload["model"].items():  # the body is the file's, bit for bit; there is no head
        assert key.startswith(("backbone.", "normalize.")), key
        if key.startswith("backbone."):
            assert torch.equal(value, state[key.removeprefix("backbone.")]), key

    result = export_run(run, repo, formats=("python",), with_tta=True, tta_views="five", with_dali=True,
                        max_batch_size=EXPORT_MAX_BATCH)
    assert result.spec.features_only and result.spec.feature_layer == "layer4"
    assert not (repo / spec.name / "labels.txt").exists()
    for name in (spec.name, spec.tta_model_name, spec.ensemble_model_name):
        assert [(o.name, list(o.dims)) for o in read_config(repo / name / "config.pbtxt").output] == \
            [("features", [512])], name

    # ONNX Runtime's features against torchvision's own ResNet18 (fc dropped) on the same pixels, normalised
    # with the stated ImageNet mean/std: a computation apart from the exported one.
    fixture = load_fixture(repo / spec.name / "1" / "fixture.npz", ("pixels", "features"))
    pixels = fixture["pixels"]
    assert len(pixels) == 32  # images of --data, recorded by the run
    net = torchvision.models.resnet18(weights=None)
    net.load_state_dict(state)
    net.fc = torch.nn.Identity()
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    with torch.no_grad():
        want = net.eval()(x).numpy()
    got = ort_session(repo / spec.name / "1" / "model.onnx").run([spec.features_name],
                                                                 {spec.input_name: pixels})[0]
    rel = relative_errors(got, want)
    with capsys.disabled():
        print(f"init-run ResNet18, ONNX vs torchvision features: max relative error {rel.max():.3g}")
    assert rel.max() <= FEATURE_TOLERANCE["fp32"]

    report = check_repository(repo, run=run)  # static, in-process, the real server, and the run's proof
    assert report.passed, report.table()
    checks = {(r.check, r.model) for r in report.rows if r.status == "ok"}
    for name in (spec.name, spec.tta_model_name, spec.ensemble_model_name):
        assert ("features-serve", name) in checks and ("features-run", name) in checks, name
    assert not [r for r in report.rows if r.check in ("serve", "fixture-onnx") and r.model == spec.name]


def test_classes_give_a_random_head_and_one_class_or_a_wrong_arch_is_refused_naming_the_flag(
        weights_file, tmp_path, capsys):
    from training.checkpoint import read_checkpoint

    assert _init(tmp_path / "two", weights_file, "--classes", "normal,tumour", "--features", "layer3") == 0
    payload = read_checkpoint(tmp_path / "two")
    assert payload["spec"].class_names == ("normal", "tumour") and payload["spec"].feature_size == 256
    assert payload["model"]["head.weight"].shape == (2, 512)
    assert payload["train_config"]["epochs"] == 0
    capsys.readouterr()
    assert _init(tmp_path / "one", weights_file, "--classes", "normal") == 2
    assert "--classes: a classifier needs at least two classes" in capsys.readouterr().err
    assert cli_main(["init-run", str(tmp_path / "r50"), "--pretrained", str(weights_file), "--arch", "resnet50"]) == 2
    assert "is it the right --arch?" in capsys.readouterr().err
    assert _init(tmp_path / "two", weights_file) == 2  # a run folder is never replaced silently
    assert "already holds a checkpoint; pass --overwrite" in capsys.readouterr().err


def test_a_features_only_run_scores_a_slide_with_its_features_alone_and_torchvisions_vectors(
        weights_file, synth_data, synth_slide, tmp_path, capsys):
    """The whole path of issue 27 for pretrained weights: init-run, export, the real server, score --features."""
    import h5py
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torchvision

    from export.build import export_run
    from serving.server.embedded import EmbeddedTriton
    from serving.slides.wsi import open_slide

    run, repo = tmp_path / "imagenet_r18", tmp_path / "repo"
    assert _init(run, weights_file, "--data", str(synth_data)) == 0
    spec = export_run(run, repo, formats=("python",), with_tta=False, with_dali=False,
                      max_batch_size=EXPORT_MAX_BATCH).spec
    slide = synth_slide / "slides" / "slide_0.tiff"
    out = tmp_path / "scores" / "feats.parquet"
    args = ["score", str(slide), "--model", spec.name, "--out", str(out), "--no-progress", "--stride", "96"]
    with EmbeddedTriton(repo) as server:
        url = ["--url", server.urls.grpc]
        capsys.readouterr()
        assert cli_main([*args, *url]) == 2  # no probabilities to score without --features
        assert f"--model {spec.name}: a features-only model" in capsys.readouterr().err
        assert not out.exists()
        assert cli_main([*args, *url, "--features"]) == 0
    table = pq.read_table(out)
    n = table.num_rows
    assert n > 50 and not [c for c in table.column_names if c.startswith("prob_")]
    assert table.schema.field("features").type == pa.list_(pa.float32(), 512)
    # The features file and nothing drawn from probabilities (no heatmap, no GeoJSON).
    h5_path = out.with_name("feats.slide_0.features.h5")
    assert h5_path.exists() and not list(out.parent.glob("*.heatmap.png")) and not list(out.parent.glob("*.geojson"))
    with h5py.File(h5_path, "r") as f:
        coords, feats = f["coords"][:], f["features"][:]
        assert f["features"].attrs["feature_layer"] == "layer4" and f["coords"].attrs["patch_size"] == 32
    col = table.column("features").combine_chunks()
    np.testing.assert_array_equal(feats, col.flatten().to_numpy().reshape(n, 512))
    assert coords.tolist() == [[x, y] for x, y in zip(table.column("x").to_pylist(), table.column("y").to_pylist())]

    # A few tiles through torchvision's own ResNet18 with the file's weights (fc dropped), ImageNet-normalised.
    picked = np.linspace(0, n - 1, 8).round().astype(int)
    wsi = open_slide(slide)
    try:
        tiles = np.stack([np.asarray(wsi.read_region(tuple(int(v) for v in coords[i]), 0, (32, 32)).convert("RGB"))
                          for i in picked])
    finally:
        wsi.close()
    net = torchvision.models.resnet18(weights=None)
    net.load_state_dict(torch.load(weights_file, weights_only=True))
    net.fc = torch.nn.Identity()
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    with torch.no_grad():
        want = net.eval()(x).numpy()
    rel = relative_errors(feats[picked], want)
    with capsys.disabled():
        print(f"\ninit-run ResNet18 served on a slide vs torchvision: max relative error {rel.max():.3g}")
    assert rel.max() <= FEATURE_TOLERANCE["fp32"]
