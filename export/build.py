"""The export steps: checkpoint -> ONNX (+ TTA graph, DALI pipeline, TensorRT plan) -> parity -> configs."""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export import triton_config as tc
from export.errors import ExportError, ExportInputError, TensorRTUnavailable
from export.features import FEATURE_TOLERANCE, relative_errors
from export.fixture import (EQUALISED_MAX_OFF_FRACTION, FIXTURE_FILE, PREPROCESS_MAX_GREY_DIFF, log_probabilities, pack_encoded, preprocess_agreement, reference_pixels, save_fixture,
                            select_images)
from export.manifest import write_manifest
from export.onnx_export import (PROB_ATOL, ParityRow, export_onnx, features_parity, graph_metadata, ort_session,
                                parity_vs_torch, require_parity, top1_agreement, torch_outputs)
from export.patches import encode
from export.repository import (ENSEMBLE_KEEP, PLAN_MANIFEST, ExportResult, copy_backend, refuse_existing,
                               render_repository, resolve_spec, write_generated)
from export.staging import carry_other_versions, clean_leftovers, swap_in, work_folder
from serving.core.options import option
from serving.core.errors import SpecError
from serving.core.spec import FEATURE_LAYERS, ModelSpec
from serving.core.views import combine_views, make_views, num_views
from serving.core.progress import bar_disable

# PIL's BILINEAR and DALI's linear resize (both antialiased) round differently:
# a few grey levels on smooth images; more than this means a different crop or resize.
DALI_MAX_GREY_DIFF = 8
PARITY_BATCH = 3  # differs from the tracing batch (2) on purpose


