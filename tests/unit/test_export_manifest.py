"""The gate's file-level rules: manifest hashes, unlisted files, bytecode caches, weights' hash,
field agreement with spec.json, logit tolerances and fixture selection."""

from __future__ import annotations

import io
import os
import py_compile
import sys

import numpy as np
import pytest

from export import triton_config as tc
from export.check_agree import agreement_problems, weights_problems
from export.errors import FixtureError, ManifestError
from export.fixture import LOGIT_TOLERANCE, compare, load_fixture, pick, save_fixture, tolerance
from export.manifest import read_manifest, verify_manifest, write_manifest
from export.repository import render_repository

WEIGHTS = "ab" * 32


def _model_folder(tmp_path, name="m"):
    folder = tmp_path / name
    (folder / "1").mkdir(parents=True)
    (folder / "configs").mkdir()
    (folder / "config.pbtxt").write_text("name: 'm'\n")
    (folder / "configs" / "onnxruntime.pbtxt").write_text("name: 'm'\n")
    (folder / "1" / "model.onnx").write_bytes(b"\x08\x07graph")
    (folder / "1" / "model.py").write_text("X = 1\n")
    (folder / "2").mkdir()  # another version: its own manifest, not this one's business
    (folder / "2" / "model.onnx").write_bytes(b"other")
    return folder


def test_manifest_lists_every_file_of_the_version_and_model_folder_and_verifies_clean(tmp_path):
    folder = _model_folder(tmp_path)
    manifest = write_manifest(folder, 1, WEIGHTS)
    assert sorted(manifest.files) == ["1/model.onnx", "1/model.py", "config.pbtxt", "configs/onnxruntime.pbtxt"]
    again = read_manifest(folder, 1)
    assert again == manifest and again.weights_sha256 == WEIGHTS
    assert verify_manifest(folder, again) == []


@pytest.mark.parametrize("tamper, problem", [
    (lambda f: (f / "1" / "model.py").write_text("X = 1\nimport os; os.system('id')\n"),
     "1/model.py: sha256 differs from the manifest"),
    (lambda f: (f / "1" / "model.onnx").unlink(), "1/model.onnx: listed but missing"),
    (lambda f: (f / "1" / "extra.py").write_text("pass\n"), "1/extra.py: not written by export (not in the manifest)"),
    (lambda f: (f / "configs" / "evil.pbtxt").write_text("name: 'm'\n"), "configs/evil.pbtxt: not written by export (not in the manifest)"),
], ids=["appended-line", "missing-file", "unlisted-version-file", "unlisted-config"])
def test_manifest_names_each_tampered_file(tmp_path, tamper, problem):
    folder = _model_folder(tmp_path)
    manifest = write_manifest(folder, 1, WEIGHTS)
    tamper(folder)
    assert verify_manifest(folder, manifest) == [problem]


def test_missing_or_garbled_manifest_is_an_error_naming_the_file(tmp_path):
    folder = _model_folder(tmp_path)
    with pytest.raises(ManifestError, match="1/manifest.json is missing"):
        read_manifest(folder, 1)
    (folder / "1" / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="1/manifest.json is unreadable"):
        read_manifest(folder, 1)


def test_bytecode_cache_of_the_listed_model_py_is_accepted_and_a_planted_one_is_not(tmp_path):
    folder = _model_folder(tmp_path)
    manifest = write_manifest(folder, 1, WEIGHTS)
    source = folder / "1" / "model.py"
    cache = folder / "1" / "__pycache__" / f"model.{sys.implementation.cache_tag}.pyc"
    py_compile.compile(str(source), cfile=str(cache), doraise=True)  # what an import writes
    assert verify_manifest(folder, manifest) == []
    # Other code compiled under the same header (source mtime and size): the import would run it.
    st = source.stat()
    evil = tmp_path / "model.py"
    evil.write_text("X = 2\n")  # same size as "X = 1\n"
    os.utime(evil, ns=(st.st_atime_ns, st.st_mtime_ns))
    py_compile.compile(str(evil), cfile=str(cache), doraise=True)
    assert verify_manifest(folder, manifest) == [
        f"1/__pycache__/{cache.name}: a cached module would run instead of 1/model.py "
        "(its header matches the source's mtime and size) and it is other code"]


