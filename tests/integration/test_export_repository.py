"""export_run: repository layout, refusals, overwrite and real-patch agreement."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from export.errors import ExportInputError, RepositoryExistsError
from export.build import export_run
from export.repository import compare_generated
from export.triton_config import read_config


def test_exported_repo_holds_every_flavour_weights_labels_and_spec(exported_repo):
    repo, spec = exported_repo
    n = spec.name
    for rel in (f"{n}/config.pbtxt", f"{n}/configs/onnxruntime.pbtxt", f"{n}/labels.txt", f"{n}/spec.json",
                f"{n}/1/model.onnx", f"{n}/1/model.py", f"{n}/1/fixture.npz", f"{n}/1/manifest.json",
                f"{n}_tta/config.pbtxt", f"{n}_tta/1/model.onnx",
                f"{n}_preprocess/config.pbtxt", f"{n}_preprocess/configs/dali.pbtxt", f"{n}_preprocess/1/model.dali",
                f"{n}_preprocess/1/model.py", f"{n}_ensemble/config.pbtxt", f"{n}_ensemble/1"):
        assert (repo / rel).exists(), rel
    assert not (repo / n / "configs" / "tensorrt.pbtxt").exists()  # no plan built without a GPU
    assert (repo / n / "labels.txt").read_text().splitlines() == list(spec.class_names)
    assert read_config(repo / n / "configs" / "onnxruntime.pbtxt").platform == "onnxruntime_onnx"
    assert compare_generated(repo) == []
    assert "max_batch_size" not in (repo / n / "export.json").read_text()  # the spec's only


def test_fixture_holds_32_real_validation_images_stratified_with_logits_and_encoded_files(exported_repo, synth_data):
    from export.fixture import load_fixture, unpack_encoded
    from export.patches import centre_crop
    from serving.core.imageio import load_rgb_u8

    repo, spec = exported_repo
    cls = load_fixture(repo / spec.name / "1" / "fixture.npz", ("pixels", "logits"))
    assert cls["pixels"].shape == (32, *spec.input_hw, 3) and cls["pixels"].dtype == np.uint8
    pre = load_fixture(repo / spec.preprocess_model_name / "1" / "fixture.npz", ("encoded", "encoded_offsets", "pixels"))
    files = unpack_encoded(pre)
    real = {p.read_bytes(): p for p in synth_data.rglob("*.png")}
    picked = [real[f.tobytes()] for f in files]  # every fixture image is a file of the data, as it was stored
    assert sum(p.parent.parent.name == "val" for p in picked) == 16  # the whole validation split first
    assert sorted(p.parent.name for p in picked).count("tumour") == 16
    for f, pixels in zip(files, cls["pixels"]):
        assert np.array_equal(centre_crop(load_rgb_u8(f.tobytes()), spec), pixels)


def test_existing_version_is_refused_without_overwrite(exported_repo, export_run_dir):
    repo, _ = exported_repo
    with pytest.raises(RepositoryExistsError, match="version 1 already exists; pass --overwrite"):
        export_run(export_run_dir, repo)


def test_run_without_a_spec_is_refused_naming_the_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": {}}, run / "checkpoint_last.pt")
    with pytest.raises(ExportInputError, match="cannot export: .*checkpoint has no model spec"):
        export_run(run, tmp_path / "repo")


def test_run_whose_spec_fails_validation_is_refused(tmp_path, tiny_spec):
    run = tmp_path / "run"
    run.mkdir()
    bad = {**tiny_spec.to_dict(), "mean": [2.0, 0.5, 0.5]}
    torch.save({"spec": bad, "model": {}, "model_config": {}}, run / "checkpoint_last.pt")
    with pytest.raises(ExportInputError, match="the checkpoint's spec is invalid: mean"):
        export_run(run, tmp_path / "repo")


def test_tensorrt_without_gpu_is_skipped_with_a_note_and_real_patches_agree_then_overwrite_replaces(
        export_run_dir, synth_data, tmp_path):
    repo = tmp_path / "repo"
    kw = dict(name="agree", formats=("python", "tensorrt"), with_tta=False, with_dali=False, data=synth_data,
              max_batch_size=4)
    result = export_run(export_run_dir, repo, **kw)
    spec = result.spec
    if importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available():
        assert any(n.startswith("tensorrt skipped:") for n in result.notes)
        assert result.options.formats == ("python",)
        assert not (repo / "agree" / "configs" / "tensorrt.pbtxt").exists()
    (top1,) = [r for r in result.parity if r.check.startswith("top-1")]
    assert top1.value == 1.0 and top1.batch == 16
    assert read_config(repo / "agree" / "config.pbtxt").max_batch_size == 4
    before = (repo / "agree" / "1" / "model.onnx").stat().st_mtime_ns
    export_run(export_run_dir, repo, overwrite=True, **kw)
    assert (repo / "agree" / "1" / "model.onnx").stat().st_mtime_ns != before
    fixture = np.load(repo / "agree" / "1" / "fixture.npz")
    assert fixture["pixels"].shape == (32, *spec.input_hw, 3) and fixture["logits"].shape == (32, spec.num_classes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # no work folder left beside the repository


def test_run_trained_with_grayscale_equalisation_exports_every_model(tmp_path, tiny_spec):
    from training.checkpoint import write_random_run

    run = write_random_run(tmp_path / "run", tiny_spec.replace(extra={"grayscale_equalize": True}))
    result = export_run(run, tmp_path / "repo", formats=("python",))
    # The DALI preprocessing equalises before its geometry, and the client sends the TTA model equalised
    # patches: grey-scale models get every flavour (parity: tests/integration/test_grayscale_serving.py).
    assert sorted(result.models) == sorted([tiny_spec.name, tiny_spec.tta_model_name,
                                            tiny_spec.preprocess_model_name, tiny_spec.ensemble_model_name])
    assert result.spec.grayscale_equalize


def test_export_repo_naming_a_file_is_refused_in_one_line_naming_the_flag(export_run_dir, tmp_path, capsys):
    from patchserve.cli import main as cli

    file = tmp_path / "models.tar"
    file.write_bytes(b"not a folder")
    for repo in (file, file / "repo"):
        assert cli(["export", str(export_run_dir), "--repo", str(repo), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err == (f"patchserve export: error: --repo {repo}: {file} is a file, not a folder; give a model "
                       "repository folder (it is created if missing)\n"), err
    assert file.read_bytes() == b"not a folder"
