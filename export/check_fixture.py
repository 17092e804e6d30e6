"""The gate's fixture checks: a model's answers (in-process, served, or recomputed from the run) vs its fixture."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export import triton_config as tc
from export.check_report import FAIL, OK, CheckRow
from export.fixture import (FIXTURE_FILE, FIXTURE_KEYS, INT8_PROBABILITIES, compare, preprocess_agreement,
                            load_fixture, log_probabilities, unpack_encoded)
from serving.core.errors import PatchserveError

# Every flavour the gate loads on the CPU runs the exported ONNX graph (ONNX
# Runtime in-process and in the python backend): fp32, or int8 where the export
# quantized it (need["precision"]); a TensorRT plan would be fp16.
CPU_PRECISION = "fp32"


def fixture_of(need: dict) -> dict:
    return load_fixture(need["version_dir"] / FIXTURE_FILE, FIXTURE_KEYS[need["role"]])


def inputs_of(role: str, fixture: dict) -> list[np.ndarray] | np.ndarray:
    """What the model takes: pixel batches (classifier, TTA) or one encoded file per request."""
    if role == "classifier":
        return fixture["pixels"]
    if role == "tta":
        return fixture["sources"]
    return unpack_encoded(fixture)


def expected_of(role: str, fixture: dict) -> np.ndarray:
    key = {"classifier": "logits", "tta": "log_probabilities", "preprocess": "pixels", "ensemble": "logits"}[role]
    return fixture[key]


def output_of(role: str, spec) -> str:
    """The output tensor the gate compares: logits where the model has them, else probabilities or pixels."""
    return {"classifier": spec.logits_name, "ensemble": spec.logits_name, "tta": spec.output_name,
            "preprocess": spec.input_name}[role]


def comparable(role: str, output: np.ndarray) -> np.ndarray:
    return log_probabilities(output) if role == "tta" else output


def judge(check: str, need: dict, got: np.ndarray, want: np.ndarray, where: str, raw: bool = True,
          precision: str | None = None) -> CheckRow:
    """One row: ``got`` against ``want`` with the role's rule (grey levels for pixels, logit tolerance else).

    ``raw``: ``got`` is the model's output (probabilities for the TTA model), not yet comparable.
    ``precision``: the tolerance row; by default the served graph's (``need["precision"]``).
    """
    precision = precision or need.get("precision", CPU_PRECISION)
    name, role = need["name"], need["role"]
    if got.shape != want.shape:
        return CheckRow(check, name, FAIL, f"{where}: answer shape {got.shape}, fixture {want.shape}")
    if role == "preprocess":
        ok, _, measured = preprocess_agreement(got, want, bool(need["spec"].grayscale_equalize))
        return CheckRow(check, name, OK if ok else FAIL, f"{where}: {len(want)} images, {measured}")
    what = "log-probabilities" if role == "tta" else "logits"
    if role == "tta" and precision == "int8":
        # uint8 probabilities round tiny ones to 0: their logarithm says nothing; compare probabilities.
        got, want = (got if raw else np.exp(got)), np.exp(want)
        precision, raw, what = INT8_PROBABILITIES, False, "probabilities"
    result = compare(comparable(role, got) if raw else got, want, precision)
    return CheckRow(check, name, OK if result.passed else FAIL,
                    f"{where} {what}: {result.describe(precision)}"
                    + ("" if result.passed else " OUT OF TOLERANCE"))


def in_process_row(need: dict) -> CheckRow | None:
    """ONNX Runtime (classifier, TTA) or DALI (preprocess) in-process on the fixture; None for the ensemble."""
    role, spec = need["role"], need["spec"]
    if role == "ensemble":
        return None
    check = "fixture-dali" if role == "preprocess" else "fixture-onnx"
    try:
        x = inputs_of(role, need["fixture"])
        if role == "preprocess":
            from export.preprocess import run_serialized

            got = np.stack(run_serialized(need["version_dir"] / tc.DALI_FILE, x, input_name=spec.encoded_name,
                                          batch_size=spec.max_batch_size))
        else:
            from export.onnx_export import ort_session

            session = ort_session(need["onnx"])
            step = spec.max_batch_size
            got = np.concatenate([session.run([output_of(role, spec)], {spec.input_name: x[i:i + step]})[0]
                                  for i in range(0, len(x), step)])
    except Exception as exc:  # noqa: BLE001 - report the model, check the others
        return CheckRow(check, need["name"], FAIL, f"in-process run failed: {type(exc).__name__}: {str(exc)[:300]}")
    return judge(check, need, got, need["expected"], "in-process")


def run_rows(run: Path, needs: list[dict]) -> list[CheckRow]:
    """--run: the run's weights hash against each manifest; PyTorch recomputes every fixture's expectations.

    The recomputed answers replace the stored ones for the later checks, so the
    repository is compared with the run itself, not with what it says about itself.
    """
    from export.errors import ExportInputError
    from export.onnx_export import torch_outputs
    from training.checkpoint import read_checkpoint, weights_sha256
    from training.model import ServedModel, build_model

    try:
        payload = read_checkpoint(run)
    except PatchserveError as exc:
        raise ExportInputError(f"--run {run}: {exc}") from exc
    weights = weights_sha256(payload["model"])
    classifier = build_model(payload["spec"], payload["model_config"])
    classifier.load_state_dict(payload["model"])
    served = ServedModel(classifier.eval()).eval()
    rows = []
    for need in needs:
        name, role = need["name"], need["role"]
        if role == "preprocess" or need.get("fixture") is None:
            continue
        if need["manifest"].weights_sha256 != weights:
            rows.append(CheckRow("run", name, FAIL, f"serves weights {need['manifest'].weights_sha256[:12]}..., "
                                                    f"the run's are {weights[:12]}... ({payload['path']})"))
            continue
        fixture = need["fixture"]
        try:
            if role == "tta":
                from export.tta import TTAModel

                module = TTAModel(classifier, need["spec"], need["config"].parameters[tc.TTA_PARAMETER].string_value)
                x = fixture["sources"]
                fresh = log_probabilities(np.concatenate([torch_outputs(module, x[i:i + 16])[0]
                                                          for i in range(0, len(x), 16)]))
            else:
                x = fixture["pixels"] if role == "classifier" else fixture["dali_pixels"]
                fresh = np.concatenate([torch_outputs(served, x[i:i + 64])[1] for i in range(0, len(x), 64)])
        except Exception as exc:  # noqa: BLE001 - a mismatched architecture raises from load/forward
            rows.append(CheckRow("run", name, FAIL, f"PyTorch could not run the fixture: {type(exc).__name__}: "
                                                    f"{str(exc)[:300]}"))
            continue
        # Both sides are fp32 PyTorch answers, whatever the served graph's precision.
        row = judge("run", need, need["expected"], fresh, "stored fixture vs PyTorch on the run's checkpoint",
                    raw=False, precision=CPU_PRECISION)
        rows.append(CheckRow("run", name, row.status, f"weights sha256 {weights[:12]}... match; {row.detail}"))
        need["expected"] = fresh
    return rows
