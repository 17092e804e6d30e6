"""The features output: export gives the classifier, _tta and the ensemble PyTorch's pooled features beside
the probabilities, the fixture holds them, and check-export holds the graph and the server to them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from export.check import check_model, check_repository
from export.features import FEATURE_TOLERANCE, relative_errors
from export.fixture import load_fixture, save_fixture
from export.manifest import read_manifest, write_manifest
from export.onnx_export import ort_session
from export.triton_config import read_config
from tests.fixtures_export import EXPORT_MAX_BATCH, link_copy


def _rehash(folder, version=1):
    write_manifest(folder, version, read_manifest(folder, version).weights_sha256)


def _torch_classifier(run):
    from training.checkpoint import read_checkpoint
    from training.model import build_model

    payload = read_checkpoint(run)
    model = build_model(payload["spec"], payload["model_config"])
    model.load_state_dict(payload["model"])
    return model.eval()


def _pooled(classifier, pixels, layer):
    """The global average pool of a torchvision block's output, through forward hooks on the plain
    torchvision modules: a computation apart from the one export traces."""
    import torch

    seen = {}
    block = getattr(classifier.backbone, layer)
    handle = block.register_forward_hook(lambda m, i, o: seen.__setitem__("x", o))
    with torch.no_grad():
        classifier(torch.from_numpy(pixels))
    handle.remove()
    return seen["x"].float().mean(dim=(2, 3)).numpy()


@pytest.fixture(scope="module")
def classifier_only(export_run_dir, synth_data, tmp_path_factory):
    """Export the run three ways (classifier only, python flavour): features layer3, none."""
    from export.build import export_run

    def export(features):
        repo = tmp_path_factory.mktemp(f"features_{features}") / "repo"
        result = export_run(export_run_dir, repo, formats=("python",), with_tta=False, with_dali=False,
                            max_batch_size=EXPORT_MAX_BATCH, data=synth_data, features=features)
        return repo, result

    return export


def test_default_export_serves_layer4_features_equal_to_pytorch_within_the_fp32_tolerance(
        exported_repo, export_run_dir):
    repo, spec = exported_repo
    assert (spec.feature_layer, spec.feature_size) == ("layer4", 512)  # resnet18's last block
    stored = json.loads((repo / spec.name / "spec.json").read_text())
    assert (stored["feature_layer"], stored["feature_size"]) == ("layer4", 512)
    assert "feature_layer" not in stored["requires"]  # a classifier's inputs and probabilities are unchanged
    for name in (spec.name, spec.tta_model_name, spec.ensemble_model_name):
        (out,) = [o for o in read_config(repo / name / "config.pbtxt").output if o.name == spec.features_name]
        assert list(out.dims) == [512] and not out.label_filename, name
    fixture = load_fixture(repo / spec.name / "1" / "fixture.npz", ("pixels", "logits", "features"))
    pixels = fixture["pixels"]
    want = _pooled(_torch_classifier(export_run_dir), pixels, "layer4")
    # The fixture holds PyTorch's features of its images...
    assert relative_errors(fixture["features"], want).max() <= 1e-6
    # ...and ONNX Runtime's graph gives them within the stated fp32 tolerance.
    session = ort_session(repo / spec.name / "1" / "model.onnx")
    got = np.concatenate([session.run([spec.features_name], {spec.input_name: pixels[i:i + 8]})[0]
                          for i in range(0, len(pixels), 8)])
    rel = relative_errors(got, want)
    print(f"ONNX vs PyTorch layer4 features ({len(rel)} images): max relative error {rel.max():.3g}")
    assert got.shape == (32, 512) and got.dtype == np.float32
    assert rel.max() <= FEATURE_TOLERANCE["fp32"]
    # The TTA model's features are the mean over its views of the classifier's.
    tta = load_fixture(repo / spec.tta_model_name / "1" / "fixture.npz", ("sources", "features"))
    tta_got = ort_session(repo / spec.tta_model_name / "1" / "model.onnx").run(
        [spec.features_name], {spec.input_name: tta["sources"][:8]})[0]
    assert relative_errors(tta_got, tta["features"][:8]).max() <= FEATURE_TOLERANCE["fp32"]


def test_layer3_on_request_gives_the_third_blocks_pooled_output_and_passes_the_gate(
        classifier_only, export_run_dir):
    repo, result = classifier_only("layer3")
    spec = result.spec
    assert (spec.feature_layer, spec.feature_size) == ("layer3", 256)
    fixture = load_fixture(repo / spec.name / "1" / "fixture.npz", ("pixels", "features"))
    want = _pooled(_torch_classifier(export_run_dir), fixture["pixels"], "layer3")
    assert fixture["features"].shape == (32, 256)
    assert relative_errors(fixture["features"], want).max() <= 1e-6
    rows = {r.check: r for r in check_repository(repo, serve=False).rows if r.model == spec.name}
    assert rows["features-onnx"].status == "ok", rows["features-onnx"]
    assert "tolerance fp32: 0.0001" in rows["features-onnx"].detail
    assert all(r.status != "FAIL" for r in rows.values()), [r for r in rows.values() if r.status == "FAIL"]


def test_export_without_features_keeps_the_spec_and_configs_of_a_model_from_before_features(
        classifier_only):
    repo, result = classifier_only("none")
    spec = result.spec
    assert not spec.has_features
    stored = json.loads((repo / spec.name / "spec.json").read_text())
    # Written as a spec from before the features fields existed: the same bytes, the same hash.
    assert not {"feature_layer", "feature_size", "features_name"} & set(stored)
    assert [o.name for o in read_config(repo / spec.name / "config.pbtxt").output] == [spec.output_name,
                                                                                       spec.logits_name]
    assert "features" not in np.load(repo / spec.name / "1" / "fixture.npz").files
    report = check_repository(repo, serve=False)
    assert report.failed() == [], report.table()
    assert not [r for r in report.rows if r.check.startswith("features")]


def test_the_gate_fails_a_fixture_whose_features_were_damaged_or_removed(exported_repo, tmp_path):
    repo, spec = exported_repo
    broken = link_copy(repo, tmp_path / "repo")
    path = broken / spec.name / "1" / "fixture.npz"
    arrays = dict(np.load(path))
    save_fixture(path, {**arrays, "features": arrays["features"] * np.float32(1.001)})
    _rehash(broken / spec.name)
    report = check_repository(broken, [spec.name], serve=False)
    (row,) = report.failed("features-onnx")
    assert row.model == spec.name and "OUT OF TOLERANCE" in row.detail
    assert [r.check for r in report.failed()] == ["features-onnx"], report.table()  # the logits still pass
    del arrays["features"]
    save_fixture(path, arrays)
    _rehash(broken / spec.name)
    (row,) = check_repository(broken, [spec.name], serve=False).failed("fixture")
    assert "features" in row.detail


def _scale_features_output(path, factor):
    """Route the graph's features output through a Mul by ``factor``: the graph another export would not make."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    for node in graph.node:  # the head reads the same tensor: it keeps reading the undamaged one
        node.output[:] = ["features_raw" if o == "features" else o for o in node.output]
        node.input[:] = ["features_raw" if i == "features" else i for i in node.input]
    graph.initializer.append(numpy_helper.from_array(np.array(factor, np.float32), "features_scale"))
    graph.node.append(helper.make_node("Mul", ["features_raw", "features_scale"], ["features"]))
    path.unlink()  # the copy links the weights to the shared repository
    onnx.save(model, str(path))


