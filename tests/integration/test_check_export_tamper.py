"""check-export against tampered and drifted repositories: each kind of tampering fails
the gate with a row naming the model and the check, with and without a rewritten manifest."""

from __future__ import annotations

import json

import numpy as np
import pytest
from google.protobuf import text_format

from export import triton_config as tc
from export.check import check_repository
from export.fixture import load_fixture, save_fixture
from export.manifest import read_manifest, write_manifest
from patchserve.cli import main as cli_main
from tests.fixtures_export import link_copy


def _rehash(folder, version=1):
    write_manifest(folder, version, read_manifest(folder, version).weights_sha256)


def _replace(path, data: bytes):
    path.unlink()  # the copy links the large files to the shared repository
    path.write_bytes(data)


def _edit_head_bias(folder, delta):
    import onnx

    path = folder / "1" / "model.onnx"
    model = onnx.load(str(path))
    (bias,) = [i for i in model.graph.initializer if i.name.endswith("head.bias")]
    values = onnx.numpy_helper.to_array(bias).copy()
    values = delta(values)
    bias.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.float32), bias.name))
    _replace(path, model.SerializeToString())


def _negate_head(folder):
    import onnx

    path = folder / "1" / "model.onnx"
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if init.name.endswith(("head.weight", "head.bias")):
            init.CopyFrom(onnx.numpy_helper.from_array(-onnx.numpy_helper.to_array(init), init.name))
    _replace(path, model.SerializeToString())


def _other_resize_dali(folder, spec):
    from export.preprocess import serialize_pipeline

    path = folder / "1" / "model.dali"
    path.unlink()
    serialize_pipeline(spec.replace(source_height=spec.source_height + 11, source_width=spec.source_width + 11),
                       path, batch_size=spec.max_batch_size)


@pytest.fixture
def copy_of(exported_repo, tmp_path):
    repo, spec = exported_repo
    return link_copy(repo, tmp_path / "repo"), spec


def _failed(report, check, model):
    rows = report.failed(check)
    assert [r.model for r in rows] == [model], report.table()
    return rows[0].detail


@pytest.mark.parametrize("rehash", [False, True], ids=["as-is", "manifest-rewritten"])
def test_edited_head_bias_fails_the_manifest_and_else_the_fixture_in_onnx_runtime(copy_of, rehash):
    repo, spec = copy_of
    folder = repo / spec.name
    _edit_head_bias(folder, lambda b: b + np.array([0.05, 0.0]))
    if rehash:
        _rehash(folder)
    report = check_repository(repo, serve=False)
    if not rehash:
        assert _failed(report, "manifest", spec.name) == "1/model.onnx: sha256 differs from the manifest"
    else:
        assert "OUT OF TOLERANCE" in _failed(report, "fixture-onnx", spec.name)
        assert not report.failed("manifest")


@pytest.mark.parametrize("rehash", [False, True], ids=["as-is", "manifest-rewritten"])
def test_negated_head_with_its_fixture_deleted_fails_the_fixture_check(copy_of, rehash):
    repo, spec = copy_of
    folder = repo / spec.name
    _negate_head(folder)
    (folder / "1" / "fixture.npz").unlink()
    if rehash:
        _rehash(folder)
    report = check_repository(repo, serve=False)
    assert _failed(report, "fixture", spec.name) == "1/fixture.npz is missing"
    assert bool(report.failed("manifest")) != rehash


@pytest.mark.parametrize("rehash", [False, True], ids=["as-is", "manifest-rewritten"])
def test_line_appended_to_a_generated_model_py_fails(copy_of, rehash):
    repo, spec = copy_of
    folder = repo / spec.tta_model_name
    with open(folder / "1" / "model.py", "a") as fh:
        fh.write("import os; os.system('touch /tmp/owned')\n")
    if rehash:
        _rehash(folder)
    report = check_repository(repo, serve=False)
    assert _failed(report, "backend", spec.tta_model_name) == \
        "1/model.py differs from every released onnx_model.py of patchserve (code the server would run); " \
        "re-export with this version"
    if not rehash:
        assert _failed(report, "manifest", spec.tta_model_name) == "1/model.py: sha256 differs from the manifest"
    assert "server" not in {r.check for r in report.rows if r.status == "ok"}


