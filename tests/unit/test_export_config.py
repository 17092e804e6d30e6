"""Triton configs built as protobuf messages: round trips, flavours, validation."""

from __future__ import annotations

import pytest

from export import triton_config as tc
from export.errors import ExportInputError
from export.repository import render_repository, resolve_spec


@pytest.fixture
def opts():
    return tc.ExportOptions(formats=("python", "onnxruntime"), tta_views="ten")


@pytest.mark.parametrize("role", ["classifier", "tta", "preprocess", "ensemble"])
def test_generated_pbtxt_parses_back_into_an_equal_model_config(tiny_spec, opts, role):
    build = {"classifier": lambda: tc.classifier_config(tiny_spec, opts, "python"),
             "tta": lambda: tc.tta_config(tiny_spec, opts, "onnxruntime"),
             "preprocess": lambda: tc.preprocess_config(tiny_spec, opts, "dali"),
             "ensemble": lambda: tc.ensemble_config(tiny_spec, opts)}[role]
    message = build()
    assert tc.parse_text(tc.to_text(message)) == message


def test_classifier_config_takes_its_names_dims_and_spec_from_the_spec(tiny_spec, opts):
    cfg = tc.classifier_config(tiny_spec, opts, "python")
    assert cfg.name == "tiny" and cfg.backend == "python" and cfg.max_batch_size == 8
    assert [(i.name, list(i.dims)) for i in cfg.input] == [("images_nhwc_u8", [32, 32, 3])]
    assert [(o.name, list(o.dims), o.label_filename) for o in cfg.output] == [
        ("probabilities", [2], "labels.txt"), ("logits", [2], "")]
    assert tc.config_spec(cfg) == tiny_spec
    assert cfg.instance_group[0].kind == cfg.instance_group[0].KIND_CPU
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]
    assert cfg.model_warmup[0].batch_size == 8 and cfg.model_warmup[0].inputs["images_nhwc_u8"].zero_data
    assert cfg.version_policy.latest.num_versions == 1


def test_onnxruntime_flavour_runs_on_gpu_with_optional_tensorrt_fp16_accelerator(tiny_spec):
    plain = tc.classifier_config(tiny_spec, tc.ExportOptions(), "onnxruntime")
    assert plain.platform == "onnxruntime_onnx" and plain.default_model_filename == "model.onnx"
    assert plain.instance_group[0].kind == plain.instance_group[0].KIND_GPU
    assert not plain.optimization.execution_accelerators.gpu_execution_accelerator
    accel = tc.classifier_config(tiny_spec, tc.ExportOptions(trt_accelerator=True), "onnxruntime")
    (block,) = accel.optimization.execution_accelerators.gpu_execution_accelerator
    assert block.name == "tensorrt" and block.parameters["precision_mode"] == "FP16"


def test_tta_config_takes_source_size_patches_and_records_its_views(tiny_spec, opts):
    cfg = tc.tta_config(tiny_spec, opts, "python")
    assert cfg.name == "tiny_tta"
    assert list(cfg.input[0].dims) == [37, 37, 3]
    assert cfg.parameters["tta_views"].string_value == "ten"


def test_ensemble_feeds_preprocess_output_into_the_classifier(tiny_spec, opts):
    cfg = tc.ensemble_config(tiny_spec, opts)
    pre, cls = cfg.ensemble_scheduling.step
    assert (pre.model_name, cls.model_name) == ("tiny_preprocess", "tiny")
    assert dict(pre.output_map) == {"images_nhwc_u8": "images_nhwc_u8"}
    assert dict(cls.input_map) == {"images_nhwc_u8": "images_nhwc_u8"}
    assert (cfg.input[0].name, list(cfg.input[0].dims)) == ("images_encoded", [-1])


def test_render_lays_out_flavours_side_by_side_in_one_model_folder(tiny_spec, opts):
    files = render_repository(tiny_spec, opts)
    assert sorted(f for f in files if f.startswith("tiny/")) == [
        "tiny/config.pbtxt", "tiny/configs/onnxruntime.pbtxt", "tiny/export.json", "tiny/labels.txt",
        "tiny/spec.json"]
    assert files["tiny/labels.txt"] == "normal\ntumour\n"
    assert "tiny_preprocess/configs/dali.pbtxt" in files and "tiny_ensemble/config.pbtxt" in files
    assert render_repository(tiny_spec, opts) == files


def test_invalid_format_names_the_flag_and_the_accepted_values():
    with pytest.raises(ExportInputError, match=r"--formats: invalid format\(s\) \['onnx'\]. Only python, onnxruntime, tensorrt"):
        tc.ExportOptions(formats=("python", "onnx"))


def test_invalid_tta_views_and_batch_size_are_refused_naming_the_flag():
    with pytest.raises(ExportInputError, match="--tta-views: invalid value 'flip'. Only five, ten"):
        tc.ExportOptions(tta_views="flip")
    with pytest.raises(ExportInputError, match="--max-queue-delay-us: expected an integer >= 0"):
        tc.ExportOptions(max_queue_delay_us=-1)


@pytest.mark.parametrize("name", ["../evil", "a/b", "x..y", ""])
def test_unsafe_model_name_is_refused(tiny_spec, name):
    with pytest.raises(Exception, match="--name: .* is not a safe Triton model name"):
        resolve_spec(tiny_spec, name=name, version=1, max_batch_size=None)


def test_non_positive_version_is_refused(tiny_spec):
    with pytest.raises(ExportInputError, match="--version: expected a positive integer"):
        resolve_spec(tiny_spec, name=None, version=0, max_batch_size=None)


def test_export_options_survive_their_json_round_trip(opts):
    assert tc.ExportOptions.from_json(opts.to_json()) == opts
