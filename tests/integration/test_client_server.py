"""PatchClient against the real embedded Triton serving the exported repository."""

from __future__ import annotations

import numpy as np
import pytest

from serving.client.patch_client import PatchClient
from serving.core.errors import BadInputError, ModelNotFoundError, ServerUnavailableError, SpecMismatchError
from serving.server.embedded import free_port

# The client's own tests: they run in the main environment and, by tests/integration/test_client_install.py,
# in a Python 3.12 environment holding the client extra only (numpy 2), against this environment's server.
pytestmark = pytest.mark.client

# The server runs the same ONNX graph with the same ONNX Runtime; only batching
# differs, which moves float sums by a few ulps.
ATOL = 1e-5


def _patches(spec, n, hw, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *hw, 3), dtype=np.uint8)


def _hand_views(src, mode, crop):
    """The TTA views sliced by hand (not through serving.core.views), patch-major."""
    (sh, sw), (ch, cw) = src.shape[1:3], crop
    t, l = int(round((sh - ch) / 2)), int(round((sw - cw) / 2))
    centre = src[:, t:t + ch, l:l + cw]
    corners = [src[:, :ch, :cw], src[:, :ch, sw - cw:], src[:, sh - ch:, :cw], src[:, sh - ch:, sw - cw:], centre]
    views = {"none": [centre], "flip": [centre, centre[:, :, ::-1]], "five": corners,
             "ten": corners + [v[:, :, ::-1] for v in corners]}[mode]
    return np.stack(views, axis=1)  # N x V x h x w x 3


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_client_probabilities_equal_onnxruntime_in_process(triton_server, ort_reference, protocol):
    spec = triton_server.spec
    x = _patches(spec, 11, spec.input_hw)
    url = triton_server.grpc if protocol == "grpc" else triton_server.http
    with PatchClient(url, spec.name, protocol=protocol, expected_spec=spec) as client:
        probs = client.predict(x)
    np.testing.assert_allclose(probs, ort_reference.probs(x), atol=ATOL)
    assert probs.dtype == np.float32 and probs.shape == (11, spec.num_classes)


@pytest.mark.parametrize("mode", ["none", "flip", "five", "ten"])
def test_client_tta_equals_views_averaged_in_numpy(triton_server, ort_reference, mode):
    spec = triton_server.spec
    src = _patches(spec, 3, spec.source_hw, seed=1)
    with PatchClient(triton_server.grpc, spec.name, concurrency=3) as client:
        probs = client.predict(src, tta=mode)
    views = _hand_views(src, mode, spec.input_hw)
    n, v = views.shape[:2]
    expected = ort_reference.probs(np.ascontiguousarray(views.reshape(n * v, *views.shape[2:])))
    np.testing.assert_allclose(probs, expected.reshape(n, v, -1).mean(axis=1), atol=ATOL)


def test_server_tta_equals_client_five_crop(triton_server):
    spec = triton_server.spec
    src = _patches(spec, 5, spec.source_hw, seed=2)
    with PatchClient(triton_server.http, spec.name, protocol="http") as client:
        np.testing.assert_allclose(client.predict(src, tta="server"), client.predict(src, tta="five"), atol=ATOL)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_order_is_kept_with_many_requests_in_flight(triton_server, ort_reference, protocol):
    spec = triton_server.spec
    x = _patches(spec, 50, spec.input_hw, seed=3)
    url = triton_server.grpc if protocol == "grpc" else triton_server.http
    with PatchClient(url, spec.name, protocol=protocol, concurrency=8, batch_size=4) as client:
        assert client.request_rows() == 4
        probs = client.predict(x)
    expected = ort_reference.probs(x)
    np.testing.assert_allclose(probs, expected, atol=ATOL)
    assert len({tuple(np.round(p, 6)) for p in expected}) == 50  # distinct rows: a swap would show


def test_shared_memory_gives_the_same_probabilities(triton_server, ort_reference):
    spec = triton_server.spec
    x = _patches(spec, 13, spec.input_hw, seed=4)
    with PatchClient(triton_server.grpc, spec.name, shared_memory=True, concurrency=2, batch_size=4) as client:
        probs = client.predict(x)
    np.testing.assert_allclose(probs, ort_reference.probs(x), atol=ATOL)


def test_spec_mismatch_and_unknown_model_raise_typed_errors(triton_server):
    spec = triton_server.spec
    with pytest.raises(SpecMismatchError, match=f"input_height: server has {spec.input_height}, expected 99"):
        PatchClient(triton_server.grpc, spec.name, expected_spec={"input_height": 99})
    other = spec.replace(class_names=("benign", "malignant"))
    with pytest.raises(SpecMismatchError, match="class_names: server has"):
        PatchClient(triton_server.http, spec.name, protocol="http", expected_spec=other)
    with pytest.raises(ModelNotFoundError, match=r"--model no_such_model: .* it does not list its models to clients"):
        PatchClient(triton_server.grpc, "no_such_model")


def test_wrong_images_are_refused_before_sending(triton_server):
    spec = triton_server.spec
    with PatchClient(triton_server.grpc, spec.name) as client:
        with pytest.raises(BadInputError, match="expected dtype uint8"):
            client.predict(np.zeros((2, *spec.input_hw, 3), np.float32))


def test_no_server_raises_unavailable_after_retries():
    port = free_port()
    with pytest.raises(ServerUnavailableError, match=rf"--url 127.0.0.1:{port}: no Triton server answered over grpc after 2 attempts"):
        PatchClient(f"127.0.0.1:{port}", "m", retries=1, backoff_s=0.01, timeout_s=2.0)
