"""check-export: passes on a good repository, fails each check on a repository broken in that one way."""

from __future__ import annotations

import re

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from export.check import check_repository
from export.manifest import read_manifest, write_manifest
from export.triton_config import read_config
from patchserve.cli import main as cli_main
from tests.fixtures_export import link_copy


def _rehash(folder, version=1):
    """What an attacker who knows the manifest format does after an edit: rewrite the manifest."""
    write_manifest(folder, version, read_manifest(folder, version).weights_sha256)


def test_good_repository_passes_every_check_including_real_inference_and_the_run_proof(
        exported_repo, export_run_dir, capsys):
    repo, spec = exported_repo
    assert cli_main(["check-export", str(repo), "--run", str(export_run_dir)]) == 0
    out = capsys.readouterr().out
    assert "check-export: PASSED" in out
    for model in (spec.name, spec.tta_model_name, spec.preprocess_model_name, spec.ensemble_model_name):
        assert f"serve          {model}" in out
        assert f"manifest       {model}" in out
    for model in (spec.name, spec.tta_model_name, spec.ensemble_model_name):
        assert f"run            {model}" in out
        # The features output, held like the logits: by the server and by the run's checkpoint.
        for check in ("features-serve", "features-run"):
            assert re.search(rf"{check} +{model} +ok", out), (check, model)
    for model in (spec.name, spec.tta_model_name):
        assert re.search(rf"features-onnx +{model} +ok", out), model
    assert "32 images" in out
    assert "FAIL" not in out


def _rewrite_config(folder, edit):
    cfg = read_config(folder / "config.pbtxt")
    edit(cfg)
    (folder / "config.pbtxt").write_text(text_format.MessageToString(cfg))


def _rename_input(cfg):
    cfg.input[0].name = "renamed"


def _wrong_dims(cfg):
    cfg.input[0].dims[0] += 1


def _wrong_dtype(cfg):
    cfg.input[0].data_type = mc.TYPE_FP32


@pytest.mark.parametrize("breakage, check, detail", [
    (lambda f: _rewrite_config(f, _rename_input), "io-onnx", "input 'renamed' is not in the ONNX graph"),
    (lambda f: _rewrite_config(f, _wrong_dims), "io-onnx", r"input '\w+' dims \[(\d+), (\d+), 3\], the ONNX graph says \[(?!\1,)\d+, \2, 3\]"),
    (lambda f: _rewrite_config(f, _wrong_dtype), "io-onnx", r"input '\w+' dtype float32, the ONNX graph says uint8"),
    (lambda f: (f / "labels.txt").unlink(), "labels", "labels.txt \\(output probabilities\\) is missing"),
    (lambda f: (f / "v2").mkdir(), "versions", "version folder 'v2' is not numeric"),
], ids=["renamed-tensor", "wrong-dims", "wrong-dtype", "missing-labels", "non-numeric-version"])
def test_check_fails_on_a_repository_broken_in_exactly_that_way(exported_repo, tmp_path, breakage, check, detail):
    repo, spec = exported_repo
    broken = link_copy(repo, tmp_path / "repo")
    breakage(broken / spec.name)
    report = check_repository(broken, serve=False)
    failed = report.failed(check)
    assert [r.model for r in failed] == [spec.name]
    assert any(re.search(detail, r.detail) for r in failed), report.table()
    # Nothing else breaks on the other models.
    assert {r.model for r in report.failed()} == {spec.name}


def test_renamed_tensor_also_disagrees_with_the_spec(exported_repo, tmp_path):
    repo, spec = exported_repo
    broken = link_copy(repo, tmp_path / "repo")
    _rewrite_config(broken / spec.name, _rename_input)
    (row,) = check_repository(broken, [spec.name], serve=False).failed("io-spec")
    assert f"input '{spec.input_name}' of the spec is missing" in row.detail


def test_cli_prints_a_table_and_exits_1_on_a_broken_repository_without_starting_the_server(
        exported_repo, tmp_path, capsys):
    repo, spec = exported_repo
    broken = link_copy(repo, tmp_path / "repo")
    (broken / spec.name / "labels.txt").write_text("only_one\n")
    assert cli_main(["check-export", str(broken), "--models", f"{spec.name},{spec.tta_model_name}"]) == 1
    out = capsys.readouterr().out
    assert "labels         " in out and "FAIL" in out and "static checks failed; the server was not started" in out
    # The edited labels.txt also differs from the export manifest.
    assert "labels.txt: sha256 differs from the manifest" in out
    assert "check-export: FAILED (2 check(s))" in out


def test_unknown_model_in_models_flag_is_an_error_naming_the_flag(exported_repo, capsys):
    repo, _ = exported_repo
    assert cli_main(["check-export", str(repo), "--models", "nope", "--no-serve"]) == 2
    assert "--models: ['nope'] not in" in capsys.readouterr().err
