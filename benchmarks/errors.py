"""Errors of the benchmarks package."""

from __future__ import annotations

from serving.core.errors import PatchserveError


class BenchOutError(PatchserveError, ValueError):
    """--out points somewhere benchmark results must not go, or holds no results."""


class BenchmarkError(PatchserveError, RuntimeError):
    """What a benchmark or its test data needs could not be made (a download, a converter, a library)."""


class GpuCheckError(PatchserveError):
    """A gpu-check step cannot run as asked: names the step or the flag."""
