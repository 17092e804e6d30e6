"""Write a run into a Triton model repository.

Layout (one folder per model, flavours side by side; the server picks one with
``--model-config-name``, falling back to ``config.pbtxt``)::

    REPO/NAME/config.pbtxt               python flavour (ONNX Runtime in the Python backend)
    REPO/NAME/configs/onnxruntime.pbtxt  ONNX Runtime backend (GPU; optional TensorRT accelerator)
    REPO/NAME/configs/tensorrt.pbtxt     TensorRT plan (only when a plan was built)
    REPO/NAME/labels.txt, spec.json, export.json
    REPO/NAME/<version>/model.onnx, model.py, fixture.npz, manifest.json[, model.plan, plan.json]
    REPO/NAME_tta/...                    the same for the server-side TTA graph
    REPO/NAME_preprocess/config.pbtxt    python flavour running model.dali with DALI on the CPU
    REPO/NAME_preprocess/configs/dali.pbtxt (and onnxruntime/tensorrt: GPU servers use the DALI backend)
    REPO/NAME_ensemble/config.pbtxt      preprocess -> classifier
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from export import triton_config as tc
from export.errors import ExportInputError, RepositoryExistsError
from serving.core.atomic import atomic_write_text
from serving.server import backends as backends_package
from serving.core.errors import SpecError
from serving.core.spec import ModelSpec, check_model_name

# The Python-backend files export copies into model folders (package data of serving.server.backends).
BACKENDS = Path(backends_package.__file__).resolve().parent
SPEC_FILE = "spec.json"
OPTIONS_FILE = "export.json"
PLAN_MANIFEST = "plan.json"
ENSEMBLE_KEEP = ".gitkeep"  # Triton needs an ensemble's version folder; git keeps no empty folders
ROLES = ("classifier", "tta", "preprocess", "ensemble")


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: the spec used, model name -> folder, the parity table."""

    spec: ModelSpec
    options: tc.ExportOptions
    models: dict[str, Path]
    parity: tuple = ()
    notes: tuple[str, ...] = field(default=())
    weights_sha256: str = ""


def render_repository(spec: ModelSpec, opts: tc.ExportOptions, weights_sha256: str | None = None) -> dict[str, str]:
    """Every generated text file of the repository (relative path -> content), from spec, options and weights."""
    files: dict[str, str] = {}
    labels = "".join(f"{c}\n" for c in spec.class_names)

    def model(name: str, configs: dict[str, object], with_labels: bool) -> None:
        # The preprocessing model (no labels) carries no weights.
        for flavour, cfg in configs.items():
            files[f"{name}/{tc.config_file(flavour)}"] = tc.to_text(tc.set_weights(cfg, weights_sha256
                                                                                  if with_labels else None))
        if with_labels and not spec.features_only:  # a features-only model has no classes to label
            files[f"{name}/{tc.LABELS_FILE}"] = labels
        files[f"{name}/{SPEC_FILE}"] = spec.to_json() + "\n"

    model(spec.name, {f: tc.classifier_config(spec, opts, f) for f in opts.formats}, True)
    files[f"{spec.name}/{OPTIONS_FILE}"] = opts.to_json()
    if opts.with_tta:
        model(spec.tta_model_name, {f: tc.tta_config(spec, opts, f) for f in opts.formats if f != "tensorrt"}, True)
    if opts.with_dali:
        gpu = {f: tc.preprocess_config(spec, opts, "dali") for f in ("dali", *opts.formats) if f != "python"}
        model(spec.preprocess_model_name, {"python": tc.preprocess_config(spec, opts, "python"), **gpu}, False)
        model(spec.ensemble_model_name, {"python": tc.ensemble_config(spec, opts)}, True)
    return files


def model_name(spec: ModelSpec, role: str) -> str:
    return {"classifier": spec.name, "tta": spec.tta_model_name, "preprocess": spec.preprocess_model_name,
            "ensemble": spec.ensemble_model_name}[role]


def version_files(role: str, opts: tc.ExportOptions) -> tuple[str, ...]:
    """The files export writes into a version folder of a model of ``role`` (names inside the folder)."""
    from export.fixture import FIXTURE_FILE
    from export.manifest import MANIFEST_FILE
    from export.quantize import INT8_PARITY_JSON, INT8_PARITY_NPZ

    files = [FIXTURE_FILE, MANIFEST_FILE]
    if role in ("classifier", "tta"):
        files += [tc.ONNX_FILE, tc.PYTHON_FILE]
        if opts.precision == "int8":
            files += [INT8_PARITY_JSON, INT8_PARITY_NPZ]
        if role == "classifier" and "tensorrt" in opts.formats:
            files += [tc.PLAN_FILE, PLAN_MANIFEST]
    elif role == "preprocess":
        files += [tc.DALI_FILE, tc.PYTHON_FILE]
    elif role == "ensemble":
        files += [ENSEMBLE_KEEP]
    else:
        raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
    return tuple(files)


