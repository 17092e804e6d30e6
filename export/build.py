"""The export steps: checkpoint -> ONNX (+ TTA graph, DALI pipeline, TensorRT plan) -> parity -> configs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from export import triton_config as tc
from export.errors import ExportInputError, TensorRTUnavailable
from export.onnx_export import (PROB_ATOL, ParityRow, export_onnx, ort_session, parity_vs_torch, require_parity,
                                top1_agreement, torch_outputs)
from export.repository import (PARITY_FILE, PLAN_MANIFEST, ExportResult, copy_backend, refuse_existing,
                               remove_stale_configs, render_repository, resolve_spec, write_generated)
from serving.spec import ModelSpec
from serving.views import combine_views, make_views, num_views

# PIL's BILINEAR and DALI's linear resize (both antialiased) round differently:
# a few grey levels on smooth images; more than this means a different crop or resize.
DALI_MAX_GREY_DIFF = 8
PARITY_BATCH = 3  # differs from the tracing batch (2) on purpose


def _read_run(run: Path) -> dict:
    from serving.errors import PatchserveError
    from training.checkpoint import read_checkpoint

    try:
        return read_checkpoint(run)
    except PatchserveError as exc:
        raise ExportInputError(f"RUN {run}: cannot export: {exc}") from exc


def _random_u8(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _smooth_images(spec: ModelSpec, count: int) -> list[np.ndarray]:
    """Tissue-like smooth images at 1.5x the source size: noise would measure the resizers, not the pipeline."""
    h, w = int(spec.source_height * 1.5), int(spec.source_width * 1.5)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for i in range(count):
        r = 128 + 100 * np.sin(xx / (7 + i) + i)
        g = 128 + 100 * np.cos(yy / (9 + i))
        b = 128 + 100 * np.sin((xx + yy) / (11 + i))
        out.append(np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8))
    return out


def encode(image_hwc_u8: np.ndarray, fmt: str) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image_hwc_u8).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def dali_vs_pil(dali_path: Path, spec: ModelSpec, images: list[np.ndarray]) -> ParityRow:
    """Largest per-pixel difference between the DALI pipeline and the client's PIL path (PNG input)."""
    from export.patches import centre_crop
    from export.preprocess import run_serialized

    got = run_serialized(dali_path, [encode(i, "PNG") for i in images], input_name=spec.encoded_name,
                         batch_size=spec.max_batch_size)
    diff = max(int(np.abs(g.astype(np.int16) - centre_crop(i, spec).astype(np.int16)).max())
               for g, i in zip(got, images))
    return ParityRow("max |dali - PIL| grey levels", spec.preprocess_model_name, len(images), diff,
                     DALI_MAX_GREY_DIFF)


