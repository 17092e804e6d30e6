"""Shared fixtures. Area fixtures live in tests/fixtures_*.py, loaded below."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

# Two cores on CI: keep each test process to one intra-op thread so the
# embedded server and the test do not fight over them.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Hypothesis judges its own speed by the clock; on a shared 2-core machine that
# is noise, not a property of the code. Its checks of the properties stay.
settings.register_profile("patchserve", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile("patchserve")

pytest_plugins = [
    "tests.fixtures_data",    # synthetic patches and slides
    "tests.fixtures_train",   # trained runs
    "tests.fixtures_export",  # exported model repositories
    "tests.fixtures_serve",   # running embedded Triton servers
]


@pytest.fixture
def tiny_spec():
    from serving.core.spec import ModelSpec

    return ModelSpec(name="tiny", class_names=("normal", "tumour"), input_height=32, input_width=32,
                     mean=(0.7, 0.5, 0.7), std=(0.15, 0.2, 0.15), max_batch_size=8)


def pytest_addoption(parser):
    # A server started elsewhere (tests/integration/test_client_install.py runs the client's own tests in an
    # environment with the client extra only, against the server of the main environment).
    group = parser.getgroup("patchserve", "a running Triton server for the client tests (-m client)")
    group.addoption("--triton-grpc", help="HOST:PORT of its gRPC endpoint")
    group.addoption("--triton-http", help="HOST:PORT of its HTTP endpoint")
    group.addoption("--triton-repo", help="the repository it serves (its ONNX files are the tests' reference)")
    group.addoption("--triton-model", help="the classifier's name in that repository")
