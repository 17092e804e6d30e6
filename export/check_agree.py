"""One source for each value: the spec's copy in the model folder against everything that repeats it.

``spec.json`` is the model folder's copy of the spec. Every config's spec
parameter and ``max_batch_size``, the version folder, the manifest and the
TensorRT plan's profile must agree with it, and the models of one family
(classifier, ``_tta``, ``_preprocess``, ``_ensemble``) with each other; each
problem names the field that differs and where.
"""

from __future__ import annotations

import json
from pathlib import Path

from export import triton_config as tc
from serving.core.errors import PatchserveError
from serving.core.spec import ModelSpec


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_ABSENT = object()


def flatten_spec(value, prefix: str = "") -> dict:
    """A spec's dict as path -> leaf value: ``extra.grayscale_equalize``, ``mean[0]`` (an empty container has no
    leaves: ``{}`` and an absent mapping mean the same, the field's default)."""
    if isinstance(value, dict):
        out: dict = {}
        for k in sorted(value):
            out.update(flatten_spec(value[k], f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, (list, tuple)):
        out = {}
        for i, v in enumerate(value):
            out.update(flatten_spec(v, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def spec_field_diffs(got: dict, want: dict, where: str, reference: str = "spec.json") -> list[str]:
    """One problem per path where two specs differ (nested fields by their whole path), in path order."""
    a, b = flatten_spec(got), flatten_spec(want)
    shown = lambda v: "(absent)" if v is _ABSENT else _short(v)  # noqa: E731
    return [f"field {k}: {where} says {shown(a.get(k, _ABSENT))}, {reference} says {shown(b.get(k, _ABSENT))}"
            for k in sorted(set(a) | set(b)) if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


def agreement_problems(spec: ModelSpec, configs: dict[str, object], version: int | None, manifest,
                       plan_max_batch: int | None) -> list[str]:
    want = spec.to_dict()
    problems = []
    for rel, cfg in configs.items():
        try:
            other = tc.config_spec(cfg)
        except PatchserveError as exc:
            problems.append(f"{rel}: its spec parameter is invalid ({exc})")
            continue
        if other is None:
            problems.append(f"{rel}: no '{tc.SPEC_PARAMETER}' parameter")
            continue
        problems += spec_field_diffs(other.to_dict(), want, f"{rel} (spec parameter)")
        if cfg.max_batch_size != spec.max_batch_size:
            problems.append(f"field max_batch_size: {rel} says {cfg.max_batch_size}, "
                            f"spec.json says {spec.max_batch_size}")
    if version is not None and version != spec.version:
        problems.append(f"field version: the version folder is {version}, spec.json says {spec.version}")
    if manifest is not None and version is not None and manifest.version != version:
        problems.append(f"field version: {version}/manifest.json says {manifest.version}, "
                        f"the version folder is {version}")
    if plan_max_batch is not None and plan_max_batch != spec.max_batch_size:
        problems.append(f"field max_batch_size: the TensorRT plan's profile says {plan_max_batch}, "
                        f"spec.json says {spec.max_batch_size}")
    return problems


def weights_problems(configs: dict[str, object], manifest, carries_weights: bool) -> list[str]:
    """Every config of a model with weights names the manifest's weights; the preprocessing model names none."""
    problems = []
    for rel, cfg in configs.items():
        got = tc.config_weights(cfg)
        if not carries_weights:
            if got is not None:
                problems.append(f"{rel}: has a '{tc.WEIGHTS_PARAMETER}' parameter but the model has no weights")
        elif got is None:
            problems.append(f"{rel}: no '{tc.WEIGHTS_PARAMETER}' parameter")
        elif manifest is not None and got != manifest.weights_sha256:
            problems.append(f"{rel}: {tc.WEIGHTS_PARAMETER} {got[:12]}..., the manifest says "
                            f"{manifest.weights_sha256[:12]}...")
    return problems


def plan_max_batch(version_dir: Path | None) -> tuple[int | None, str | None]:
    """(profile max batch, problem) from a version's plan.json; (None, None) when there is no plan."""
    path = version_dir / "plan.json" if version_dir else None
    if path is None or not path.is_file():
        return None, None
    try:
        return int(json.loads(path.read_text())["profile"]["max_batch"]), None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"{path.parent.name}/{path.name}: unreadable plan manifest ({exc})"


def family_problems(need: dict, family: list[dict]) -> list[str]:
    """A model against the other models of its family: same spec, same weights."""
    problems = []
    ref = next((n for n in family if n["role"] == "classifier"), family[0])
    if ref is need:
        return problems
    problems += spec_field_diffs(need["spec"].to_dict(), ref["spec"].to_dict(), f"{need['name']}/spec.json",
                                 f"{ref['name']}/spec.json")
    mine, theirs = need.get("manifest"), ref.get("manifest")
    if mine is not None and theirs is not None and mine.weights_sha256 != theirs.weights_sha256:
        problems.append(f"serves weights {mine.weights_sha256[:12]}..., {ref['name']} serves "
                        f"{theirs.weights_sha256[:12]}... (models of one export mixed)")
    return problems


def stain_problems(spec: ModelSpec, model) -> list[str]:
    """The stain normalisation an ONNX graph records having been exported with, against ``spec.json``'s."""
    from export.onnx_export import STAIN_METADATA, read_graph_metadata

    text = read_graph_metadata(model).get(STAIN_METADATA)
    try:
        graph = json.loads(text) if text else None
    except ValueError:
        return [f"the graph's {STAIN_METADATA} is not JSON"]
    want = spec.stain_normalization
    if graph is None and want is None:
        return []
    if graph is None or want is None:
        return [f"stain normalisation: the graph {'computes none' if graph is None else 'computes one'}, spec.json "
                f"says {'none' if want is None else want.get('method')}"]
    problems = spec_field_diffs({"stain_normalization": graph}, {"stain_normalization": want}, "the graph")
    return problems or _stain_constants(want, model)


# The arrays of each method's target, and the shapes the exported graph folds them into (2-D ones transposed).
_STAIN_ARRAYS = {"macenko": ("stain_matrix", "max_concentrations"), "reinhard": ("lab_mean", "lab_std")}


def _stain_constants(want: dict, model) -> list[str]:
    """Each of the target's arrays must be one of the graph's constants (the numbers it computes with, whatever
    its record says): an initializer or a Constant node of the same values, in either order of a matrix."""
    import numpy as np
    from onnx import numpy_helper

    consts = [numpy_helper.to_array(t) for t in model.graph.initializer if int(np.prod(t.dims)) <= 16]
    consts += [numpy_helper.to_array(a.t) for n in model.graph.node if n.op_type == "Constant"
               for a in n.attribute if a.name == "value" and int(np.prod(a.t.dims)) <= 16]
    problems = []
    for key in _STAIN_ARRAYS[want["method"]]:
        target = np.asarray(want[key], np.float32)
        orders = [target.ravel(), target.T.ravel()] if target.ndim == 2 else [target.ravel()]
        if not any(c.size == target.size and any(np.allclose(c.ravel(), o, rtol=1e-6, atol=1e-7) for o in orders)
                   for c in consts):
            problems.append(f"stain_normalization.{key}: the graph computes with no constant equal to spec.json's "
                            f"{_short(want[key])}")
    return problems