def build_repository(run: Path, repo: Path, *, name, version, formats, tta_views, with_tta, with_dali,
                     max_batch_size, instances, max_queue_delay_us, overwrite, fp16, trt_accelerator, data,
                     progress, precision="fp32") -> ExportResult:
    from tqdm import tqdm

    from training.model import ServedModel, build_model

    payload = _read_run(run)
    spec = resolve_spec(payload["spec"], name=name, version=version, max_batch_size=max_batch_size)
    if spec.grayscale_equalize and (with_tta or with_dali):
        # The client equalises before sending; the TTA graph and the DALI
        # preprocessing would see unequalised pixels and score them wrong.
        print(f"{spec.name}: trained with --grayscale-equalize, which the client applies: no server-side TTA "
              "or DALI preprocessing models (they would skip the equalisation)")
        with_tta = with_dali = False
    opts = tc.ExportOptions(max_batch_size=spec.max_batch_size, version=version, formats=formats,
                            tta_views=tta_views, with_tta=with_tta, with_dali=with_dali, instances=instances,
                            max_queue_delay_us=max_queue_delay_us, fp16=fp16, trt_accelerator=trt_accelerator,
                            precision=precision)
    if data is None:
        recorded = (payload.get("train_config") or {}).get("data")
        data = Path(recorded) if recorded and Path(recorded).exists() else None
    if precision == "int8" and data is None:
        raise ExportInputError("--precision int8: needs training images to calibrate on; pass --data (the run "
                               "records no data folder that exists here)")
    names = [spec.name] + ([spec.tta_model_name] if with_tta else []) + \
            ([spec.preprocess_model_name, spec.ensemble_model_name] if with_dali else [])
    repo.mkdir(parents=True, exist_ok=True)
    refuse_existing(repo, names, version, overwrite)
    classifier = build_model(spec, payload["model_config"])
    classifier.load_state_dict(payload["model"])
    classifier.eval()
    served = ServedModel(classifier).eval()
    created = [repo / n / str(version) for n in names]
    steps = 2 + int(with_tta) * 2 + int(with_dali) + int("tensorrt" in formats)
    bar = tqdm(total=steps, desc=f"export {spec.name}", unit="step", disable=not progress)
    rows: list[ParityRow] = []
    notes: list[str] = []
    try:
        real = _load_data(data, spec, notes) if data is not None else None
        cls_dir = repo / spec.name / str(version)
        onnx_path = export_onnx(served, _random_u8((2, *spec.input_hw, 3), 1), cls_dir / tc.ONNX_FILE,
                                input_name=spec.input_name, output_names=[spec.output_name, spec.logits_name])
        bar.update()
        session = ort_session(onnx_path)
        io_names = dict(input_name=spec.input_name, output_name=spec.output_name)
        fixture = _random_u8((PARITY_BATCH, *spec.input_hw, 3), 2)
        for batch in sorted({PARITY_BATCH, spec.max_batch_size}):
            x = fixture if batch == PARITY_BATCH else _random_u8((batch, *spec.input_hw, 3), 3)
            rows.append(parity_vs_torch(served, session, x, model=spec.name, **io_names))
        if real is not None:
            rows.append(top1_agreement(served, session, real[1], model=spec.name, **io_names))
        np.savez(cls_dir / PARITY_FILE, inputs=fixture, probabilities=torch_outputs(served, fixture)[0])
        copy_backend("onnx_model.py", cls_dir / tc.PYTHON_FILE)
        bar.update()
        if with_tta:
            rows += _export_tta(classifier, spec, tta_views, repo, version, session, real)
            bar.update(2)
        if precision == "int8":
            rows += _to_int8(served, onnx_path, data, spec, real, source=False)
            if with_tta:
                from export.tta import TTAModel

                rows += _to_int8(TTAModel(classifier, spec, tta_views).eval(),
                                 repo / spec.tta_model_name / str(version) / tc.ONNX_FILE, data, spec, real,
                                 source=True)
        if with_dali:
            pre_dir = repo / spec.preprocess_model_name / str(version)
            from export.preprocess import serialize_pipeline

            serialize_pipeline(spec, pre_dir / tc.DALI_FILE, batch_size=spec.max_batch_size)
            copy_backend("dali_model.py", pre_dir / tc.PYTHON_FILE)
            rows.append(dali_vs_pil(pre_dir / tc.DALI_FILE, spec, _smooth_images(spec, 4)))
            ens_dir = repo / spec.ensemble_model_name / str(version)
            ens_dir.mkdir(parents=True, exist_ok=True)
            # Triton needs the (empty) version folder of an ensemble; git keeps no empty folders.
            (ens_dir / ".gitkeep").touch()
            bar.update()
        if "tensorrt" in opts.formats:
            from export.tensorrt import build_plan

            try:
                rows += build_plan(onnx_path, cls_dir / tc.PLAN_FILE, cls_dir / PLAN_MANIFEST, spec, fp16=fp16)
            except TensorRTUnavailable as exc:
                notes.append(f"tensorrt skipped: {exc}")
                opts = tc.ExportOptions(**{**opts.__dict__, "formats": tuple(f for f in opts.formats
                                                                              if f != "tensorrt")})
            bar.update()
        require_parity(rows)
        files = render_repository(spec, opts)
        write_generated(repo, files)
        remove_stale_configs(repo, files)
    except BaseException:
        for folder in created:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        bar.close()
    return ExportResult(spec=spec, options=opts, models={n: repo / n for n in names}, parity=tuple(rows),
                        notes=tuple(notes))


