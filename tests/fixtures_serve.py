"""Fixtures of the serve area.

``triton_server``: the real embedded Triton (``EmbeddedTriton``) serving the
export area's ``exported_repo`` once per session; yields a ``Served`` with
the server, the repository and the spec. Given ``--triton-grpc``,
``--triton-http``, ``--triton-repo`` and ``--triton-model`` (a server started
elsewhere), it serves that one instead and needs neither torch nor the
embedded server: tests marked ``client`` run so in a client-only environment. ``ort_reference``: an in-process
ONNX Runtime session on the same ``model.onnx``, for parity checks.
``other_weights_server``: the same model name, version and spec exported from
another random run (only the weights differ), for the job-fingerprint tests of
both scoring paths. ``many_patches``: an HDF5 file of ``N_MANY`` patches, so
a job is still running when a test acts on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest


@dataclass
class Served:
    server: object  # serving.server.EmbeddedTriton; None for a server started elsewhere
    repo: Path
    spec: object  # serving.core.spec.ModelSpec
    grpc: str
    http: str


@pytest.fixture(scope="session")
def triton_server(request):
    option = request.config.getoption
    if option("--triton-grpc"):
        from serving.core.spec import ModelSpec

        repo = Path(option("--triton-repo"))
        yield Served(None, repo, ModelSpec.load(repo / option("--triton-model") / "spec.json"),
                     option("--triton-grpc"), option("--triton-http"))
        return
    from serving.server.embedded import EmbeddedTriton

    repo, spec = request.getfixturevalue("exported_repo")
    with EmbeddedTriton(repo) as server:
        yield Served(server, Path(repo), spec, server.urls.grpc, server.urls.http)


class OrtReference:
    """The served ONNX graph run in-process: what the server should answer."""

    def __init__(self, onnx_path: Path, spec):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.spec = spec

    def probs(self, images_nhwc_u8: np.ndarray) -> np.ndarray:
        return self.session.run([self.spec.output_name], {self.spec.input_name: images_nhwc_u8})[0]


def find_onnx(repo: Path, spec) -> Path:
    found = sorted((Path(repo) / spec.name).glob("*/model.onnx"))
    assert found, f"no model.onnx under {repo / spec.name}"
    return found[-1]


@pytest.fixture(scope="session")
def ort_reference(triton_server):
    return OrtReference(find_onnx(triton_server.repo, triton_server.spec), triton_server.spec)


N_MANY = 1500  # patches: enough that a job is still running when a test acts on it, on a fast machine too


@pytest.fixture(scope="session")
def other_weights_server(exported_repo, tmp_path_factory):
    """The same model name, version and spec, exported from another random run: only the weights differ."""
    from export.build import export_run
    from serving.server.embedded import EmbeddedTriton
    from training.checkpoint import write_random_run

    _, spec = exported_repo
    run = write_random_run(tmp_path_factory.mktemp("other_run") / "run", spec.replace(version=1), seed=1)
    repo = tmp_path_factory.mktemp("other_repo") / "repo"
    export_run(run, repo, formats=("python",), with_tta=False, with_dali=False, max_batch_size=spec.max_batch_size)
    with EmbeddedTriton(repo) as server:
        yield server


@pytest.fixture(scope="session")
def many_patches(exported_repo, tmp_path_factory):
    import h5py

    _, spec = exported_repo
    path = tmp_path_factory.mktemp("lock_data") / "many_x.h5"
    x = np.random.default_rng(5).integers(0, 256, (N_MANY, *spec.source_hw, 3), dtype=np.uint8)
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=x)
    return path


@pytest.fixture(scope="session")
def mpp_server(tmp_path_factory):
    """A model whose spec says it was trained at 0.5 um/px (64 px input), exported and served: slides are read
    at its resolution."""
    from export.build import export_run
    from serving.core.spec import ModelSpec
    from serving.server.embedded import EmbeddedTriton
    from training.checkpoint import write_random_run

    spec = ModelSpec(name="mpp_model", class_names=("normal", "tumour"), input_height=32, input_width=32,
                     mean=(0.7, 0.5, 0.7), std=(0.15, 0.2, 0.15), max_batch_size=8, trained_mpp=0.5)
    run = write_random_run(tmp_path_factory.mktemp("mpp_run") / "run", spec)
    repo = tmp_path_factory.mktemp("mpp_repo") / "repo"
    export_run(run, repo, formats=("python",), with_tta=False, with_dali=False, max_batch_size=8)
    with EmbeddedTriton(repo) as server:
        yield Served(server, repo, spec, server.urls.grpc, server.urls.http)
