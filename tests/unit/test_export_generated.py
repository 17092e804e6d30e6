"""Generated files stay generated (STYLE rule 10): the checked-in configs equal a fresh render."""

from __future__ import annotations

from pathlib import Path

from export.repository import compare_generated, regenerate, render_repository
from export.triton_config import ExportOptions, read_config
from serving.core.spec import ModelSpec

REPO = Path(__file__).resolve().parents[2] / "model_repository"


def test_checked_in_configs_equal_the_configs_generated_from_the_checked_in_spec():
    assert (REPO / "patchserve_demo" / "spec.json").is_file()
    assert compare_generated(REPO) == []


def test_checked_in_configs_parse_and_carry_the_checked_in_spec():
    spec = ModelSpec.load(REPO / "patchserve_demo" / "spec.json")
    for name in (spec.name, spec.tta_model_name, spec.preprocess_model_name, spec.ensemble_model_name):
        cfg = read_config(REPO / name / "config.pbtxt")
        assert cfg.name == name and cfg.max_batch_size == spec.max_batch_size


def test_a_hand_edited_config_is_reported_and_regenerate_restores_it(tmp_path, tiny_spec):
    opts = ExportOptions()
    for rel, text in render_repository(tiny_spec, opts).items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    cfg = tmp_path / "tiny" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace("max_batch_size: 8", "max_batch_size: 16"))
    assert compare_generated(tmp_path) == ["tiny/config.pbtxt: differs from the config generated from tiny/spec.json"]
    regenerate(tmp_path)
    assert compare_generated(tmp_path) == []
