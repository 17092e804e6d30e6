"""check-export: the CI gate for a model repository.

Static checks per model folder: configs, spec, versions, the manifest's
sha256 of every file, field agreement with spec.json, the weights' hash in
every config, labels, tensors, the ONNX graph, the parity fixture. Then the
fixture runs in-process (ONNX Runtime, DALI), with ``run`` PyTorch
recomputes it from the checkpoint, and when everything passed the models are
loaded into the real embedded Triton server and fed the fixture
(:mod:`export.check_server`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from export import triton_config as tc
from export.check_agree import agreement_problems, family_problems, plan_max_batch, stain_problems, weights_problems
from export.check_fixture import CPU_PRECISION, expected_of, fixture_of, in_process_rows, run_rows
from export.check_report import FAIL, OK, SKIP, CheckReport, CheckRow
from export.errors import ExportInputError, RepositoryCheckError
from export.fixture import FIXTURE_FILE
from export.graph_checks import uint8_feed_problems
from export.manifest import read_manifest, verify_manifest
from export.onnx_export import check_onnx, onnx_signature
from export.repository import BACKENDS, SPEC_FILE, export_files, read_export_options
from serving.core.errors import PatchserveError
from serving.core.spec import ModelSpec

_DTYPES = {"TYPE_UINT8": "uint8", "TYPE_FP32": "float32", "TYPE_FP16": "float16", "TYPE_INT64": "int64"}


def role_of(name: str, spec: ModelSpec) -> str | None:
    return {spec.name: "classifier", spec.tta_model_name: "tta", spec.preprocess_model_name: "preprocess",
            spec.ensemble_model_name: "ensemble"}.get(name)


def expected_io(spec: ModelSpec, role: str) -> tuple[dict, dict]:
    """(inputs, outputs): tensor name -> (dtype, dims without the batch) that the spec implies."""
    pixels = ("uint8", (spec.input_height, spec.input_width, 3))
    probs = {} if spec.features_only else {spec.output_name: ("float32", (spec.num_classes,))}
    logits = {} if spec.features_only else {spec.logits_name: ("float32", (spec.num_classes,))}
    features = {spec.features_name: ("float32", (spec.feature_size,))} if spec.has_features else {}
    encoded = {spec.encoded_name: ("uint8", (-1,))}
    both = {**probs, **logits, **features}
    return {
        "classifier": ({spec.input_name: pixels}, both),
        "tta": ({spec.input_name: ("uint8", (spec.source_height, spec.source_width, 3))}, {**probs, **features}),
        "preprocess": (encoded, {spec.input_name: pixels}),
        "ensemble": (encoded, both),
    }[role]


def config_io(cfg) -> tuple[dict, dict]:
    def table(tensors):
        from tritonclient.grpc import model_config_pb2 as mc

        return {t.name: (_DTYPES.get(mc.DataType.Name(t.data_type), mc.DataType.Name(t.data_type)), tuple(t.dims))
                for t in tensors}

    return table(cfg.input), table(cfg.output)


def _diff_io(what: str, got: tuple[dict, dict], want: tuple[dict, dict]) -> list[str]:
    problems = []
    for kind, g, w in (("input", got[0], want[0]), ("output", got[1], want[1])):
        for name in sorted(set(g) | set(w)):
            if name not in w:
                problems.append(f"{kind} {name!r} is not in {what} (it has {sorted(w)})")
            elif name not in g:
                problems.append(f"{kind} {name!r} of {what} is missing")
            elif g[name][0] != w[name][0]:
                problems.append(f"{kind} {name!r} dtype {g[name][0]}, {what} says {w[name][0]}")
            elif g[name][1] != w[name][1]:
                problems.append(f"{kind} {name!r} dims {list(g[name][1])}, {what} says {list(w[name][1])}")
    return problems


def onnx_io(model) -> tuple[dict, dict]:
    """The ONNX graph's tensors with the batch dimension removed; a fixed batch is reported as such."""
    def table(infos):
        out = {}
        for t in infos:
            batch = t.shape[0] if t.shape else None
            dims = tuple(t.shape[1:])
            out[t.name] = (t.dtype, dims if isinstance(batch, str) else ("fixed batch", batch, *dims))
        return out

    ins, outs = onnx_signature(model)
    return table(ins), table(outs)


