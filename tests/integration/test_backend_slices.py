"""The ONNX backend's slice queue, on the real server: requests merged into batches, their slices run by the
workers while the next batch is queued, and every request answered with its own rows through its response
sender; a slice that fails fails its batch's requests and the backend goes on serving."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from serving.core.errors import InferenceError
from tests.fixtures_export import link_copy
from tests.fixtures_serve import OrtReference, find_onnx

ATOL = 1e-5
MARK = 7  # a patch whose first pixel is (7, 7, 7) makes ONNX Runtime fail in the failing copy
SIZES = (1, 3, 8, 5, 2, 7, 4, 6)  # rows per request, at most the test model's batch: some get merged

# Appended to the backend's model.py: the session fails on a slice holding a marked patch.
FAILING_PATCH = f'''

_initialize = TritonPythonModel.initialize


class _FailingSession:
    def __init__(self, session):
        self.session = session

    def run(self, names, feeds):
        x = next(iter(feeds.values()))
        if (x[:, 0, 0] == {MARK}).all(axis=-1).any():
            raise RuntimeError("marked patch in this slice")
        return self.session.run(names, feeds)


def _initialize_failing(self, args):
    _initialize(self, args)
    self.session = _FailingSession(self.session)


TritonPythonModel.initialize = _initialize_failing
'''


def _patches(spec, n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).integers(0, 256, (n, *spec.input_hw, 3), dtype=np.uint8)
    x[:, 0, 0] = np.where(x[:, 0, 0] == MARK, MARK + 1, x[:, 0, 0])  # no patch is marked by chance
    return x


def test_concurrent_requests_of_many_sizes_each_get_their_own_rows(triton_server, ort_reference):
    from serving.client.patch_client import PatchClient

    spec = triton_server.spec
    with PatchClient(triton_server.grpc, spec.name, concurrency=8) as client:
        assert client.info.max_batch_size >= max(SIZES)
        arrays = [_patches(spec, SIZES[i % len(SIZES)], seed=i) for i in range(48)]
        window = [client.submit(client.info, a) for a in arrays[:8]]
        got = []
        for a in arrays[8:]:
            got.append(window.pop(0).result())
            window.append(client.submit(client.info, a))
        got += [p.result() for p in window]
    for a, probs in zip(arrays, got, strict=True):
        assert probs.shape == (len(a), spec.num_classes)
        np.testing.assert_allclose(probs, ort_reference.probs(a), atol=ATOL)


@pytest.fixture(scope="module")
def failing_server(exported_repo, tmp_path_factory):
    from serving.server.embedded import EmbeddedTriton

    src, spec = exported_repo
    repo = tmp_path_factory.mktemp("failing_repo")
    model = link_copy(Path(src) / spec.name, repo / spec.name)
    config = (model / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and re.search(r"^name: ", config, flags=re.M)
    model_py = model / "1" / "model.py"
    model_py.write_text(model_py.read_text() + FAILING_PATCH)
    with EmbeddedTriton(repo) as server:
        yield server, spec, OrtReference(find_onnx(repo, spec), spec)


def test_a_failing_slice_fails_its_requests_and_the_backend_keeps_serving(failing_server):
    """More failing batches than the backend holds at once (AHEAD): a batch whose answer never came would
    keep its place and the good request after them would wait until the client's deadline."""
    from serving.client.patch_client import PatchClient
    from serving.server.backends.onnx_model import AHEAD

    server, spec, reference = failing_server
    with PatchClient(server.urls.grpc, spec.name, concurrency=1, timeout_s=30, retries=0) as client:
        for i in range(AHEAD + 2):
            marked = _patches(spec, 8, seed=100 + i)
            marked[i % 8, 0, 0] = MARK
            with pytest.raises(InferenceError, match="onnxruntime failed: marked patch in this slice"):
                client.submit(client.info, marked).result()
        good = _patches(spec, 8, seed=200)
        np.testing.assert_allclose(client.submit(client.info, good).result(), reference.probs(good), atol=ATOL)
