"""Features against PyTorch's: the relative error of one patch's vector, and the tolerance per precision.

Kept apart from :mod:`export.fixture` so the parity rows of :mod:`export.onnx_export` can use it
without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from export.errors import FixtureError

# Features are compared per vector, relative to its length: ||got - want|| <= rtol * ||want|| (L2 over the
# feature_size values of one patch), so the many near-zero values after the ReLU weigh nothing on their own.
# fp32: ONNX Runtime against PyTorch on the CPU measured 1.05e-6 on the random-weights ResNet18 of the tests
# (layer4, 32 images); 1e-4 leaves room for other archs and thread counts, while a 0.1% change of the graph's
# output or of the fixture fails (tests/integration/test_export_features.py). int8 (QDQ graphs, against the fp32
# PyTorch features): measured 0.030 (classifier) and 0.030 (TTA) on the tests' trained ResNet18. fp16 (TensorRT
# plans) is not measured yet: 1e-2 is a stated bound for 11-bit mantissas through a ResNet.
FEATURE_TOLERANCE: dict[str, float] = {"fp32": 1e-4, "fp16": 1e-2, "int8": 0.1}


def feature_tolerance(precision: str) -> float:
    try:
        return FEATURE_TOLERANCE[precision]
    except KeyError:
        raise FixtureError(f"precision {precision!r}: no feature tolerance stated; known: "
                           f"{', '.join(FEATURE_TOLERANCE)}") from None


def relative_errors(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Per vector (row): ||got - want|| / ||want|| (L2); a zero vector is measured absolutely."""
    got = np.asarray(got, dtype=np.float64).reshape(len(got), -1)
    want = np.asarray(want, dtype=np.float64).reshape(len(want), -1)
    if got.shape != want.shape:
        raise FixtureError(f"features have shape {got.shape}, the fixture {want.shape}")
    norm = np.linalg.norm(want, axis=1)
    return np.linalg.norm(got - want, axis=1) / np.where(norm > 0, norm, 1.0)


@dataclass(frozen=True)
class FeatureComparison:
    """Features against a fixture's: the largest relative error of one vector."""

    max_rel: float
    rtol: float
    count: int

    @property
    def passed(self) -> bool:
        return self.max_rel <= self.rtol

    def describe(self, precision: str) -> str:
        return (f"{self.count} images: max ||f - f_ref|| / ||f_ref|| {self.max_rel:.3g} (tolerance {precision}: "
                f"{self.rtol:g})")


def compare_features(got: np.ndarray, want: np.ndarray, precision: str) -> FeatureComparison:
    rel = relative_errors(got, want)
    return FeatureComparison(float(rel.max()) if rel.size else 0.0, feature_tolerance(precision), len(rel))
