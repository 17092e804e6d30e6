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