def _to_int8(module, onnx_path: Path, data: Path, spec: ModelSpec, real, *, source: bool) -> list[ParityRow]:
    """Replace ``onnx_path`` by its int8 graph; record its parity against the fp32 PyTorch module.

    The version's parity.npz then holds the int8 graph's own outputs (what the
    served model must reproduce); int8_parity.npz keeps the fp32 reference.
    """
    from export.quantize import (INT8_PROB_ATOL, INT8_TOP1_MIN, calibration_images, int8_figures, quantize_int8,
                                 write_int8_parity)

    model = onnx_path.parent.parent.name
    calib = calibration_images(data, spec, source=source)
    images = (real[0] if source else real[1]) if real is not None else calib
    reference = torch_outputs(module, images)[0]
    quantize_int8(onnx_path, onnx_path, calib, input_name=spec.input_name)
    session = ort_session(onnx_path)
    figures = int8_figures(session, images, reference, input_name=spec.input_name, output_name=spec.output_name)
    write_int8_parity(onnx_path.parent, images, reference, figures)
    with np.load(onnx_path.parent / PARITY_FILE) as z:
        inputs = z["inputs"]
    np.savez(onnx_path.parent / PARITY_FILE, inputs=inputs,
             probabilities=session.run([spec.output_name], {spec.input_name: inputs})[0])
    n = figures["images"]
    return [ParityRow("int8 top-1 agreement", model, n, figures["top1_agreement"], INT8_TOP1_MIN,
                      higher_is_better=True),
            ParityRow("int8 max |p - p_fp32|", model, n, figures["max_prob_diff"], INT8_PROB_ATOL)]


def _load_data(data: Path, spec: ModelSpec, notes: list[str]):
    from export.patches import load_real

    sources, crops, skipped = load_real(data, spec)
    notes += [f"skipped unreadable patch {s}" for s in skipped]
    return sources, crops


def _export_tta(classifier, spec: ModelSpec, mode: str, repo: Path, version: int, cls_session, real):
    from export.tta import TTAModel

    tta = TTAModel(classifier, spec, mode).eval()
    tta_dir = repo / spec.tta_model_name / str(version)
    path = export_onnx(tta, _random_u8((2, *spec.source_hw, 3), 4), tta_dir / tc.ONNX_FILE,
                       input_name=spec.input_name, output_names=[spec.output_name])
    session = ort_session(path)
    io_names = dict(input_name=spec.input_name, output_name=spec.output_name)
    fixture = _random_u8((PARITY_BATCH, *spec.source_hw, 3), 5)
    rows = [parity_vs_torch(tta, session, fixture, model=spec.tta_model_name, **io_names)]
    # The server-side graph must equal client-side TTA on the exported classifier.
    views = make_views(fixture, mode, spec.input_hw)
    client = combine_views(cls_session.run([spec.output_name], {spec.input_name: views})[0], num_views(mode))
    server = session.run([spec.output_name], {spec.input_name: fixture})[0]
    rows.append(ParityRow("max |p_tta - p_client_tta|", spec.tta_model_name, PARITY_BATCH,
                          float(np.abs(server - client).max()), PROB_ATOL))
    if real is not None:
        rows.append(top1_agreement(tta, session, real[0], model=spec.tta_model_name, **io_names))
    np.savez(tta_dir / PARITY_FILE, inputs=fixture, probabilities=torch_outputs(tta, fixture)[0])
    copy_backend("onnx_model.py", tta_dir / tc.PYTHON_FILE)
    return rows


def export_run(run: Path, repo: Path, *, name: str | None = None, version: int = 1,
               formats: tuple[str, ...] = ("python", "onnxruntime"), tta_views: str = "five",
               with_tta: bool = True, with_dali: bool = True, max_batch_size: int | None = None,
               instances: int = 1, max_queue_delay_us: int = tc.DEFAULT_MAX_QUEUE_DELAY_US, overwrite: bool = False,
               fp16: bool = True, trt_accelerator: bool = False, data: Path | None = None,
               progress: bool = False, precision: str = "fp32") -> ExportResult:
    """Export a run (folder or checkpoint) into ``repo``: the steps of :func:`build_repository`."""
    return build_repository(Path(run), Path(repo), name=name, version=version, formats=tuple(formats),
                            tta_views=tta_views, with_tta=with_tta, with_dali=with_dali,
                            max_batch_size=max_batch_size, instances=instances,
                            max_queue_delay_us=max_queue_delay_us, overwrite=overwrite, fp16=fp16,
                            trt_accelerator=trt_accelerator, data=data, progress=progress, precision=precision)
