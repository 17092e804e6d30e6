"""GPU tests skip only when CUDA is absent; a missing package on a CUDA machine is a failure.

In the project's own install (``make install`` with CUDA: ``.[all,test]``)
every package these tests import is present. Run them in one pytest process
(``pytest tests/gpu``): the TensorRT repository below is built once per
session, however many tests use it.

Each GPU test has a time limit of its own (``GPU_TEST_TIMEOUT_S`` unless the
test sets ``@pytest.mark.timeout``), so one NCCL hang cannot take the whole
run; the project's ini makes pytest-timeout raise inside the test, and the
tests start torchrun through ``serving.core.subproc.run_tree``, so its
workers end with the test.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="GPU tests need torch (the train extra)")

GPU_TEST_TIMEOUT_S = 300


def _is_gpu_test(item) -> bool:
    return "tests/gpu/" in str(item.fspath).replace("\\", "/")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _is_gpu_test(item) and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(GPU_TEST_TIMEOUT_S))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if _is_gpu_test(item):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def trt_repo(export_run_dir, tmp_path_factory):
    """The export run with python, onnxruntime and tensorrt flavours (fp16 plan, max batch 8): built once."""
    from export.build import export_run

    repo = tmp_path_factory.mktemp("trt") / "repo"
    result = export_run(export_run_dir, repo, formats=("python", "onnxruntime", "tensorrt"), with_tta=False,
                        with_dali=False, max_batch_size=8, fp16=True, progress=False)
    return repo, result