def test_the_gate_fails_a_graph_whose_features_output_was_damaged(exported_repo, tmp_path):
    repo, spec = exported_repo
    broken = link_copy(repo, tmp_path / "repo")
    _scale_features_output(broken / spec.name / "1" / "model.onnx", 1.001)
    _rehash(broken / spec.name)
    report = check_repository(broken, [spec.name], serve=False)
    assert [r.check for r in report.failed()] == ["features-onnx"], report.table()
    assert "OUT OF TOLERANCE" in report.failed("features-onnx")[0].detail


def test_the_real_server_check_compares_the_served_features_with_the_fixture(exported_repo):
    """The served features against the fixture's: the stored ones pass, the same ones moved by 0.1% fail."""
    from export.check_server import server_rows

    repo, spec = exported_repo
    needs = [check_model(repo / name)[1] for name in (spec.name, spec.preprocess_model_name,
                                                      spec.ensemble_model_name)]
    moved = dict(needs[2])
    moved["expected_features"] = needs[2]["expected_features"] * np.float32(1.001)
    rows = server_rows(repo, [needs[0], needs[1], moved])
    status = {(r.check, r.model): r for r in rows}
    assert status[("features-serve", spec.name)].status == "ok", status[("features-serve", spec.name)]
    assert status[("serve", spec.ensemble_model_name)].status == "ok"
    bad = status[("features-serve", spec.ensemble_model_name)]
    assert bad.status == "FAIL" and "OUT OF TOLERANCE" in bad.detail