# The Python-backend code each role runs: a release of patchserve's own (serving/server/backends/released.py),
# so code added to a model.py fails even when its manifest was rewritten to match.
_BACKEND_SOURCE = {"classifier": "onnx_model.py", "tta": "onnx_model.py", "preprocess": "dali_model.py"}


def backend_verdict(path: Path, backend: str) -> tuple[list[str], str]:
    """(problems, detail) for a model folder's ``model.py`` against the released versions of ``backend``."""
    import hashlib

    from serving.server.backends.released import RELEASED, WITHDRAWN

    rel = f"{path.parent.name}/{path.name}"
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        current = hashlib.sha256((BACKENDS / backend).read_bytes()).hexdigest()
    except OSError as exc:
        return [f"{rel}: cannot read ({exc.strerror})"], ""
    release = RELEASED.get(backend, {}).get(digest)
    if digest in WITHDRAWN:
        return [f"{rel} is patchserve {release or '?'}'s {backend}, withdrawn: {WITHDRAWN[digest]}; "
                "re-export with this version"], ""
    if digest == current:
        return [], f"{rel} is this patchserve's {backend}"
    if release is not None:
        return [], f"{rel} is patchserve {release}'s {backend}, an older release (re-export to update it)"
    return [f"{rel} differs from every released {backend} of patchserve (code the server would run); "
            "re-export with this version"], ""


def _unwritten(folder: Path, spec: ModelSpec, role: str, version: int, manifest) -> list[str]:
    """Files a (rewritten) manifest lists that export never writes into a model of this role, flavours,
    precision and format (its own export.json says which)."""
    try:
        opts = read_export_options(folder.parent, spec)
    except PatchserveError as exc:
        return [f"cannot tell which files export writes for {folder.name}: {exc}"]
    expected = export_files(spec, role, opts, version)
    return [f"{rel}: listed in the manifest, but export never writes it into the {role} model (formats "
            f"{','.join(opts.formats)}, precision {opts.precision})" for rel in sorted(manifest.files)
            if rel not in expected]


