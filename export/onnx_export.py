"""ONNX export with a dynamic batch, the ONNX checker, and parity checks.

Names come from the caller (the spec), and the batch dimension is declared
positionally in ``dynamic_shapes``: unlike timm's ``onnx_export`` the dynamic
batch cannot be lost by renaming the input. The graph is traced with a batch of
at least 2 so the exporter does not specialise the batch to 1.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from export.errors import ExportError, ParityError
from export.features import relative_errors

# Opset 18 is what torch 2.15's dynamo exporter emits natively; onnxruntime
# 1.31 and Triton 24.10's ONNX Runtime backend both run it.
OPSET = 18
# Probabilities from ONNX Runtime and PyTorch on the CPU agree far better than
# this; a layout or normalisation bug moves them by 1e-2 or more.
PROB_ATOL = 1e-4
_ONNX_DTYPES = {1: "float32", 2: "uint8", 7: "int64", 10: "float16"}


# The graph's own record of the stain normalisation it computes (the spec's field, canonical JSON): the
# constant folding of the export leaves its parameters unnamed, so the gate compares this with spec.json
# (and the fixture's logits, computed with them, prove the graph uses them).
STAIN_METADATA = "patchserve.stain_normalization"


def graph_metadata(spec) -> dict[str, str]:
    """What an exported graph of ``spec`` records about itself."""
    import json

    if spec.stain_normalization is None:
        return {}
    return {STAIN_METADATA: json.dumps(spec.stain_normalization, sort_keys=True, separators=(",", ":"))}


def export_onnx(module, sample_nhwc_u8: np.ndarray, path: str | Path, *, input_name: str,
                output_names: Sequence[str], opset: int = OPSET, metadata: dict[str, str] | None = None) -> Path:
    """Export ``module`` (uint8 NHWC in) to one self-contained ONNX file with a dynamic batch; ``metadata``
    goes into the model's ``metadata_props``."""
    import torch

    if sample_nhwc_u8.shape[0] < 2:
        raise ExportError(f"{path}: trace with a batch of at least 2, got {sample_nhwc_u8.shape[0]}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    # Traced where the module lives: a CUDA model is exported on CUDA.
    device = next(module.parameters(), torch.empty(0)).device
    sample = torch.from_numpy(np.ascontiguousarray(sample_nhwc_u8)).to(device)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    log = io.StringIO()
    try:
        # The exporter prints progress lines and warnings: keep them for the error message only.
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(log):
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (sample,), str(path), dynamo=True, input_names=[input_name],
                              output_names=list(output_names), opset_version=opset,
                              dynamic_shapes=({0: batch},), external_data=False, optimize=True)
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types
        raise ExportError(f"{path}: ONNX export failed: {exc}\n{log.getvalue()[-2000:]}") from exc
    _cast_input_first(path, metadata or {})
    check_onnx(path)
    return path


def _cast_input_first(path: Path, metadata: dict[str, str]) -> None:
    """Leave the uint8 input feeding only its Cast: TensorRT takes uint8 nowhere else (export.graph_checks);
    record ``metadata``."""
    import onnx

    from export.graph_checks import route_shapes_through_cast

    model = onnx.load(str(path))
    changed = route_shapes_through_cast(model)
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
        changed = True
    if changed:
        onnx.save(model, str(path))


def read_graph_metadata(model) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def check_onnx(path: str | Path):
    """Run the ONNX checker with ``full_check`` (shape inference too); return the model."""
    import onnx

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # noqa: BLE001 - onnx raises ValidationError, DecodeError, OSError
        raise ExportError(f"{path}: the ONNX checker rejected the model: {exc}") from exc
    return model


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple  # ints, or a string for a symbolic dimension


def onnx_signature(model) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """Inputs and outputs of an ONNX model: names, numpy dtypes, shapes."""
    def info(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = tuple(d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim)
            out.append(TensorInfo(v.name, _ONNX_DTYPES.get(t.elem_type, f"onnx:{t.elem_type}"), dims))
        return out

    return info(model.graph.input), info(model.graph.output)


def ort_session(path: str | Path, threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class ParityRow:
    """One line of the parity table the export prints."""

    check: str
    model: str
    batch: int
    value: float
    limit: float
    higher_is_better: bool = False

    @property
    def passed(self) -> bool:
        return self.value >= self.limit if self.higher_is_better else self.value <= self.limit

    def as_text(self) -> str:
        op = ">=" if self.higher_is_better else "<="
        return f"{self.check:<28} {self.model:<30} {self.batch:>5}  {self.value:.3g} {op} {self.limit:g}  " \
               f"{'ok' if self.passed else 'FAIL'}"


def torch_outputs(module, images_nhwc_u8: np.ndarray) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        out = module.eval()(torch.from_numpy(np.ascontiguousarray(images_nhwc_u8)))
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [o.float().numpy() for o in out]


def parity_vs_torch(module, session, images_nhwc_u8: np.ndarray, *, model: str, input_name: str,
                    output_name: str, atol: float = PROB_ATOL) -> ParityRow:
    """Max |ORT - torch| on the first output (probabilities) for one batch."""
    expected = torch_outputs(module, images_nhwc_u8)[0]
    got = session.run([output_name], {input_name: images_nhwc_u8})[0]
    if got.shape != expected.shape:
        raise ParityError(f"{model}: ONNX Runtime returned shape {got.shape}, PyTorch {expected.shape}")
    diff = float(np.max(np.abs(got - expected))) if got.size else 0.0
    return ParityRow("max |p_onnx - p_torch|", model, int(images_nhwc_u8.shape[0]), diff, atol)


def features_parity(module, session, images_nhwc_u8: np.ndarray, *, model: str, input_name: str,
                    features_name: str, index: int, rtol: float) -> ParityRow:
    """Largest per-patch relative error ||f_onnx - f_torch|| / ||f_torch|| of the features output (the
    ``index``-th output of ``module``) for one batch."""
    expected = torch_outputs(module, images_nhwc_u8)[index]
    got = session.run([features_name], {input_name: images_nhwc_u8})[0]
    if got.shape != expected.shape:
        raise ParityError(f"{model}: ONNX Runtime returned features of shape {got.shape}, PyTorch {expected.shape}")
    return ParityRow("max rel |f_onnx - f_torch|", model, int(images_nhwc_u8.shape[0]),
                     float(relative_errors(got, expected).max()), rtol)


def top1_agreement(module, session, images_nhwc_u8: np.ndarray, *, model: str, input_name: str,
                   output_name: str, batch: int = 32) -> ParityRow:
    """Fraction of real patches on which ONNX Runtime and PyTorch pick the same class."""
    same = 0
    for start in range(0, len(images_nhwc_u8), batch):
        chunk = images_nhwc_u8[start:start + batch]
        a = torch_outputs(module, chunk)[0].argmax(1)
        b = session.run([output_name], {input_name: chunk})[0].argmax(1)
        same += int((a == b).sum())
    return ParityRow("top-1 agreement (real)", model, len(images_nhwc_u8), same / max(1, len(images_nhwc_u8)),
                     1.0, higher_is_better=True)


def format_table(rows: Sequence[ParityRow]) -> str:
    head = f"{'check':<28} {'model':<30} {'batch':>5}  value  status"
    return "\n".join([head, "-" * len(head)] + [r.as_text() for r in rows])


def require_parity(rows: Sequence[ParityRow]) -> None:
    bad = [r for r in rows if not r.passed]
    if bad:
        raise ParityError("parity failed:\n" + format_table(bad))
