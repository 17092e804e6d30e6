"""check-export: the CI gate for a model repository.

Static checks per model folder (config, spec, versions, labels, ONNX graph,
TensorRT profile, stored parity fixture), then, when they all pass, the
python flavours are loaded into the real embedded Triton server and compared
with ONNX Runtime in-process (:mod:`export.check_server`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np

from export import triton_config as tc
from export.check_report import FAIL, OK, SKIP, CheckReport, CheckRow
from export.errors import ExportInputError, RepositoryCheckError
from export.graph_checks import uint8_feed_problems
from export.onnx_export import PROB_ATOL, check_onnx, onnx_signature, ort_session
from serving.errors import PatchserveError
from serving.spec import ModelSpec

_DTYPES = {"TYPE_UINT8": "uint8", "TYPE_FP32": "float32", "TYPE_FP16": "float16", "TYPE_INT64": "int64"}


def role_of(name: str, spec: ModelSpec) -> str | None:
    return {spec.name: "classifier", spec.tta_model_name: "tta", spec.preprocess_model_name: "preprocess",
            spec.ensemble_model_name: "ensemble"}.get(name)


def expected_io(spec: ModelSpec, role: str) -> tuple[dict, dict]:
    """(inputs, outputs): tensor name -> (dtype, dims without the batch) that the spec implies."""
    pixels = ("uint8", (spec.input_height, spec.input_width, 3))
    probs = ("float32", (spec.num_classes,))
    encoded = {spec.encoded_name: ("uint8", (-1,))}
    both = {spec.output_name: probs, spec.logits_name: probs}
    return {
        "classifier": ({spec.input_name: pixels}, both),
        "tta": ({spec.input_name: ("uint8", (spec.source_height, spec.source_width, 3))}, {spec.output_name: probs}),
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


def check_model(folder: Path) -> tuple[list[CheckRow], dict | None]:
    """Static checks of one model folder; returns the rows and what the server checks need."""
    name = folder.name
    rows: list[CheckRow] = []

    def add(check: str, problems: Iterable[str], ok_detail: str = "") -> bool:
        problems = list(problems)
        rows.append(CheckRow(check, name, FAIL if problems else OK, "; ".join(problems) or ok_detail))
        return not problems

    try:
        cfg = tc.read_config(folder / "config.pbtxt")
        others = [tc.read_config(p) for p in sorted((folder / "configs").glob("*.pbtxt"))]
    except PatchserveError as exc:
        add("config", [str(exc)])
        return rows, None
    names = [c.name for c in (cfg, *others) if c.name and c.name != name]
    if not add("config", [f"config name {n!r} differs from the folder name {name!r}" for n in names],
               f"{1 + len(others)} flavour(s) parse as ModelConfig"):
        return rows, None
    try:
        spec = tc.config_spec(cfg)
        if spec is None:
            raise ExportInputError(f"no '{tc.SPEC_PARAMETER}' parameter in config.pbtxt")
        role = role_of(name, spec)
        if role is None:
            raise ExportInputError(f"the folder name is none of the models the spec of {spec.name!r} names")
    except PatchserveError as exc:
        add("spec", [str(exc)])
        return rows, None
    add("spec", [], f"{role} of {spec.name} v{spec.version}")
    versions = [p for p in folder.iterdir() if p.is_dir() and p.name not in ("configs", "__pycache__")]
    bad = [p.name for p in versions if not p.name.isdigit()]
    numeric = sorted((int(p.name) for p in versions if p.name.isdigit()), reverse=True)
    add("versions", [f"version folder {b!r} is not numeric" for b in bad] + ([] if numeric else ["no version folder"]),
        f"{numeric}")
    version_dir = folder / str(numeric[0]) if numeric else None
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
    add("io-spec", [p for c in (cfg, *others) for p in _diff_io("the spec", config_io(c), want)],
        "names, dims and dtypes agree with the spec")
    onnx_path = version_dir / tc.ONNX_FILE if version_dir else None
    session = None
    if onnx_path is not None and onnx_path.is_file():
        try:
            model = check_onnx(onnx_path)
            add("onnx", [], f"checker passed ({onnx_path.relative_to(folder.parent)})")
            if _is_int8(folder, spec):
                # QDQ graphs carry uint8 activations by design; int8 exports have no TensorRT flavour.
                add("uint8-cast", [], "int8 graph: ONNX Runtime only, no TensorRT flavour to feed")
            else:
                add("uint8-cast", uint8_feed_problems(model), "uint8 tensors feed only Cast nodes (TensorRT-ready)")
            add("io-onnx", [p for c in (cfg, *others) for p in _diff_io("the ONNX graph", config_io(c), onnx_io(model))],
                "names, dims and dtypes agree with the ONNX graph")
            session = ort_session(onnx_path)
        except PatchserveError as exc:
            add("onnx", [str(exc)])
    elif role in ("classifier", "tta"):
        add("onnx", [f"{onnx_path or folder / '<version>' / tc.ONNX_FILE} is missing"])
    rows += _plan_rows(folder, version_dir, cfg, spec)
    if session is not None and (version_dir / "parity.npz").is_file():
        fixture = np.load(version_dir / "parity.npz")
        got = session.run([spec.output_name], {spec.input_name: fixture["inputs"]})[0]
        diff = float(np.abs(got - fixture["probabilities"]).max())
        add("parity", [f"max |p - p_export| {diff:.3g} > {PROB_ATOL}"] if diff > PROB_ATOL else [],
            f"stored fixture re-run: max |diff| {diff:.2g} <= {PROB_ATOL}")
    if session is not None and role in ("classifier", "tta"):
        rows += _int8_rows(folder, version_dir, spec)
    need = {"name": name, "role": role, "spec": spec, "config": cfg, "version_dir": version_dir,
            "onnx": onnx_path if session is not None else None}
    return rows, need


def _is_int8(folder: Path, spec: ModelSpec) -> bool:
    from export.quantize import model_precision

    return model_precision(folder.parent, spec) == "int8"


def _int8_rows(folder: Path, version_dir: Path, spec: ModelSpec) -> list[CheckRow]:
    """Precision int8: the recorded parity against fp32, recomputed and held to the stated tolerance."""
    from export.quantize import INT8_PROB_ATOL, INT8_TOP1_MIN, check_int8_parity

    if not _is_int8(folder, spec):
        return []
    problems = check_int8_parity(version_dir, input_name=spec.input_name, output_name=spec.output_name)
    return [CheckRow("int8-parity", folder.name, FAIL if problems else OK, "; ".join(problems) or
                     f"top-1 agreement >= {INT8_TOP1_MIN}, max |p_int8 - p_fp32| <= {INT8_PROB_ATOL}")]


def _plan_rows(folder: Path, version_dir: Path | None, cfg, spec: ModelSpec) -> list[CheckRow]:
    manifest = version_dir / "plan.json" if version_dir else None
    if manifest is None or not manifest.is_file():
        return []
    try:
        profile = json.loads(manifest.read_text())["profile"]
        top = int(profile["max_batch"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [CheckRow("trt-profile", folder.name, FAIL, f"{manifest.name}: unreadable manifest ({exc})")]
    if cfg.max_batch_size > top:
        return [CheckRow("trt-profile", folder.name, FAIL,
                         f"max_batch_size {cfg.max_batch_size} exceeds the plan's profile (1..{top})")]
    return [CheckRow("trt-profile", folder.name, OK, f"max_batch_size {cfg.max_batch_size} within 1..{top}")]


def check_repository(repo: str | Path, models: Iterable[str] | None = None, *, serve: bool = True) -> CheckReport:
    """Run every check on ``repo`` (or on the named models); never raises for a broken model."""
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
    if serve:
        static_ok = all(r.status != FAIL for r in rows)
        if not static_ok:
            rows.append(CheckRow("server", "*", SKIP, "static checks failed; the server was not started"))
        else:
            from export.check_server import server_rows

            rows += server_rows(repo, needs)
    return CheckReport(tuple(rows))