@dataclass(frozen=True)
class ExportConfig:
    """Options of ``patchserve export``: what to export, where, and the configs' :class:`ExportOptions`."""

    run: Path = option(help="run folder (or checkpoint file) written by patchserve train", positional=True,
                       metavar="RUN")
    repo: Path = option(help="model repository folder to write into")
    name: str | None = option(None, "model name in the repository", default_text="the spec's name")
    max_batch_size: int | None = option(None, "largest batch the models accept",
                                        default_text="the spec's max_batch_size")
    data: Path | None = option(None, "patches for the top-1 agreement check and int8 calibration",
                               default_text="the data folder the run recorded")
    features: str | None = option(
        None, "the features output beside the probabilities: the global average pool of the last block "
              "(layer4: 512 values for resnet18/34, 2048 for resnet50 and wider) or of the third (layer3, as CLAM's "
              "truncated ResNet50: 256 / 1024), or none; recorded in the spec (feature_layer, feature_size)",
        choices=(*FEATURE_LAYERS, "none"), default_text="the run's feature_layer, else layer4")
    overwrite: bool = option(False, "replace an existing version folder")
    progress: bool = option(True, "progress bar (on a terminal only)")
    options: tc.ExportOptions = option(default_factory=tc.ExportOptions,
                                       help="what the exported configs hold (stored as export.json)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "run", Path(self.run))
        object.__setattr__(self, "repo", Path(self.repo))
        # Checked before anything is read or built: the repository is (or will be) a folder.
        for where in (self.repo, *self.repo.parents):
            if where.exists():
                if not where.is_dir():
                    raise ExportInputError(f"--repo {self.repo}: {where} is a file, not a folder; give a model "
                                           "repository folder (it is created if missing)")
                break
        if self.data is not None:
            object.__setattr__(self, "data", Path(self.data))
        if self.features is not None and self.features not in (*FEATURE_LAYERS, "none"):
            raise ExportInputError(f"--features: invalid value {self.features!r}. Only "
                                   f"{', '.join(FEATURE_LAYERS)}, none are supported.")

    @classmethod
    def of(cls, run: Path, repo: Path, **kw) -> "ExportConfig":
        """Keyword form for library callers: each keyword names a field of this class or of ExportOptions."""
        own = {f.name for f in dataclasses.fields(cls)} - {"options"}
        unknown = set(kw) - own - {f.name for f in dataclasses.fields(tc.ExportOptions)}
        if unknown:
            raise TypeError(f"export_run: unknown option(s) {', '.join(sorted(unknown))}")
        return cls(run=run, repo=repo, **{k: v for k, v in kw.items() if k in own},
                   options=tc.ExportOptions(**{k: v for k, v in kw.items() if k not in own}))


def _read_run(run: Path) -> dict:
    from serving.core.errors import PatchserveError
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


def exported_features(spec: ModelSpec, features: str | None) -> ModelSpec:
    """The exported spec's features output: ``--features``, else the run's own, else layer4."""
    if features is None:
        layer = spec.feature_layer or FEATURE_LAYERS[0]
    else:
        layer = None if features == "none" else features
    if layer is None and spec.features_only:
        raise ExportInputError("--features none: the run is a features-only model (no classes); its features "
                               "are all it outputs")
    try:
        return spec.with_features(layer)
    except SpecError as exc:
        raise ExportInputError(f"--features: {exc}") from exc


def build_repository(cfg: ExportConfig) -> ExportResult:
    from tqdm import tqdm

    from training.checkpoint import weights_sha256
    from training.model import ServedModel, build_model, served_outputs

    opts = cfg.options
    repo, data, version = cfg.repo, cfg.data, opts.version
    formats, with_tta, with_dali, precision = opts.formats, opts.with_tta, opts.with_dali, opts.precision
    payload = _read_run(cfg.run)
    spec = resolve_spec(payload["spec"], name=cfg.name, version=version, max_batch_size=cfg.max_batch_size)
    spec = exported_features(spec, cfg.features)
    if data is None:
        recorded = (payload.get("train_config") or {}).get("data")
        data = Path(recorded) if recorded and Path(recorded).exists() else None
    if precision == "int8" and data is None:
        raise ExportInputError("--precision int8: needs training images to calibrate on; pass --data (the run "
                               "records no data folder that exists here)")
    names = [spec.name] + ([spec.tta_model_name] if with_tta else []) + \
            ([spec.preprocess_model_name, spec.ensemble_model_name] if with_dali else [])
    repo.mkdir(parents=True, exist_ok=True)
    refuse_existing(repo, names, version, cfg.overwrite)
    clean_leftovers(repo)
    weights = weights_sha256(payload["model"])
    classifier = build_model(spec, payload["model_config"])
    classifier.load_state_dict(payload["model"])
    classifier.eval()
    served = ServedModel(classifier, spec.feature_layer).eval()
    # Everything is written beside the repository and swapped in at the end (export.staging).
    work = work_folder(repo)
    stage = work / "staging"
    stage.mkdir(parents=True)
    steps = 3 + int(with_tta) * 2 + int(with_dali) + int("tensorrt" in formats)
    bar = tqdm(total=steps, desc=f"export {spec.name}", unit="step", disable=bar_disable(cfg.progress))
    rows: list[ParityRow] = []
    notes: list[str] = []
    try:
        real = _load_data(data, spec, notes) if data is not None else None
        encoded, pixels = select_images(data, spec, served, notes)
        cls_dir = stage / spec.name / str(version)
        onnx_path = export_onnx(served, _random_u8((2, *spec.input_hw, 3), 1), cls_dir / tc.ONNX_FILE,
                                input_name=spec.input_name, output_names=served_outputs(spec),
                                metadata=graph_metadata(spec))
        bar.update()
        session = ort_session(onnx_path)
        for batch in sorted({PARITY_BATCH, spec.max_batch_size}):
            rows += _parity_rows(served, session, _random_u8((batch, *spec.input_hw, 3), 2 + batch), spec,
                                 spec.name, served_outputs(spec))
        if real is not None and not spec.features_only:
            rows.append(top1_agreement(served, session, real[1], model=spec.name, input_name=spec.input_name,
                                       output_name=spec.output_name))
        save_fixture(cls_dir / FIXTURE_FILE, {"pixels": pixels, **_answers(served, spec, pixels)})
        copy_backend("onnx_model.py", cls_dir / tc.PYTHON_FILE)
        bar.update()
        if with_tta:
            rows += _export_tta(classifier, spec, opts.tta_views, stage, version, session, real, encoded)
            bar.update(2)
        if precision == "int8":
            rows += _to_int8(served, onnx_path, data, spec, real, source=False)
            if with_tta:
                from export.tta import TTAModel

                rows += _to_int8(TTAModel(classifier, spec, opts.tta_views).eval(),
                                 stage / spec.tta_model_name / str(version) / tc.ONNX_FILE, data, spec, real,
                                 source=True)
        if with_dali:
            rows += _export_dali(served, spec, stage, version, encoded, pixels)
            bar.update()
        if "tensorrt" in opts.formats:
            from export.tensorrt import build_plan

            try:
                rows += build_plan(onnx_path, cls_dir / tc.PLAN_FILE, cls_dir / PLAN_MANIFEST, spec, fp16=opts.fp16)
            except TensorRTUnavailable as exc:
                notes.append(f"tensorrt skipped: {exc}")
                opts = tc.ExportOptions(**{**opts.__dict__, "formats": tuple(f for f in opts.formats
                                                                              if f != "tensorrt")})
            bar.update()
        require_parity(rows)
        write_generated(stage, render_repository(spec, opts, weights))
        for n in names:
            carry_other_versions(repo / n, stage / n, version)
            write_manifest(stage / n, version, weights)
        _check_staged(stage, names)
        swap_in(repo, work, names)
        bar.update()
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        bar.close()
    return ExportResult(spec=spec, options=opts, models={n: repo / n for n in names}, parity=tuple(rows),
                        notes=tuple(notes), weights_sha256=weights)


def _parity_rows(module, session, images: np.ndarray, spec: ModelSpec, model: str, outputs: list[str]
                 ) -> list[ParityRow]:
    """ONNX Runtime against PyTorch on one batch: the probabilities (absolute), the features (relative)."""
    rows = []
    if spec.output_name in outputs:
        rows.append(parity_vs_torch(module, session, images, model=model, input_name=spec.input_name,
                                    output_name=spec.output_name))
    if spec.features_name in outputs:
        rows.append(features_parity(module, session, images, model=model, input_name=spec.input_name,
                                    features_name=spec.features_name, index=outputs.index(spec.features_name),
                                    rtol=FEATURE_TOLERANCE["fp32"]))
    return rows


def _answers(served, spec: ModelSpec, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """PyTorch's answers on ``pixels`` for a fixture: ``logits`` (models with classes), ``features``."""
    from training.model import served_outputs

    names = served_outputs(spec)
    chunks = [torch_outputs(served, pixels[i:i + 64]) for i in range(0, len(pixels), 64)]
    out = {}
    if spec.logits_name in names:
        out["logits"] = np.concatenate([c[names.index(spec.logits_name)] for c in chunks])
    if spec.features_name in names:
        out["features"] = np.concatenate([c[names.index(spec.features_name)] for c in chunks])
    return out


def _check_staged(stage: Path, names: list[str]) -> None:
    """The gate's static checks on the new models before they replace the old ones."""
    from export.check import check_repository

    report = check_repository(stage, names, serve=False)
    if not report.passed:
        raise ExportError("the new models fail check-export; the repository was left as it was:\n"
                          + report.table())


def _export_dali(served, spec: ModelSpec, stage: Path, version: int, encoded: list[bytes],
                 pixels: np.ndarray) -> list[ParityRow]:
    from export.preprocess import run_serialized, serialize_pipeline

    pre_dir = stage / spec.preprocess_model_name / str(version)
    serialize_pipeline(spec, pre_dir / tc.DALI_FILE, batch_size=spec.max_batch_size)
    copy_backend("dali_model.py", pre_dir / tc.PYTHON_FILE)
    rows = [dali_vs_pil(pre_dir / tc.DALI_FILE, spec, _smooth_images(spec, 4))]
    save_fixture(pre_dir / FIXTURE_FILE, {**pack_encoded(encoded), "pixels": pixels})
    dali_pixels = np.stack(run_serialized(pre_dir / tc.DALI_FILE, encoded, input_name=spec.encoded_name,
                                          batch_size=spec.max_batch_size))
    _, value, _ = preprocess_agreement(dali_pixels, pixels, spec.grayscale_equalize)
    if spec.grayscale_equalize:
        rows.append(ParityRow(f"fixture share |dali - ref| > {PREPROCESS_MAX_GREY_DIFF}", spec.preprocess_model_name,
                              len(encoded), round(value, 6), EQUALISED_MAX_OFF_FRACTION))
    else:
        rows.append(ParityRow("fixture |dali - reference|", spec.preprocess_model_name, len(encoded), value,
                              PREPROCESS_MAX_GREY_DIFF))
    ens_dir = stage / spec.ensemble_model_name / str(version)
    ens_dir.mkdir(parents=True, exist_ok=True)
    (ens_dir / ENSEMBLE_KEEP).touch()
    save_fixture(ens_dir / FIXTURE_FILE, {**pack_encoded(encoded), "dali_pixels": dali_pixels,
                                          **_answers(served, spec, dali_pixels)})
    return rows


def _to_int8(module, onnx_path: Path, data: Path, spec: ModelSpec, real, *, source: bool) -> list[ParityRow]:
    """Replace ``onnx_path`` by its int8 graph; record its parity against the fp32 PyTorch module.

    The files go into the staged version folder before its manifest is
    written, so the manifest lists them. The version's fixture keeps the fp32
    PyTorch answers: the gate holds the int8 graph to them with the int8 row
    of export.fixture's tolerances.
    """
    from export.quantize import (INT8_FEATURES_RTOL, INT8_PROB_ATOL, INT8_TOP1_MIN, calibration_images, int8_figures,
                                 quantize_int8, write_int8_parity)

    model = onnx_path.parent.parent.name
    calib = calibration_images(data, spec, source=source)
    images = (real[0] if source else real[1]) if real is not None else calib
    answers = torch_outputs(module, images)
    # The module's outputs: the probabilities first (models with classes), the features last (models with them).
    reference = None if spec.features_only else answers[0]
    features = answers[-1] if spec.has_features else None
    quantize_int8(onnx_path, onnx_path, calib, input_name=spec.input_name)
    session = ort_session(onnx_path)
    figures = int8_figures(session, images, reference, input_name=spec.input_name,
                           output_name=None if spec.features_only else spec.output_name,
                           reference_features=features, features_name=spec.features_name if spec.has_features else None)
    write_int8_parity(onnx_path.parent, images, reference, figures, reference_features=features)
    n = figures["images"]
    rows = []
    if reference is not None:
        rows += [ParityRow("int8 top-1 agreement", model, n, figures["top1_agreement"], INT8_TOP1_MIN,
                           higher_is_better=True),
                 ParityRow("int8 max |p - p_fp32|", model, n, figures["max_prob_diff"], INT8_PROB_ATOL)]
    if features is not None:
        rows.append(ParityRow("int8 max rel |f - f_fp32|", model, n, figures["max_features_rel"], INT8_FEATURES_RTOL))
    return rows


def _load_data(data: Path, spec: ModelSpec, notes: list[str]):
    from export.patches import load_real

    sources, crops, skipped = load_real(data, spec)
    notes += [f"skipped unreadable patch {s}" for s in skipped]
    return sources, crops


def _export_tta(classifier, spec: ModelSpec, mode: str, stage: Path, version: int, cls_session, real,
                encoded: list[bytes]):
    from export.tta import TTAModel, tta_outputs
    from training.model import served_outputs

    tta = TTAModel(classifier, spec, mode).eval()
    tta_dir = stage / spec.tta_model_name / str(version)
    outputs = tta_outputs(spec)
    path = export_onnx(tta, _random_u8((2, *spec.source_hw, 3), 4), tta_dir / tc.ONNX_FILE,
                       input_name=spec.input_name, output_names=outputs, metadata=graph_metadata(spec))
    session = ort_session(path)
    fixture = _random_u8((PARITY_BATCH, *spec.source_hw, 3), 5)
    rows = _parity_rows(tta, session, fixture, spec, spec.tta_model_name, outputs)
    # The server-side graph must equal client-side TTA on the exported classifier: the mean of the views'
    # probabilities, and of their features.
    views = make_views(fixture, mode, spec.input_hw)
    served = served_outputs(spec)
    client = dict(zip(served, cls_session.run(served, {spec.input_name: views})))
    server = dict(zip(outputs, session.run(outputs, {spec.input_name: fixture})))
    if spec.output_name in outputs:
        rows.append(ParityRow("max |p_tta - p_client_tta|", spec.tta_model_name, PARITY_BATCH,
                              float(np.abs(server[spec.output_name]
                                           - combine_views(client[spec.output_name], num_views(mode))).max()),
                              PROB_ATOL))
    if spec.features_name in outputs:
        rel = relative_errors(server[spec.features_name], combine_views(client[spec.features_name], num_views(mode)))
        rows.append(ParityRow("max rel |f_tta - f_client_tta|", spec.tta_model_name, PARITY_BATCH,
                              float(rel.max()), FEATURE_TOLERANCE["fp32"]))
    if real is not None and spec.output_name in outputs:
        rows.append(top1_agreement(tta, session, real[0], model=spec.tta_model_name, input_name=spec.input_name,
                                   output_name=spec.output_name))
    sources = np.stack([reference_pixels(e, spec)[0] for e in encoded])
    answers = [torch_outputs(tta, sources[i:i + 16]) for i in range(0, len(sources), 16)]
    arrays = {"sources": sources}
    if spec.output_name in outputs:
        arrays["log_probabilities"] = log_probabilities(np.concatenate([a[0] for a in answers]))
    if spec.features_name in outputs:
        arrays["features"] = np.concatenate([a[outputs.index(spec.features_name)] for a in answers])
    save_fixture(tta_dir / FIXTURE_FILE, arrays)
    copy_backend("onnx_model.py", tta_dir / tc.PYTHON_FILE)
    return rows


def export_run(run: Path | ExportConfig, repo: Path | None = None, **kw) -> ExportResult:
    """Export a run (folder or checkpoint) into ``repo``: the steps of :func:`build_repository`.

    Takes an :class:`ExportConfig` (what the command line builds), or ``run``,
    ``repo`` and keywords named after its fields and :class:`ExportOptions`'.
    """
    cfg = run if isinstance(run, ExportConfig) else ExportConfig.of(run, repo, **kw)
    return build_repository(cfg)
