"""The gate's fixture checks: a model's answers (in-process, served, or recomputed from the run) vs its fixture."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export import triton_config as tc
from export.check_report import FAIL, OK, CheckRow
from export.features import compare_features
from export.fixture import (FIXTURE_FILE, INT8_PROBABILITIES, compare, fixture_keys, preprocess_agreement,
                            load_fixture, log_probabilities, unpack_encoded)
from serving.core.errors import PatchserveError

# Every flavour the gate loads on the CPU runs the exported ONNX graph (ONNX
# Runtime in-process and in the python backend): fp32, or int8 where the export
# quantized it (need["precision"]); a TensorRT plan would be fp16.
CPU_PRECISION = "fp32"


def fixture_of(need: dict) -> dict:
    return load_fixture(need["version_dir"] / FIXTURE_FILE, fixture_keys(need["role"], need["spec"]))


def inputs_of(role: str, fixture: dict) -> list[np.ndarray] | np.ndarray:
    """What the model takes: pixel batches (classifier, TTA) or one encoded file per request."""
    if role == "classifier":
        return fixture["pixels"]
    if role == "tta":
        return fixture["sources"]
    return unpack_encoded(fixture)


def expected_of(role: str, fixture: dict, spec) -> np.ndarray | None:
    """The fixture's logits, log-probabilities or pixels for ``role``; None for a features-only model, whose
    fixture holds features alone (``fixture["features"]``)."""
    if role != "preprocess" and spec.features_only:
        return None
    key = {"classifier": "logits", "tta": "log_probabilities", "preprocess": "pixels", "ensemble": "logits"}[role]
    return fixture[key]


# The features rows of each stage of the gate (beside the logits' rows of the same stage).
FEATURE_CHECKS = {"fixture-onnx": "features-onnx", "serve": "features-serve", "run": "features-run"}


def feature_output_of(role: str, spec) -> str | None:
    """The features output the gate compares, or None where the role has none."""
    return spec.features_name if role != "preprocess" and spec.has_features else None


def judge_features(check: str, need: dict, got: np.ndarray, want: np.ndarray, where: str,
                   precision: str | None = None) -> CheckRow:
    """One row: features against the fixture's, per patch ||got - want|| / ||want|| within the precision's
    relative tolerance (export.features)."""
    precision = precision or need.get("precision", CPU_PRECISION)
    name = need["name"]
    if got.shape != want.shape:
        return CheckRow(check, name, FAIL, f"{where}: features shape {got.shape}, fixture {want.shape}")
    result = compare_features(got, want, precision)
    return CheckRow(check, name, OK if result.passed else FAIL,
                    f"{where} features: {result.describe(precision)}" + ("" if result.passed else " OUT OF TOLERANCE"))


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


def in_process_rows(need: dict) -> list[CheckRow]:
    """ONNX Runtime (classifier, TTA) or DALI (preprocess) in-process on the fixture: a row for the logits (or
    pixels) and one for the features; none for the ensemble."""
    role, spec = need["role"], need["spec"]
    if role == "ensemble":
        return []
    check = "fixture-dali" if role == "preprocess" else "fixture-onnx"
    want, want_features = need["expected"], need.get("expected_features")
    names = ([output_of(role, spec)] if want is not None else []) + \
        ([feature_output_of(role, spec)] if want_features is not None and feature_output_of(role, spec) else [])
    try:
        x = inputs_of(role, need["fixture"])
        if role == "preprocess":
            from export.preprocess import run_serialized

            got = [np.stack(run_serialized(need["version_dir"] / tc.DALI_FILE, x, input_name=spec.encoded_name,
                                           batch_size=spec.max_batch_size))]
        else:
            from export.onnx_export import ort_session

            session = ort_session(need["onnx"])
            step = spec.max_batch_size
            parts = [session.run(names, {spec.input_name: x[i:i + step]}) for i in range(0, len(x), step)]
            got = [np.concatenate([p[k] for p in parts]) for k in range(len(names))]
    except Exception as exc:  # noqa: BLE001 - report the model, check the others
        return [CheckRow(check, need["name"], FAIL,
                         f"in-process run failed: {type(exc).__name__}: {str(exc)[:300]}")]
    rows = []
    if want is not None:
        rows.append(judge(check, need, got[0], want, "in-process"))
    if len(got) > len(rows):
        rows.append(judge_features(FEATURE_CHECKS[check], need, got[-1], want_features, "in-process"))
    return rows


def run_rows(run: Path, needs: list[dict]) -> list[CheckRow]:
    """--run: the run's weights hash against each manifest; PyTorch recomputes every fixture's expectations.

    The recomputed answers replace the stored ones for the later checks, so the
    repository is compared with the run itself, not with what it says about itself.
    """
    from export.errors import ExportInputError
    from export.onnx_export import torch_outputs
    from training.checkpoint import read_checkpoint, weights_sha256
    from training.model import ServedModel, build_model, served_outputs

    try:
        payload = read_checkpoint(run)
    except PatchserveError as exc:
        raise ExportInputError(f"--run {run}: {exc}") from exc
    weights = weights_sha256(payload["model"])
    classifier = build_model(payload["spec"], payload["model_config"])
    classifier.load_state_dict(payload["model"])
    classifier.eval()
    rows = []
    for need in needs:
        name, role, spec = need["name"], need["role"], need["spec"]
        if role == "preprocess" or need.get("fixture") is None:
            continue
        if need["manifest"].weights_sha256 != weights:
            rows.append(CheckRow("run", name, FAIL, f"serves weights {need['manifest'].weights_sha256[:12]}..., "
                                                    f"the run's are {weights[:12]}... ({payload['path']})"))
            continue
        fixture = need["fixture"]
        try:
            if role == "tta":
                from export.tta import TTAModel, tta_outputs

                module = TTAModel(classifier, spec, need["config"].parameters[tc.TTA_PARAMETER].string_value)
                x, step, names = fixture["sources"], 16, tta_outputs(spec)
            else:
                # The features the repository's spec says it serves, from the run's weights.
                module = ServedModel(classifier, spec.feature_layer).eval()
                x = fixture["pixels"] if role == "classifier" else fixture["dali_pixels"]
                step, names = 64, served_outputs(spec)
            chunks = [torch_outputs(module, x[i:i + step]) for i in range(0, len(x), step)]
            answers = {n: np.concatenate([c[k] for c in chunks]) for k, n in enumerate(names)}
        except Exception as exc:  # noqa: BLE001 - a mismatched architecture raises from load/forward
            rows.append(CheckRow("run", name, FAIL, f"PyTorch could not run the fixture: {type(exc).__name__}: "
                                                    f"{str(exc)[:300]}"))
            continue
        # Both sides are fp32 PyTorch answers, whatever the served graph's precision.
        proof = f"weights sha256 {weights[:12]}... match"
        where = "stored fixture vs PyTorch on the run's checkpoint"
        if need["expected"] is not None:
            fresh = log_probabilities(answers[spec.output_name]) if role == "tta" else answers[spec.logits_name]
            row = judge("run", need, need["expected"], fresh, where, raw=False, precision=CPU_PRECISION)
            rows.append(CheckRow("run", name, row.status, f"{proof}; {row.detail}"))
            need["expected"] = fresh
        if need.get("expected_features") is not None and spec.features_name in answers:
            fresh = answers[spec.features_name]
            row = judge_features("features-run", need, need["expected_features"], fresh, where,
                                 precision=CPU_PRECISION)
            rows.append(CheckRow("features-run", name, row.status, f"{proof}; {row.detail}"))
            need["expected_features"] = fresh
    return rows
