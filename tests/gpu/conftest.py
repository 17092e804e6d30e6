"""GPU tests skip only when CUDA is absent; a missing package on a CUDA machine is a failure.

In the project's own install (``make install`` with CUDA: ``.[all,test]``)
every package these tests import is present. ``scripts/gpu-check`` runs them
one component at a time and reports a missing package instead of failing.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="GPU tests need torch (the train extra)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)