def test_weights_hash_depends_on_the_numbers_not_on_the_checkpoint_container():
    import torch

    from training.checkpoint import weights_sha256

    state = {"fc.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "fc.bias": torch.zeros(2)}
    buf = io.BytesIO()
    torch.save({"model": state, "other": 1}, buf, _use_new_zipfile_serialization=False)
    buf.seek(0)
    reloaded = torch.load(buf, weights_only=True)["model"]
    assert weights_sha256(reloaded) == weights_sha256(dict(reversed(list(state.items()))))
    changed = {**state, "fc.bias": torch.tensor([0.0, 1e-6])}
    assert weights_sha256(changed) != weights_sha256(state)
    renamed = {"head.weight": state["fc.weight"], "fc.bias": state["fc.bias"]}
    assert weights_sha256(renamed) != weights_sha256(state)
    as_double = {k: v.double() for k, v in state.items()}
    assert weights_sha256(as_double) != weights_sha256(state)


def _configs(spec, weights=WEIGHTS):
    files = render_repository(spec, tc.ExportOptions(with_dali=False), weights)
    return {rel.split("/", 1)[1]: tc.parse_text(text) for rel, text in files.items()
            if rel.startswith(f"{spec.name}/") and rel.endswith(".pbtxt")}


def test_generated_configs_agree_with_the_spec_and_name_the_weights(tiny_spec):
    configs = _configs(tiny_spec)
    assert sorted(configs) == ["config.pbtxt", "configs/onnxruntime.pbtxt"]
    assert agreement_problems(tiny_spec, configs, 1, None, None) == []
    assert weights_problems(configs, None, True) == []
    assert {tc.config_weights(c) for c in configs.values()} == {WEIGHTS}


def test_export_options_hold_no_max_batch_size_and_an_old_export_json_with_one_is_refused():
    assert "max_batch_size" not in tc.ExportOptions().to_json()
    with pytest.raises(tc.ExportInputError, match="export.json: holds max_batch_size, which lives in spec.json only"):
        tc.ExportOptions.from_json('{"max_batch_size": 8, "formats": ["python"]}')


@pytest.mark.parametrize("edit, field, where", [
    (lambda c, s: setattr(c, "max_batch_size", 16), "max_batch_size", "configs/onnxruntime.pbtxt says 16"),
    (lambda c, s: c.parameters[tc.SPEC_PARAMETER].__setattr__("string_value", tc.spec_json(s.replace(version=2))),
     "version", "configs/onnxruntime.pbtxt (spec parameter) says 2"),
    (lambda c, s: c.parameters[tc.SPEC_PARAMETER].__setattr__("string_value", tc.spec_json(s.replace(arch="resnet50"))),
     "arch", "configs/onnxruntime.pbtxt (spec parameter) says 'resnet50'"),
    (lambda c, s: c.parameters[tc.SPEC_PARAMETER].__setattr__(
        "string_value", tc.spec_json(s.replace(class_names=("normal", "cancer")))),
     "class_names[1]", "configs/onnxruntime.pbtxt (spec parameter) says 'cancer'"),
], ids=["max_batch_size", "version", "arch", "class_names"])
def test_a_config_field_that_differs_from_spec_json_is_named(tiny_spec, edit, field, where):
    configs = _configs(tiny_spec)
    edit(configs["configs/onnxruntime.pbtxt"], tiny_spec)
    (problem,) = agreement_problems(tiny_spec, configs, 1, None, None)
    assert problem.startswith(f"field {field}: {where}, spec.json says ")


# A different valid value of every ModelSpec field; the test below fails for a field added without one.
OTHER_VALUES = {
    "name": "other", "class_names": ("normal", "cancer"), "input_height": 30, "input_width": 30,
    "mean": (0.7, 0.5, 0.6), "std": (0.15, 0.2, 0.25), "arch": "resnet50", "version": 2, "source_height": 48,
    "source_width": 48, "input_name": "pixels", "output_name": "probs", "logits_name": "raw",
    "encoded_name": "files", "max_batch_size": 4, "eval_geometry": "crop", "tta_views": ("none", "flip"),
    "extra": {"grayscale_equalize": True}, "requires": ("eval_geometry",), "unknown": {"stain_target": [0.1, 0.2]},
    "trained_mpp": 0.25, "stain_normalization": {"method": "reinhard", "lab_mean": [150.0, 128.0, 128.0],
                                                  "lab_std": [60.0, 10.0, 10.0]},
    "feature_layer": "layer4", "features_name": "feats",
    # These have a single valid value today (feature_size: the one the arch and feature_layer state): changing
    # them makes the spec parameter unreadable, which fails too.
    "input_dtype": "float32", "input_layout": "NCHW", "format_version": 2, "feature_size": 512,
}


def test_the_gate_names_a_change_of_every_spec_field_one_at_a_time(tiny_spec):
    """Generated from ModelSpec's fields: a config whose spec parameter differs from spec.json in any one field
    fails the agreement check, and the problem names that field (its whole path for nested values)."""
    import dataclasses
    import json

    fields = [f.name for f in dataclasses.fields(type(tiny_spec))]
    assert sorted(OTHER_VALUES) == sorted(fields), "give every ModelSpec field a value to change it to"
    for name in fields:
        configs = _configs(tiny_spec)
        data = tiny_spec.to_dict()
        value = OTHER_VALUES[name]
        if name == "unknown":
            data.update(value)
        else:
            data[name] = list(value) if isinstance(value, tuple) else value
        configs["configs/onnxruntime.pbtxt"].parameters[tc.SPEC_PARAMETER].string_value = json.dumps(data)
        problems = agreement_problems(tiny_spec, configs, 1, None, None)
        if name in ("input_dtype", "input_layout", "format_version", "feature_size"):
            assert problems and all(p.startswith("configs/onnxruntime.pbtxt: its spec parameter is invalid (")
                                    and name in p for p in problems), (name, problems)
            continue
        key = "stain_target" if name == "unknown" else name
        assert problems and any(p.startswith(f"field {key}") for p in problems), (name, problems)
        assert all(p.startswith("field ") for p in problems), (name, problems)


def test_a_nested_spec_value_is_named_by_its_whole_path(tiny_spec):
    import json

    configs = _configs(tiny_spec)
    data = {**tiny_spec.to_dict(), "extra": {"grayscale_equalize": True, "note": "x"}}
    configs["config.pbtxt"].parameters[tc.SPEC_PARAMETER].string_value = json.dumps(data)
    assert agreement_problems(tiny_spec, configs, 1, None, None) == [
        "field extra.grayscale_equalize: config.pbtxt (spec parameter) says true, spec.json says (absent)",
        "field extra.note: config.pbtxt (spec parameter) says 'x', spec.json says (absent)"]


def test_version_folder_manifest_and_plan_profile_are_held_to_spec_json(tiny_spec, tmp_path):
    configs = _configs(tiny_spec)
    assert agreement_problems(tiny_spec, configs, 2, None, None) == [
        "field version: the version folder is 2, spec.json says 1"]
    assert agreement_problems(tiny_spec, configs, 1, None, 16) == [
        "field max_batch_size: the TensorRT plan's profile says 16, spec.json says 8"]
    folder = _model_folder(tmp_path)
    manifest = write_manifest(folder, 1, WEIGHTS)
    assert agreement_problems(tiny_spec, configs, 1, manifest, None) == []


def test_a_config_naming_other_weights_or_none_fails_the_weights_check(tiny_spec, tmp_path):
    manifest = write_manifest(_model_folder(tmp_path), 1, WEIGHTS)
    configs = _configs(tiny_spec, weights="cd" * 32)
    assert weights_problems(configs, manifest, True)[0] == (
        f"config.pbtxt: {tc.WEIGHTS_PARAMETER} cdcdcdcdcdcd..., the manifest says abababababab...")
    bare = _configs(tiny_spec, weights=None)
    assert weights_problems(bare, manifest, True)[0] == f"config.pbtxt: no '{tc.WEIGHTS_PARAMETER}' parameter"


def test_logits_are_compared_within_the_precision_tolerance_and_top1_flips_fail():
    want = np.array([[2.0, -1.0], [0.3, 0.1], [-4.0, 5.0]])
    assert compare(want + 5e-4, want, "fp32").passed
    moved = compare(want + np.array([0.0, 0.01]), want, "fp32")
    assert not moved.passed and moved.flips == 0 and moved.max_diff == pytest.approx(0.01)
    flipped = compare(want[:, ::-1], want, "fp32")
    assert flipped.flips == 3 and not flipped.passed
    assert compare(want + 0.02, want, "fp16").passed
    assert set(LOGIT_TOLERANCE) >= {"fp32", "fp16"}
    with pytest.raises(FixtureError, match="precision 'int4': no logit tolerance stated; known: fp32, fp16"):
        tolerance("int4")


def test_fixture_pick_is_stratified_by_class_and_takes_the_lowest_margins():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(100, 2))
    labels = [i % 2 for i in range(100)]
    idx = pick(logits, labels, 32)
    assert len(idx) == 32
    assert sorted(np.bincount(np.array(labels)[idx]).tolist()) == [16, 16]
    margin = np.abs(logits[:, 0] - logits[:, 1])
    for cls in (0, 1):
        members = [i for i in range(100) if labels[i] == cls and margin[i] > 1e-3]
        lowest = sorted(members, key=lambda i: margin[i])[:8]
        assert set(lowest) <= set(idx.tolist())


def test_missing_unreadable_or_incomplete_fixture_is_an_error_never_a_skip(tmp_path):
    path = tmp_path / "1" / "fixture.npz"
    with pytest.raises(FixtureError, match="1/fixture.npz is missing"):
        load_fixture(path, ("pixels", "logits"))
    path.parent.mkdir()
    path.write_bytes(b"PK\x03\x04 garbage")
    with pytest.raises(FixtureError, match="1/fixture.npz is unreadable"):
        load_fixture(path, ("pixels", "logits"))
    save_fixture(path, {"pixels": np.zeros((2, 4, 4, 3), np.uint8)})
    with pytest.raises(FixtureError, match=r"1/fixture.npz lacks \['logits'\]"):
        load_fixture(path, ("pixels", "logits"))