def check_model(folder: Path) -> tuple[list[CheckRow], dict | None]:
    """Static checks of one model folder; returns the rows and what the later checks need."""
    name = folder.name
    rows: list[CheckRow] = []

    def add(check: str, problems: Iterable[str], ok_detail: str = "") -> bool:
        problems = list(problems)
        rows.append(CheckRow(check, name, FAIL if problems else OK, "; ".join(problems) or ok_detail))
        return not problems

    try:
        cfg = tc.read_config(folder / "config.pbtxt")
        configs = {"config.pbtxt": cfg}
        configs.update({f"configs/{p.name}": tc.read_config(p) for p in sorted((folder / "configs").glob("*.pbtxt"))})
    except PatchserveError as exc:
        add("config", [str(exc)])
        return rows, None
    names = [c.name for c in configs.values() if c.name and c.name != name]
    if not add("config", [f"config name {n!r} differs from the folder name {name!r}" for n in names],
               f"{len(configs)} flavour(s) parse as ModelConfig"):
        return rows, None
    try:
        spec = ModelSpec.load(folder / SPEC_FILE)
        role = role_of(name, spec)
        if role is None:
            raise ExportInputError(f"the folder name is none of the models the spec of {spec.name!r} names")
    except PatchserveError as exc:
        add("spec", [str(exc)])
        return rows, None
    add("spec", [], f"{role} of {spec.name} v{spec.version} ({SPEC_FILE})")
    versions = [p for p in folder.iterdir() if p.is_dir() and p.name not in ("configs", "__pycache__")]
    bad = [p.name for p in versions if not p.name.isdigit()]
    numeric = sorted((int(p.name) for p in versions if p.name.isdigit()), reverse=True)
    add("versions", [f"version folder {b!r} is not numeric" for b in bad] + ([] if numeric else ["no version folder"]),
        f"{numeric}")
    version = numeric[0] if numeric else None
    version_dir = folder / str(version) if numeric else None
    manifest = None
    if version is not None:
        try:
            manifest = read_manifest(folder, version)
            add("manifest", verify_manifest(folder, manifest) + _unwritten(folder, spec, role, version, manifest),
                f"{len(manifest.files)} files match their sha256; no unlisted file; each is one export writes")
        except PatchserveError as exc:
            add("manifest", [str(exc)])
    plan_top, plan_problem = plan_max_batch(version_dir)
    add("agree", agreement_problems(spec, configs, version, manifest, plan_top) + ([plan_problem] if plan_problem
                                                                                    else []),
        f"configs, version folder{', plan profile' if plan_top else ''} agree with {SPEC_FILE} "
        f"(max_batch_size {spec.max_batch_size})")
    add("weights", weights_problems(configs, manifest, role != "preprocess"),
        f"every config names weights {manifest.weights_sha256[:12]}..." if manifest and role != "preprocess"
        else "no weights parameter (no weights)")
    backend = _BACKEND_SOURCE.get(role)
    if backend and version_dir is not None:
        problems, detail = backend_verdict(version_dir / tc.PYTHON_FILE, backend)
        add("backend", problems, detail)
    label_problems, label_files = [], 0
    for out in cfg.output:
        if out.label_filename:
            path = folder / out.label_filename
            if not path.is_file():
                label_problems.append(f"{out.label_filename} (output {out.name}) is missing")
                continue
            label_files += 1
            labels = [ln for ln in path.read_text().splitlines() if ln.strip()]
            if tuple(labels) != spec.class_names:
                label_problems.append(f"{out.label_filename} lists {len(labels)} labels {labels[:4]}, "
                                      f"the spec {spec.num_classes} classes {list(spec.class_names)[:4]}")
    add("labels", label_problems, f"{spec.num_classes} classes" if label_files else "no labelled output")
    want = expected_io(spec, role)
    add("io-spec", [p for c in configs.values() for p in _diff_io("the spec", config_io(c), want)],
        "names, dims and dtypes agree with the spec")
    onnx_path = version_dir / tc.ONNX_FILE if version_dir else None
    onnx_ok = False
    if onnx_path is not None and onnx_path.is_file():
        try:
            model = check_onnx(onnx_path)
            add("onnx", [], f"checker passed ({onnx_path.relative_to(folder.parent)})")
            if _is_int8(folder, spec):
                # QDQ graphs carry uint8 activations by design; int8 exports have no TensorRT flavour.
                add("uint8-cast", [], "int8 graph: ONNX Runtime only, no TensorRT flavour to feed")
            else:
                add("uint8-cast", uint8_feed_problems(model), "uint8 tensors feed only Cast nodes (TensorRT-ready)")
            add("io-onnx", [p for c in configs.values()
                            for p in _diff_io("the ONNX graph", config_io(c), onnx_io(model))],
                "names, dims and dtypes agree with the ONNX graph")
            norm = spec.stain_normalization
            add("stain", stain_problems(spec, model),
                f"the graph normalises stains as spec.json says ({norm['method']})" if norm else
                "no stain normalisation, in the graph as in spec.json")
            onnx_ok = True
        except PatchserveError as exc:
            add("onnx", [str(exc)])
    elif role in ("classifier", "tta"):
        add("onnx", [f"{onnx_path or folder / '<version>' / tc.ONNX_FILE} is missing"])
    if onnx_ok and role in ("classifier", "tta"):
        rows += _int8_rows(folder, version_dir, spec)
    need = {"name": name, "role": role, "spec": spec, "config": cfg, "version_dir": version_dir,
            "onnx": onnx_path if onnx_ok else None, "manifest": manifest, "fixture": None,
            # The graphs' precision: the fixture holds fp32 PyTorch answers, an int8 graph is held to its own row.
            "precision": "int8" if role != "preprocess" and _is_int8(folder, spec) else CPU_PRECISION}
    if version_dir is not None:
        try:
            need["fixture"] = fixture_of(need)
            need["expected"] = expected_of(role, need["fixture"], spec)
            need["expected_features"] = need["fixture"].get("features")
            count = len(need["expected"] if need["expected"] is not None else need["expected_features"])
            add("fixture", [], f"{count} images ({FIXTURE_FILE})"
                + (f", features [{spec.feature_size}] of {spec.feature_layer}" if spec.has_features and
                   role != "preprocess" else ""))
        except PatchserveError as exc:
            add("fixture", [str(exc)])
    return rows, need