def test_a_model_py_of_an_older_release_passes_and_a_withdrawn_one_fails_saying_re_export(copy_of, monkeypatch):
    """An upgrade of patchserve does not break repositories exported before it; a withdrawn release does."""
    import hashlib

    from serving.server.backends import released

    repo, spec = copy_of
    folder = repo / spec.name
    older = b"# patchserve 0.0.9's onnx_model.py, as an older export copied it\n"
    (folder / "1" / "model.py").write_bytes(older)
    _rehash(folder)  # the older export's manifest listed its own model.py
    digest = hashlib.sha256(older).hexdigest()
    report = check_repository(repo, serve=False)
    assert "differs from every released onnx_model.py" in _failed(report, "backend", spec.name)
    monkeypatch.setitem(released.RELEASED, "onnx_model.py", {**released.RELEASED["onnx_model.py"], digest: "0.0.9"})
    report = check_repository(repo, serve=False)
    (row,) = [r for r in report.rows if r.check == "backend" and r.model == spec.name]
    assert (row.status, row.detail) == ("ok", "1/model.py is patchserve 0.0.9's onnx_model.py, an older release "
                                              "(re-export to update it)")
    monkeypatch.setitem(released.WITHDRAWN, digest, "it crashed on truncated PNGs")
    report = check_repository(repo, serve=False)
    assert _failed(report, "backend", spec.name) == ("1/model.py is patchserve 0.0.9's onnx_model.py, withdrawn: it "
                                                     "crashed on truncated PNGs; re-export with this version")


@pytest.mark.parametrize("rehash", [False, True], ids=["as-is", "manifest-rewritten"])
def test_dali_pipeline_of_another_export_fails_against_the_reference_decoding(copy_of, rehash):
    repo, spec = copy_of
    folder = repo / spec.preprocess_model_name
    _other_resize_dali(folder, spec)
    if rehash:
        _rehash(folder)
    report = check_repository(repo, serve=False)
    detail = _failed(report, "fixture-dali", spec.preprocess_model_name)
    assert "max |pixel - reference decoding|" in detail and detail.endswith("> 1")
    assert bool(report.failed("manifest")) != rehash


def test_unlisted_file_in_a_version_folder_fails(copy_of):
    repo, spec = copy_of
    (repo / spec.name / "1" / "model.plan").write_bytes(b"not from export")
    report = check_repository(repo, serve=False)
    assert _failed(report, "manifest", spec.name) == "1/model.plan: not written by export (not in the manifest)"


def test_config_naming_other_weights_fails_the_weights_check(copy_of):
    repo, spec = copy_of
    path = repo / spec.ensemble_model_name / "config.pbtxt"
    cfg = tc.read_config(path)
    cfg.parameters[tc.WEIGHTS_PARAMETER].string_value = "0" * 64
    path.write_text(text_format.MessageToString(cfg))
    _rehash(repo / spec.ensemble_model_name)
    report = check_repository(repo, serve=False)
    assert _failed(report, "weights", spec.ensemble_model_name).startswith(
        f"config.pbtxt: {tc.WEIGHTS_PARAMETER} 000000000000..., the manifest says ")


@pytest.mark.parametrize("field", ["max_batch_size", "version", "arch", "class_names"])
def test_each_spec_field_that_drifts_is_named_by_the_agree_check(copy_of, field):
    repo, spec = copy_of
    folder = repo / spec.tta_model_name
    path = folder / "configs" / "onnxruntime.pbtxt"
    cfg = tc.read_config(path)
    changed = {"version": 2, "arch": "resnet34", "class_names": ("normal", "cancer")}
    if field == "max_batch_size":
        cfg.max_batch_size = spec.max_batch_size * 2
    else:
        cfg.parameters[tc.SPEC_PARAMETER].string_value = tc.spec_json(spec.replace(**{field: changed[field]}))
    path.write_text(text_format.MessageToString(cfg))
    _rehash(folder)
    detail = _failed(check_repository(repo, serve=False), "agree", spec.tta_model_name)
    path_of = {"class_names": "class_names[1]"}  # a list's element is named by its index
    assert detail.startswith(f"field {path_of.get(field, field)}: configs/onnxruntime.pbtxt")


