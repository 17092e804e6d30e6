"""``export --precision int8``: ONNX Runtime static quantization for CPU servers.

Calibration runs the fp32 graph on training images (as the client prepares
them); the int8 graph (QDQ: int8 weights in 7 bits, uint8 activations,
per-channel weights) replaces the classifier's model.onnx, so every flavour serves it.
Its parity against the fp32 PyTorch model, top-1 agreement and the largest
probability difference on the export's images, is written beside it
(``int8_parity.json`` with the images and reference probabilities in
``int8_parity.npz``); export refuses a graph outside the tolerance below and
``check-export`` recomputes the figures and holds them to it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from export.features import FEATURE_TOLERANCE, relative_errors

PRECISIONS = ("fp32", "int8")
INT8_PARITY_JSON = "int8_parity.json"
INT8_PARITY_NPZ = "int8_parity.npz"
# Stated tolerance of an int8 graph against the fp32 model, on the export's images.
INT8_TOP1_MIN = 0.9
INT8_PROB_ATOL = 0.15
# The largest relative error ||f_int8 - f_fp32|| / ||f_fp32|| of one patch's features: the gate's int8
# feature tolerance (export.features).
INT8_FEATURES_RTOL = FEATURE_TOLERANCE["int8"]
CALIBRATION_IMAGES = 64


def calibration_images(data: Path, spec, limit: int = CALIBRATION_IMAGES, source: bool = False) -> np.ndarray:
    """Up to ``limit`` training images of ``data`` as the client prepares them: the classifier's
    input (centre crop), or with ``source`` the TTA model's (source size)."""
    from export.errors import ExportInputError
    from export.patches import centre_crop, source_patch
    from serving.core.errors import InputError
    from serving.core.imageio import load_rgb_u8
    from serving.inputs.datasets import discover, parse_hdf5_source, read_hdf5_rows

    try:
        dataset = discover(data, split="train", strict=False)
    except InputError:
        dataset = discover(data, split=None, strict=False)
    step = max(1, len(dataset.samples) // limit)
    crops = []
    for s in dataset.samples[::step][:limit]:
        try:
            pair = parse_hdf5_source(s.source)
            img = read_hdf5_rows(pair[0], np.array([pair[1]]))[0] if pair else load_rgb_u8(s.source)
        except (InputError, OSError):
            continue
        crops.append(source_patch(img, spec) if source else centre_crop(img, spec))
    if not crops:
        raise ExportInputError(f"--precision int8: no readable training images in {data} to calibrate on")
    return np.stack(crops)


def quantize_int8(fp32_path: Path, out_path: Path, calibration_nhwc_u8: np.ndarray, *, input_name: str,
                  batch: int = 8) -> Path:
    """Statically quantize ``fp32_path`` into ``out_path``, calibrated (min-max) on the given images."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quant_pre_process, quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._batches = iter([{input_name: calibration_nhwc_u8[i:i + batch]}
                                  for i in range(0, len(calibration_nhwc_u8), batch)])

        def get_next(self):
            return next(self._batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        # Shape inference and folding first, as ONNX Runtime recommends for static quantization.
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        staged = Path(tmp) / "int8.onnx"
        # Weights in 7 bits (reduce_range): on x86 CPUs without VNNI (AVX2 alone) ONNX Runtime's uint8 x int8
        # kernels add pairs of products in 16 bits, which saturate with 8-bit weights. The machine that exports
        # is often not the one that serves: on a 2-core AMD EPYC with AVX2 alone, 8-bit weights gave features
        # 0.126 off the fp32 model's (tolerance 0.1), 7-bit weights 0.047, the same trained run.
        quantize_static(str(pre), str(staged), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, reduce_range=True)
        _keep_metadata(fp32_path, staged)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staged), str(out_path))
    return out_path


def _keep_metadata(source: Path, target: Path) -> None:
    """The fp32 graph's record of itself (its stain normalisation) travels to its int8 graph."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(source)).metadata_props}
    if not props:
        return
    model = onnx.load(str(target))
    have = {p.key for p in model.metadata_props}
    for key, value in props.items():
        if key not in have:
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
    onnx.save(model, str(target))


def int8_figures(session, images_nhwc_u8: np.ndarray, reference_probs: np.ndarray | None, *, input_name: str,
                 output_name: str | None, batch: int = 32, reference_features: np.ndarray | None = None,
                 features_name: str | None = None) -> dict:
    """Top-1 agreement and the largest |p_int8 - p_fp32| of an int8 session on ``images`` (models with
    classes), and the largest relative error of its features against the fp32 ones (models with features)."""
    names = ([output_name] if reference_probs is not None else []) + \
            ([features_name] if reference_features is not None else [])
    got = [session.run(names, {input_name: images_nhwc_u8[i:i + batch]}) for i in range(0, len(images_nhwc_u8), batch)]
    figures: dict = {"images": int(len(images_nhwc_u8))}
    if reference_probs is not None:
        probs = np.concatenate([g[0] for g in got])
        figures.update(top1_agreement=float((probs.argmax(1) == reference_probs.argmax(1)).mean()),
                       max_prob_diff=float(np.abs(probs - reference_probs).max()))
    if reference_features is not None:
        features = np.concatenate([g[-1] for g in got])
        figures["max_features_rel"] = float(relative_errors(features, reference_features).max())
    return figures


def write_int8_parity(version_dir: Path, images: np.ndarray, reference_probs: np.ndarray | None, figures: dict,
                      reference_features: np.ndarray | None = None) -> None:
    arrays = {"inputs": images}
    if reference_probs is not None:
        arrays["probabilities_fp32"] = reference_probs
    if reference_features is not None:
        arrays["features_fp32"] = reference_features
    np.savez(version_dir / INT8_PARITY_NPZ, **arrays)
    doc = {"precision": "int8", **figures,
           "tolerance": {"top1_agreement_min": INT8_TOP1_MIN, "max_prob_diff_max": INT8_PROB_ATOL,
                         "max_features_rel_max": INT8_FEATURES_RTOL}}
    (version_dir / INT8_PARITY_JSON).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def within_tolerance(figures: dict, tolerance: dict | None = None) -> list[str]:
    t = {"top1_agreement_min": INT8_TOP1_MIN, "max_prob_diff_max": INT8_PROB_ATOL,
         "max_features_rel_max": INT8_FEATURES_RTOL, **(tolerance or {})}
    problems = []
    if "top1_agreement" in figures and figures["top1_agreement"] < t["top1_agreement_min"]:
        problems.append(f"int8 top-1 agreement {figures['top1_agreement']:.3f} < {t['top1_agreement_min']}")
    if "max_prob_diff" in figures and figures["max_prob_diff"] > t["max_prob_diff_max"]:
        problems.append(f"int8 max |p_int8 - p_fp32| {figures['max_prob_diff']:.3f} > {t['max_prob_diff_max']}")
    if "max_features_rel" in figures and figures["max_features_rel"] > t["max_features_rel_max"]:
        problems.append(f"int8 max ||f_int8 - f_fp32|| / ||f_fp32|| {figures['max_features_rel']:.3f} > "
                        f"{t['max_features_rel_max']}")
    return problems


def check_int8_parity(version_dir: Path, *, input_name: str, output_name: str, onnx_file: str = "model.onnx",
                      features_name: str | None = None) -> list[str]:
    """The gate's int8 check: recompute the recorded figures on the served graph; hold them to the tolerance.

    The tolerance is this module's (the repository's recorded one may not loosen it).
    """
    from export.onnx_export import ort_session

    doc_path, npz_path = version_dir / INT8_PARITY_JSON, version_dir / INT8_PARITY_NPZ
    missing = [p.name for p in (doc_path, npz_path, version_dir / onnx_file) if not p.exists()]
    if missing:
        return [f"precision int8: {', '.join(missing)} missing in {version_dir}"]
    recorded = json.loads(doc_path.read_text())
    with np.load(npz_path) as z:
        images = z["inputs"]
        reference = z["probabilities_fp32"] if "probabilities_fp32" in z.files else None
        features = z["features_fp32"] if "features_fp32" in z.files else None
    problems = []
    if features_name is not None and features is None:
        problems.append(f"precision int8: {INT8_PARITY_NPZ} holds no fp32 features for the features output")
    figures = int8_figures(ort_session(version_dir / onnx_file), images, reference, input_name=input_name,
                           output_name=output_name, reference_features=features if features_name else None,
                           features_name=features_name)
    problems += within_tolerance(figures)
    for key in ("top1_agreement", "max_prob_diff", "max_features_rel"):
        if key not in figures:
            continue
        if recorded.get(key) is None or abs(figures[key] - float(recorded.get(key, float("nan")))) > 1e-5:
            problems.append(f"int8 {key}: recorded {recorded.get(key)}, measured {figures[key]:.6g} "
                            f"({INT8_PARITY_JSON} does not describe this graph)")
    return problems


def model_precision(repo: Path, spec) -> str:
    """The precision a repository's export of ``spec`` recorded (its export.json); fp32 when none."""
    options = repo / spec.name / "export.json"
    try:
        return str(json.loads(options.read_text()).get("precision", "fp32"))
    except (OSError, ValueError):
        return "fp32"
