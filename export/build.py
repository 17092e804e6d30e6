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
from serving.progress import bar_disable

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
                     progress) -> ExportResult:
    from tqdm import tqdm

    from training.model import ServedModel, build_model

    payload = _read_run(run)
    spec = resolve_spec(payload["spec"], name=name, version=version, max_batch_size=max_batch_size)
    opts = tc.ExportOptions(max_batch_size=spec.max_batch_size, version=version, formats=formats,
                            tta_views=tta_views, with_tta=with_tta, with_dali=with_dali, instances=instances,
                            max_queue_delay_us=max_queue_delay_us, fp16=fp16, trt_accelerator=trt_accelerator)
    if data is None:
        recorded = (payload.get("train_config") or {}).get("data")
        data = Path(recorded) if recorded and Path(recorded).exists() else None
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
    bar = tqdm(total=steps, desc=f"export {spec.name}", unit="step", disable=bar_disable(progress))
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
               instances: int = 1, max_queue_delay_us: int = 2000, overwrite: bool = False,
               fp16: bool = True, trt_accelerator: bool = False, data: Path | None = None,
               progress: bool = False) -> ExportResult:
    """Export a run (folder or checkpoint) into ``repo``: the steps of :func:`build_repository`."""
    return build_repository(Path(run), Path(repo), name=name, version=version, formats=tuple(formats),
                            tta_views=tta_views, with_tta=with_tta, with_dali=with_dali,
                            max_batch_size=max_batch_size, instances=instances,
                            max_queue_delay_us=max_queue_delay_us, overwrite=overwrite, fp16=fp16,
                            trt_accelerator=trt_accelerator, data=data, progress=progress)
