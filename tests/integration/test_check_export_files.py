"""The gate knows which files export writes, per role, flavour, precision and format, and refuses any
other even when a rewritten manifest lists it; a server's bytecode cache of model.py is judged by
whether an interpreter would run it (a copied repository's cache is inert)."""

from __future__ import annotations

import subprocess

import pytest

from export.check import check_repository, role_of
from export.manifest import model_files, read_manifest, write_manifest
from export.repository import export_files, read_export_options
from serving.core.spec import ModelSpec
from tests.fixtures_export import link_copy


def _failed(report, check):
    return [(r.model, r.detail) for r in report.failed(check)]


def test_export_writes_exactly_the_files_the_gate_expects_for_every_model(exported_repo):
    repo, spec = exported_repo
    opts = read_export_options(repo, spec)
    for name in (spec.name, spec.tta_model_name, spec.preprocess_model_name, spec.ensemble_model_name):
        folder = repo / name
        written = {f for f in model_files(folder, 1) if "__pycache__" not in f} | {"1/manifest.json"}
        assert written == export_files(ModelSpec.load(folder / "spec.json"), role_of(name, spec), opts, 1), name


@pytest.mark.parametrize("plant", [
    ("classifier", "notes.txt", b"the model's notes\n"),
    ("classifier", "1/onnxruntime.py", b"import os\n"),  # a module beside model.py that it could import
    ("tta", "configs/tensorrt.pbtxt", None),  # a copy of its onnxruntime config: the TTA model has no TensorRT flavour
    ("ensemble", "1/model.py", b"pass\n"),
    ("preprocess", "1/int8_parity.json", b"{}\n"),  # an int8 file in an fp32 export
], ids=["notes", "module-beside-model-py", "tensorrt-config-of-tta", "model-py-in-ensemble", "int8-file-in-fp32"])
def test_a_file_export_never_writes_fails_even_listed_in_a_rewritten_manifest(exported_repo, tmp_path, plant):
    repo, spec = exported_repo
    copy = link_copy(repo, tmp_path / "repo")
    role, rel, data = plant
    name = {"classifier": spec.name, "tta": spec.tta_model_name, "preprocess": spec.preprocess_model_name,
            "ensemble": spec.ensemble_model_name}[role]
    folder = copy / name
    (folder / rel).parent.mkdir(parents=True, exist_ok=True)
    (folder / rel).write_bytes(data if data is not None else (folder / "configs" / "onnxruntime.pbtxt").read_bytes())
    write_manifest(folder, 1, read_manifest(folder, 1).weights_sha256)  # the manifest lists it now
    report = check_repository(copy, serve=False)
    ((model, detail),) = _failed(report, "manifest")
    assert model == name
    assert detail.startswith(f"{rel}: listed in the manifest, but export never writes it into the {role} model "
                             "(formats python,onnxruntime, precision fp32)"), detail


def test_a_planted_module_fails_the_gate_with_run_too(exported_repo, export_run_dir, tmp_path):
    repo, spec = exported_repo
    copy = link_copy(repo, tmp_path / "repo")
    folder = copy / spec.name
    (folder / "1" / "onnxruntime.py").write_text("import os\n")
    write_manifest(folder, 1, read_manifest(folder, 1).weights_sha256)
    report = check_repository(copy, serve=False, run=export_run_dir)
    assert [m for m, _ in _failed(report, "manifest")] == [spec.name]


def test_a_plain_cp_r_of_a_served_repository_passes_the_gate(triton_server, tmp_path):
    """The server cached model.py's bytecode in the repository; cp -r gives model.py a new mtime, so
    the cache is inert (Python recompiles), and the gate must not call it 'a cached module would run'."""
    repo = triton_server.repo
    caches = sorted(repo.glob("*/1/__pycache__/model.*.pyc"))
    assert caches, "the server wrote no bytecode cache into the repository"
    subprocess.run(["cp", "-r", str(repo), str(tmp_path / "copy")], check=True)
    copy = tmp_path / "copy"
    for cache in caches:
        rel = cache.relative_to(repo)
        source = rel.parent.parent / "model.py"
        assert (copy / rel).is_file()
        assert int((copy / source).stat().st_mtime) != int((repo / source).stat().st_mtime)
    report = check_repository(copy, serve=False)
    assert report.passed, report.table()
