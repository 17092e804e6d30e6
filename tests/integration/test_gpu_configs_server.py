"""The GPU flavours' configs, checked by the real Triton server that has none of their backends.

The embedded tritonserver carries the Python backend only, but it reads and
validates every config it is asked to load before it looks for the backend
library: it parses the text (``ReadTextProto``), normalises it, runs
``ValidateModelConfig`` (name, platform / backend pair, max batch size,
version policy, dynamic batcher's preferred sizes, ensemble scheduling) and,
with ``--disable-auto-complete-config`` (nothing left for a backend to
fill in), ``ValidateModelIOConfig`` (every input and output: data type,
dims, reshape), and holds the config's name to its folder. Only then does
``TritonModel::Create`` look for ``libtriton_onnxruntime.so`` (or the
DALI backend's) and stop. Not checked before that point: instance groups
(KIND_GPU), warm-up, the backend's own checks of the ONNX or DALI file
against the config, and an ensemble's steps against the configs of the
models they call (Triton validates those only once the steps have loaded).

So loading the repository with ``--model-config-name onnxruntime`` here
must fail for every model only because its backend library is missing,
never because of its config; a broken config fails differently, and the
last test shows that the check tells the two apart.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from serving.core.errors import ModelLoadError
from serving.server.embedded import EmbeddedTriton, free_port
from tests.fixtures_export import link_copy

GPU_FLAVOUR = ("--model-config-name=onnxruntime", "--disable-auto-complete-config")


def _missing(backend: str) -> str:
    return (f"Invalid argument: unable to find backend library for backend '{backend}', try specifying runtime "
            "on the model configuration.")


def _load_failures(repo, tmp_path) -> dict:
    server = EmbeddedTriton(repo, workdir=tmp_path / "work", extra_args=GPU_FLAVOUR)
    t0 = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        server.start()
    assert time.monotonic() - t0 < 60  # at once, not after the 120 s start-up timeout
    assert not server.alive()  # stopped, not left running half loaded
    return {f.name: f for f in info.value.failures}, str(info.value)


def test_every_gpu_flavour_config_fails_only_for_want_of_its_backend_library(exported_repo, tmp_path):
    repo, spec = exported_repo
    failures, message = _load_failures(repo, tmp_path)
    assert set(failures) == {spec.name, spec.tta_model_name, spec.preprocess_model_name, spec.ensemble_model_name}
    # The classifier and the TTA model (onnxruntime backend), the preprocessing model (DALI backend) passed
    # every check of their configs and reached loading: state UNAVAILABLE, for the missing library only.
    for name, backend in ((spec.name, "onnxruntime"), (spec.tta_model_name, "onnxruntime"),
                          (spec.preprocess_model_name, "dali")):
        assert (failures[name].state, failures[name].version, failures[name].reason) == (
            "UNAVAILABLE", "1", _missing(backend)), name
    # The ensemble (no backend of its own) fails only because its steps did not load.
    ensemble = failures[spec.ensemble_model_name]
    assert ensemble.state is None
    assert ensemble.reason.startswith(f"Invalid argument: ensemble '{spec.ensemble_model_name}' depends on ")
    assert ensemble.reason.endswith(_missing("onnxruntime") + ";") or ensemble.reason.endswith(
        _missing("dali") + ";"), ensemble.reason
    assert message.splitlines()[0] == (f"tritonserver could not load 4 model(s) of {repo} "
                                       f"({' '.join(GPU_FLAVOUR)}):")


def test_a_broken_gpu_config_fails_on_its_config_before_any_backend_is_looked_for(exported_repo, tmp_path):
    repo, spec = exported_repo
    broken = link_copy(repo, tmp_path / "repo")
    cls = broken / spec.name / "configs" / "onnxruntime.pbtxt"
    text = cls.read_text()
    dims = f"  dims: {spec.input_height}\n  dims: {spec.input_width}\n  dims: 3\n}}\noutput"
    assert dims in text
    cls.write_text(text.replace(dims, f"  dims: 0\n  dims: {spec.input_width}\n  dims: 3\n}}\noutput", 1))
    tta = broken / spec.tta_model_name / "configs" / "onnxruntime.pbtxt"
    tta.write_text(tta.read_text().replace(f"preferred_batch_size: {spec.max_batch_size}",
                                           f"preferred_batch_size: {spec.max_batch_size * 2}"))
    failures, _ = _load_failures(broken, tmp_path)
    assert (failures[spec.name].state, failures[spec.name].reason) == (
        None, f"model input '{spec.input_name}' dimension must be integer >= 1, or -1 to indicate a variable-size "
              f"dimension for {spec.name}")
    assert (failures[spec.tta_model_name].state, failures[spec.tta_model_name].reason) == (
        None, f"dynamic batching preferred size must be <= max batch size for {spec.tta_model_name}")
    # The untouched DALI config still fails for its library only.
    assert failures[spec.preprocess_model_name].reason == _missing("dali")


def test_serve_with_the_gpu_flavour_fails_at_once_naming_each_model_and_triton_s_reason(exported_repo, tmp_path):
    repo, spec = exported_repo
    ports = [str(free_port()) for _ in range(3)]
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "patchserve", "serve", "--repo", str(repo), "--model-config-name",
                           "onnxruntime", "--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2],
                           "--workdir", str(tmp_path / "work")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert time.monotonic() - t0 < 60, "serve waited for its start-up timeout"
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = proc.stderr
    assert err.startswith(f"patchserve serve: error: tritonserver could not load 4 model(s) of {repo} "
                          "(--model-config-name=onnxruntime):\n")
    for name, backend in ((spec.name, "onnxruntime"), (spec.tta_model_name, "onnxruntime"),
                          (spec.preprocess_model_name, "dali")):
        assert f"  {name} (version 1): UNAVAILABLE: {_missing(backend)}\n" in err
    assert re.search(rf"^  {spec.ensemble_model_name}: not loaded .*depends on ", err, re.M)
    assert "the embedded server has the python backend only: serve the onnxruntime flavour from NGC's " \
           "container:\n  docker run --gpus all" in err
    assert "Option" not in err  # not the server's option table