def export_files(spec: ModelSpec, role: str, opts: tc.ExportOptions, version: int) -> frozenset[str]:
    """Every file export writes into the model folder of ``role`` (relative paths), for these options:
    the generated configs, labels and spec (:func:`render_repository`) and the version folder's files."""
    name = model_name(spec, role)
    generated = {rel.split("/", 1)[1] for rel in render_repository(spec, opts) if rel.split("/", 1)[0] == name}
    return frozenset(generated | {f"{version}/{f}" for f in version_files(role, opts)})


def read_export_options(repo: Path, spec: ModelSpec) -> tc.ExportOptions:
    """The options the export of ``spec`` recorded (``REPO/NAME/export.json``); ExportInputError if unusable."""
    path = Path(repo) / spec.name / OPTIONS_FILE
    try:
        return tc.ExportOptions.from_json(path.read_text())
    except OSError as exc:
        raise ExportInputError(f"{spec.name}/{OPTIONS_FILE}: cannot read ({exc.strerror})") from exc
    except (ValueError, TypeError) as exc:
        raise ExportInputError(f"{spec.name}/{OPTIONS_FILE}: unreadable ({exc})") from exc


def write_generated(repo: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        atomic_write_text(repo / rel, text)


def latest_version(folder: Path) -> int | None:
    versions = [int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()] if folder.is_dir() else []
    return max(versions) if versions else None


def recorded_weights(folder: Path) -> str | None:
    """The weights' hash in the latest version's manifest (None for a repository checked in without weights)."""
    from export.manifest import MANIFEST_FILE, read_manifest

    version = latest_version(folder)
    if version is None or not (folder / str(version) / MANIFEST_FILE).is_file():
        return None
    return read_manifest(folder, version).weights_sha256


def compare_generated(repo: str | Path) -> list[str]:
    """Regenerate every config from the checked-in spec.json + export.json; list the files that differ."""
    repo = Path(repo)
    problems = []
    for options_file in sorted(repo.glob(f"*/{OPTIONS_FILE}")):
        folder = options_file.parent
        spec = ModelSpec.load(folder / SPEC_FILE)
        opts = tc.ExportOptions.from_json(options_file.read_text())
        for rel, text in render_repository(spec, opts, recorded_weights(folder)).items():
            path = repo / rel
            if not path.is_file():
                problems.append(f"{rel}: missing")
            elif path.read_bytes() != text.encode("utf-8"):
                problems.append(f"{rel}: differs from the config generated from {folder.name}/{SPEC_FILE}")
    return problems


def regenerate(repo: str | Path) -> list[Path]:
    """Rewrite the generated files of every exported model from its spec.json + export.json."""
    repo = Path(repo)
    written = []
    for options_file in sorted(repo.glob(f"*/{OPTIONS_FILE}")):
        spec = ModelSpec.load(options_file.parent / SPEC_FILE)
        files = render_repository(spec, tc.ExportOptions.from_json(options_file.read_text()),
                                  recorded_weights(options_file.parent))
        write_generated(repo, files)
        written += [repo / rel for rel in files]
    return written


def check_version_folder(version: object) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ExportInputError(f"--version: expected a positive integer (a numeric version folder), got {version!r}")
    return version


def resolve_spec(spec: ModelSpec, *, name: str | None, version: int, max_batch_size: int | None) -> ModelSpec:
    """The exported model's spec: the run's spec with the export's name, version and batch size."""
    changes: dict = {"version": check_version_folder(version)}
    if name is not None:
        changes["name"] = check_model_name(name, "--name")
    if max_batch_size is not None:
        changes["max_batch_size"] = max_batch_size
    try:
        return spec.replace(**changes)
    except SpecError as exc:
        flag = "--max-batch-size" if "max_batch_size" in str(exc) else "--name"
        raise ExportInputError(f"{flag}: {exc}") from exc


def refuse_existing(repo: Path, names: list[str], version: int, overwrite: bool) -> None:
    existing = [repo / n / str(version) for n in names if (repo / n / str(version)).exists()]
    if existing and not overwrite:
        raise RepositoryExistsError(
            f"{existing[0]}: version {version} already exists; pass --overwrite to replace it, or --version N")


def copy_backend(src_name: str, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(BACKENDS / src_name, dst)