def _is_int8(folder: Path, spec: ModelSpec) -> bool:
    from export.quantize import model_precision

    return model_precision(folder.parent, spec) == "int8"


def _int8_rows(folder: Path, version_dir: Path, spec: ModelSpec) -> list[CheckRow]:
    """Precision int8: the recorded parity against fp32, recomputed and held to the stated tolerance."""
    from export.quantize import INT8_FEATURES_RTOL, INT8_PROB_ATOL, INT8_TOP1_MIN, check_int8_parity

    if not _is_int8(folder, spec):
        return []
    problems = check_int8_parity(version_dir, input_name=spec.input_name,
                                 output_name=None if spec.features_only else spec.output_name,
                                 features_name=spec.features_name if spec.has_features else None)
    held = ([] if spec.features_only else [f"top-1 agreement >= {INT8_TOP1_MIN}",
                                           f"max |p_int8 - p_fp32| <= {INT8_PROB_ATOL}"]) + \
        ([f"max ||f_int8 - f_fp32|| / ||f_fp32|| <= {INT8_FEATURES_RTOL}"] if spec.has_features else [])
    return [CheckRow("int8-parity", folder.name, FAIL if problems else OK, "; ".join(problems) or ", ".join(held))]


def _fixture_rows(needs: list[dict]) -> list[CheckRow]:
    rows = []
    for need in needs:
        if need["fixture"] is not None and (need["onnx"] is not None or need["role"] in ("preprocess", "ensemble")):
            rows += in_process_rows(need)
    return rows


def _family_rows(needs: list[dict]) -> list[CheckRow]:
    families: dict[str, list[dict]] = {}
    for need in needs:
        families.setdefault(need["spec"].name, []).append(need)
    rows = []
    for family in families.values():
        for need in family:
            if len(family) > 1:
                problems = family_problems(need, family)
                rows.append(CheckRow("family", need["name"], FAIL if problems else OK,
                                     "; ".join(problems) or f"same spec and weights as the {len(family)} models "
                                                            f"of {need['spec'].name}"))
    return rows


def check_repository(repo: str | Path, models: Iterable[str] | None = None, *, serve: bool = True,
                     run: str | Path | None = None) -> CheckReport:
    """Run every check on ``repo`` (or on the named models); never raises for a broken model.

    With ``run``, the run's checkpoint recomputes every fixture's answers with
    PyTorch and the repository is compared with those (proof it serves that run).
    """
    repo = Path(repo)
    if not repo.is_dir():
        raise RepositoryCheckError(f"REPO {repo}: no such model repository folder")
    folders = sorted(p for p in repo.iterdir() if p.is_dir() and (p / "config.pbtxt").exists())
    if models:
        wanted = list(models)
        missing = [m for m in wanted if not (repo / m / "config.pbtxt").is_file()]
        if missing:
            raise RepositoryCheckError(f"--models: {missing} not in {repo} (it has {[p.name for p in folders]})")
        folders = [repo / m for m in wanted]
    if not folders:
        raise RepositoryCheckError(f"REPO {repo}: holds no model folder with a config.pbtxt")
    rows: list[CheckRow] = []
    needs = []
    for folder in folders:
        r, need = check_model(folder)
        rows += r
        if need is not None:
            needs.append(need)
    rows += _family_rows(needs)
    if run is not None:
        rows += run_rows(Path(run), needs)
    rows += _fixture_rows(needs)
    if serve:
        static_ok = all(r.status != FAIL for r in rows)
        if not static_ok:
            rows.append(CheckRow("server", "*", SKIP, "static checks failed; the server was not started"))
        else:
            from export.check_server import server_rows

            rows += server_rows(repo, needs)
    return CheckReport(tuple(rows))