def test_spec_json_of_one_model_drifting_from_its_family_is_named(copy_of):
    repo, spec = copy_of
    folder = repo / spec.preprocess_model_name
    (folder / "spec.json").write_text(spec.replace(max_batch_size=4).to_json() + "\n")
    _rehash(folder)
    report = check_repository(repo, serve=False)
    assert "field max_batch_size: config.pbtxt says 8, spec.json says 4" in \
        _failed(report, "agree", spec.preprocess_model_name)
    assert _failed(report, "family", spec.preprocess_model_name).startswith(
        f"field max_batch_size: {spec.preprocess_model_name}/spec.json says 4, {spec.name}/spec.json says 8")


def test_model_and_fixture_edited_together_pass_without_run_and_fail_with_it(copy_of, export_run_dir):
    repo, spec = copy_of
    folder = repo / spec.name
    _edit_head_bias(folder, lambda b: b + np.array([0.5, -0.5]))
    from export.onnx_export import ort_session

    fixture = load_fixture(folder / "1" / "fixture.npz", ("pixels", "logits"))
    session = ort_session(folder / "1" / "model.onnx")
    fixture["logits"] = session.run([spec.logits_name], {spec.input_name: fixture["pixels"]})[0]
    (folder / "1" / "fixture.npz").unlink()
    save_fixture(folder / "1" / "fixture.npz", fixture)
    _rehash(folder)
    assert check_repository(repo, [spec.name], serve=False).passed
    report = check_repository(repo, [spec.name], serve=False, run=export_run_dir)
    assert "stored fixture vs PyTorch on the run's checkpoint logits" in _failed(report, "run", spec.name)
    assert "OUT OF TOLERANCE" in _failed(report, "fixture-onnx", spec.name)


def test_run_with_other_weights_is_refused_by_hash(copy_of, tmp_path):
    from training.checkpoint import write_random_run

    repo, spec = copy_of
    other = write_random_run(tmp_path / "other", spec, seed=1)
    report = check_repository(repo, [spec.name, spec.tta_model_name], serve=False, run=other)
    assert {r.model for r in report.failed("run")} == {spec.name, spec.tta_model_name}
    assert all("serves weights" in r.detail for r in report.failed("run"))


def test_json_output_lists_every_row_and_exits_1_on_failure(copy_of, capsys):
    repo, spec = copy_of
    (repo / spec.name / "1" / "fixture.npz").write_bytes(b"garbage")
    assert cli_main(["check-export", str(repo), "--no-serve", "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["passed"] is False
    failed = {(r["check"], r["model"]) for r in result["rows"] if r["status"] == "FAIL"}
    assert failed == {("manifest", spec.name), ("fixture", spec.name)}
    assert set(result["rows"][0]) == {"check", "model", "status", "detail"}


def test_ensemble_answers_that_disagree_with_its_fixture_fail_in_the_real_server(copy_of):
    repo, spec = copy_of
    folder = repo / spec.ensemble_model_name
    path = folder / "1" / "fixture.npz"
    fixture = load_fixture(path, ("encoded", "encoded_offsets", "dali_pixels", "logits"))
    fixture["logits"] = fixture["logits"] + np.array([0.0, 0.01], dtype=np.float32)
    path.unlink()
    save_fixture(path, fixture)
    _rehash(folder)
    report = check_repository(repo, serve=True)
    detail = _failed(report, "serve", spec.ensemble_model_name)
    assert detail.startswith("served, one file per request logits: 32 images") and "OUT OF TOLERANCE" in detail
    assert [r.status for r in report.rows if r.check == "serve" and r.model != spec.ensemble_model_name] == \
        ["ok"] * 3
