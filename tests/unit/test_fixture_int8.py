"""The gate's fixture judging of int8 graphs: the int8 tolerance row, probabilities for int8 TTA graphs."""

from __future__ import annotations

import numpy as np

from export.check_fixture import judge
from export.fixture import log_probabilities


def _need(role: str, precision: str) -> dict:
    return {"name": "m" if role == "classifier" else "m_tta", "role": role, "precision": precision}


def test_int8_logits_are_held_to_the_int8_row_and_fp32_to_its_own():
    want = np.array([[4.0, -2.0], [-1.0, 3.0]])
    got = want + np.array([[0.8, -0.5], [0.3, -0.9]])  # int8 rounding: within 1 + 0.1*|want|
    assert judge("fixture-onnx", _need("classifier", "int8"), got, want, "in-process").status == "ok"
    assert judge("fixture-onnx", _need("classifier", "fp32"), got, want, "in-process").status == "FAIL"
    far = want + np.array([[2.5, 0.0], [0.0, 0.0]])
    assert judge("fixture-onnx", _need("classifier", "int8"), far, want, "in-process").status == "FAIL"


def test_int8_tta_is_compared_on_probabilities_where_uint8_rounds_tiny_ones_to_zero():
    fp32 = np.array([[1.0 - 1e-27, 1e-27], [0.3, 0.7]])
    want = log_probabilities(fp32)
    int8 = np.array([[1.0, 0.0], [0.32, 0.68]])  # the served graph's raw probabilities
    row = judge("fixture-onnx", _need("tta", "int8"), int8, want, "in-process")
    assert row.status == "ok" and "probabilities" in row.detail and "int8-probabilities" in row.detail
    # On log-probabilities the zero would be 62 units off: the fp32 rule fails it.
    assert judge("fixture-onnx", _need("tta", "fp32"), int8, want, "in-process").status == "FAIL"
    off = np.array([[0.7, 0.3], [0.3, 0.7]])
    assert judge("fixture-onnx", _need("tta", "int8"), off, want, "in-process").status == "FAIL"
