"""The exported repository on the real embedded Triton server (python flavours)."""

from __future__ import annotations


import numpy as np
import pytest

from export.build import encode
from export.onnx_export import ort_session
from export.patches import centre_crop, source_patch
from serving.core.imageio import load_rgb_u8

# DALI and PIL resize differ by a grey level or two (see the unit test), which
# moves a random classifier's probabilities by ~1e-3.
ENSEMBLE_PROB_ATOL = 0.02


@pytest.fixture(scope="module")
def server(exported_repo):
    from serving.server.embedded import EmbeddedTriton

    repo, _ = exported_repo
    with EmbeddedTriton(repo) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(server.urls.grpc)
    yield c
    c.close()


def _infer(client, model, name, array, outputs, **out_kw):
    import tritonclient.grpc as grpcclient

    t = grpcclient.InferInput(name, list(array.shape), "UINT8")
    t.set_data_from_numpy(array)
    return client.infer(model, [t], outputs=[grpcclient.InferRequestedOutput(o, **out_kw) for o in outputs])


def _patches(synth_data, n=4):
    return [load_rgb_u8(p) for p in sorted((synth_data / "test").glob("*/*.png"))[::4][:n]]


def test_server_tta_equals_client_tta_on_the_classifier(exported_repo, client, synth_data):
    from serving.core.views import combine_views, make_views, num_views

    repo, spec = exported_repo
    src = np.stack([source_patch(p, spec) for p in _patches(synth_data)])
    got = _infer(client, spec.tta_model_name, spec.input_name, src, [spec.output_name]).as_numpy(spec.output_name)
    session = ort_session(repo / spec.name / "1" / "model.onnx")
    views = make_views(src, "five", spec.input_hw)
    want = combine_views(session.run([spec.output_name], {spec.input_name: views})[0], num_views("five"))
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_encoded_files_through_the_ensemble_give_the_class_of_decoded_pixels(exported_repo, client, synth_data, fmt):
    repo, spec = exported_repo
    session = ort_session(repo / spec.name / "1" / "model.onnx")
    for image in _patches(synth_data):
        data = encode(image, fmt)
        row = np.frombuffer(data, dtype=np.uint8)[None]
        got = _infer(client, spec.ensemble_model_name, spec.encoded_name, row, [spec.output_name])
        got = got.as_numpy(spec.output_name)
        pixels = centre_crop(load_rgb_u8(data), spec)[None]
        want = session.run([spec.output_name], {spec.input_name: pixels})[0]
        assert got.argmax(1).tolist() == want.argmax(1).tolist()
        np.testing.assert_allclose(got, want, atol=ENSEMBLE_PROB_ATOL)


def test_preprocess_model_returns_the_classifier_input_within_two_grey_levels(exported_repo, client, synth_data):
    _, spec = exported_repo
    image = _patches(synth_data, 1)[0]
    data = encode(image, "PNG")
    row = np.frombuffer(data, dtype=np.uint8)[None]
    got = _infer(client, spec.preprocess_model_name, spec.encoded_name, row, [spec.input_name])
    got = got.as_numpy(spec.input_name)
    assert got.shape == (1, *spec.input_hw, 3) and got.dtype == np.uint8
    assert int(np.abs(got[0].astype(int) - centre_crop(image, spec).astype(int)).max()) <= 2


def test_undecodable_bytes_fail_only_their_request_and_the_ensemble_keeps_serving(exported_repo, client, synth_data):
    from tritonclient.utils import InferenceServerException

    _, spec = exported_repo
    bad = np.frombuffer(b"not an image at all", dtype=np.uint8)[None]
    with pytest.raises(InferenceServerException, match="cannot decode the image bytes"):
        _infer(client, spec.ensemble_model_name, spec.encoded_name, bad, [spec.output_name])
    good = np.frombuffer(encode(_patches(synth_data, 1)[0], "PNG"), dtype=np.uint8)[None]
    out = _infer(client, spec.ensemble_model_name, spec.encoded_name, good, [spec.output_name])
    assert out.as_numpy(spec.output_name).shape == (1, spec.num_classes)


def test_classification_extension_returns_class_names_from_labels_file(exported_repo, client):
    _, spec = exported_repo
    x = np.zeros((2, *spec.input_hw, 3), dtype=np.uint8)
    out = _infer(client, spec.name, spec.input_name, x, [spec.output_name], class_count=spec.num_classes)
    names = {entry.decode().split(":")[2] for entry in out.as_numpy(spec.output_name).ravel()}
    assert names == set(spec.class_names)


def test_server_model_configs_carry_the_spec_for_the_client(exported_repo, client):
    from serving.core.spec import ModelSpec

    _, spec = exported_repo
    for name in (spec.name, spec.tta_model_name, spec.preprocess_model_name, spec.ensemble_model_name):
        cfg = client.get_model_config(name, as_json=True)["config"]
        assert ModelSpec.from_json(cfg["parameters"]["patchserve_spec"]["string_value"]) == spec
    tta = client.get_model_config(spec.tta_model_name, as_json=True)["config"]
    assert tta["parameters"]["tta_views"]["string_value"] == "five"
    assert int(client.get_model_config(spec.name, as_json=True)["config"]["max_batch_size"]) == 8


def test_model_config_name_picks_a_flavour_from_the_configs_folder(exported_repo, tmp_path):
    """tritonserver 2.51 supports --model-config-name: configs/<flavour>.pbtxt replaces config.pbtxt."""
    import tritonclient.grpc as grpcclient

    from serving.server.embedded import EmbeddedTriton
    from tests.fixtures_export import link_copy

    repo, spec = exported_repo
    only = tmp_path / "repo"
    only.mkdir()
    folder = link_copy(repo / spec.name, only / spec.name)
    (folder / "config.pbtxt").rename(folder / "configs" / "python.pbtxt")
    (folder / "configs" / "onnxruntime.pbtxt").unlink(missing_ok=True)
    with EmbeddedTriton(only, extra_args=("--model-config-name=python",)) as s:
        c = grpcclient.InferenceServerClient(s.urls.grpc)
        assert c.is_model_ready(spec.name)
        x = np.zeros((3, *spec.input_hw, 3), dtype=np.uint8)
        out = _infer(c, spec.name, spec.input_name, x, [spec.output_name]).as_numpy(spec.output_name)
        want = ort_session(repo / spec.name / "1" / "model.onnx").run([spec.output_name], {spec.input_name: x})[0]
        np.testing.assert_allclose(out, want, atol=1e-5)
        c.close()
