"""ModelSpec: JSON round trip, derived names, and one clear error per invalid field."""

from __future__ import annotations

import json

import pytest

from serving.core.errors import SpecError
from serving.core.spec import TTA_MODES, ModelSpec, check_model_name

BASE = dict(name="tiny", class_names=("normal", "tumour"), input_height=32, input_width=32,
            mean=(0.7, 0.5, 0.7), std=(0.15, 0.2, 0.15))


def spec(**changes) -> ModelSpec:
    return ModelSpec(**{**BASE, **changes})


def test_json_round_trip_through_a_file_is_exact(tmp_path):
    s = spec(class_names=("a", "b", "c"), version=3, max_batch_size=16, tta_views=("none", "five"))
    path = s.save(tmp_path / "spec.json")
    again = ModelSpec.load(path)
    assert again == s
    assert json.loads(path.read_text())["class_names"] == ["a", "b", "c"]
    assert again.class_names == ("a", "b", "c") and again.tta_views == ("none", "five")


def test_defaults_and_derived_names():
    s = spec(input_height=32, input_width=48)
    assert (s.source_height, s.source_width) == (37, 55)  # input / 0.875, rounded
    assert s.num_classes == 2 and s.input_hw == (32, 48) and s.source_hw == (37, 55)
    assert (s.tta_model_name, s.preprocess_model_name, s.ensemble_model_name) == \
        ("tiny_tta", "tiny_preprocess", "tiny_ensemble")
    assert s.input_dtype == "uint8" and s.input_layout == "NHWC"


def test_replace_validates_again():
    assert spec().replace(max_batch_size=4).max_batch_size == 4
    with pytest.raises(SpecError, match=r"^max_batch_size: expected a positive integer, got 0$"):
        spec().replace(max_batch_size=0)


@pytest.mark.parametrize("changes, match", [
    ({"class_names": ()}, r"^class_names: expected at least two class names, got none"),
    ({"class_names": "normal"}, r"^class_names: expected at least two class names"),
    ({"class_names": ("normal", "")}, r"^class_names: empty class name in \['normal', ''\]"),
    ({"class_names": ("normal", "  ")}, r"^class_names: empty class name"),
    ({"class_names": ("a", "b", "a")}, r"^class_names: duplicate names \['a'\]"),
    ({"class_names": ("only",)}, r"^class_names: a classifier needs at least two classes, got \['only'\]"),
    ({"class_names": ("a/b", "c")}, r"^class_names: 'a/b' contains '/'"),
    ({"class_names": ("a,b", "c")}, r"^class_names: 'a,b' contains"),
    ({"input_height": 0}, r"^input_height: expected a positive integer, got 0$"),
    ({"input_width": -3}, r"^input_width: expected a positive integer, got -3$"),
    ({"input_width": True}, r"^input_width: expected a positive integer, got True$"),
    ({"input_height": 32.0}, r"^input_height: expected a positive integer, got 32.0$"),
    ({"max_batch_size": 0}, r"^max_batch_size: expected a positive integer"),
    ({"version": 0}, r"^version: expected a positive integer"),
    ({"source_height": -1}, r"^source_height: expected a non-negative integer, got -1$"),
    ({"source_width": 16}, r"^source_width: 16 is smaller than the input size 32$"),
    ({"mean": (0.5, 0.5)}, r"^mean: expected three values \(R, G, B\), got 2$"),
    ({"mean": (0.5, 0.5, 0.5, 0.5)}, r"^mean: expected three values \(R, G, B\), got 4$"),
    ({"mean": (0.0, 0.5, 0.5)}, r"^mean: every value must be in \(0, 1\]"),
    ({"mean": (0.5, float("nan"), 0.5)}, r"^mean: every value must be in \(0, 1\]"),
    ({"std": (0.2, 0.2, 1.5)}, r"^std: every value must be in \(0, 1\]"),
    ({"std": (0.2, "x", 0.2)}, r"^std: expected three numbers"),
    ({"std": None}, r"^std: expected three numbers"),
    ({"arch": "vgg16"}, r"^arch: invalid architecture 'vgg16'. Only resnet18, resnet34, .* are supported.$"),
    ({"input_dtype": "float32"}, r"^input_dtype: only 'uint8' is supported, got 'float32'$"),
    ({"input_layout": "NCHW"}, r"^input_layout: only 'NHWC' is supported, got 'NCHW'$"),
    ({"input_name": "1images"}, r"^input_name: '1images' is not a valid tensor name"),
    ({"output_name": "probs-out"}, r"^output_name: 'probs-out' is not a valid tensor name"),
    ({"logits_name": "images_nhwc_u8"}, r"input_name/output_name/logits_name/encoded_name/features_name must all differ"),
    ({"tta_views": ("five",)}, r"^tta_views: expected a subset of .* including 'none', got \('five',\)$"),
    ({"tta_views": ("none", "twelve")}, r"^tta_views: expected a subset"),
    ({"format_version": 2}, r"^format_version: the spec is of format 2, written by a newer patchserve; this one "
                            r"reads formats up to 1: upgrade patchserve$"),
    ({"format_version": 0}, r"^format_version: expected a positive integer, got 0$"),
    ({"requires": ("a b",)}, r"^requires: expected a list of spec field names"),
])
def test_invalid_field_raises_spec_error_naming_it(changes, match):
    with pytest.raises(SpecError, match=match):
        spec(**changes)


@pytest.mark.parametrize("name", ["../x", "a/b", "a\\b", "", "has space", ".hidden", "-dash", "a..b", "x" * 65, None])
def test_unsafe_model_names_are_refused(name):
    with pytest.raises(SpecError, match=r"^name: .* is not a safe Triton model name; expected 1-64 characters"):
        spec(name=name)


def test_check_model_name_names_the_flag_it_was_given():
    assert check_model_name("resnet18_pcam-v1.2") == "resnet18_pcam-v1.2"
    with pytest.raises(SpecError, match=r"^--model-name: 'a/b' is not a safe"):
        check_model_name("a/b", "--model-name")


def test_a_newer_specs_unknown_fields_are_kept_unread_and_written_back_unchanged():
    """An older patchserve talking to a newer server: fields it does not know neither break it nor get lost."""
    from serving.client.identity import spec_sha256

    data = spec().to_dict()
    data["stain_target"] = {"method": "macenko", "matrix": [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]]}
    data["zoom"] = 2
    got = ModelSpec.from_dict(data)
    assert got.unknown == {"stain_target": data["stain_target"], "zoom": 2}
    assert got.to_dict() == data and ModelSpec.from_json(got.to_json()) == got
    assert spec_sha256(got) == spec_sha256(ModelSpec.from_dict(data)) != spec_sha256(spec())
    assert got.replace(version=3).unknown == got.unknown


def test_a_newer_spec_that_requires_a_field_this_patchserve_lacks_is_refused_naming_it():
    data = {**spec().to_dict(), "trained_at": 0.5, "requires": ["trained_at"]}
    with pytest.raises(SpecError, match=r"^spec: the model needs a patchserve that understands the spec fields "
                                        r"\['trained_at'\] \(they change how its inputs must be prepared\); "
                                        "upgrade patchserve$"):
        ModelSpec.from_dict(data)
    with pytest.raises(SpecError, match=r"^format_version: the spec is of format 2, written by a newer patchserve"):
        ModelSpec.from_dict({**spec().to_dict(), "format_version": 2, "whatever": 1})


def test_an_older_spec_without_the_newer_fields_reads_with_their_defaults():
    data = spec().to_dict()
    for name in ("requires", "eval_geometry", "tta_views", "format_version", "extra"):
        del data[name]
    old = ModelSpec.from_dict(data)
    assert (old.requires, old.eval_geometry, old.tta_views, old.format_version) == ((), "resize_crop", TTA_MODES, 1)
    assert old == spec()


def test_must_understand_fields_away_from_their_default_are_listed_in_requires(monkeypatch):
    from serving.core import spec as spec_module

    monkeypatch.setattr(spec_module, "MUST_UNDERSTAND", ("eval_geometry",))
    assert spec().requires == ()
    cropped = spec().replace(eval_geometry="crop")
    assert cropped.requires == ("eval_geometry",) and ModelSpec.from_json(cropped.to_json()) == cropped


def test_missing_required_json_fields_are_listed():
    data = spec().to_dict()
    del data["mean"], data["input_width"]
    with pytest.raises(SpecError, match=r"^spec: missing required fields \['input_width', 'mean'\]$"):
        ModelSpec.from_dict(data)


@pytest.mark.parametrize("text, match", [
    ("{not json", r"^spec: not valid JSON"),
    ("[1, 2]", r"^spec: expected a JSON object, got list$"),
])
def test_malformed_json_is_refused(text, match):
    with pytest.raises(SpecError, match=match):
        ModelSpec.from_json(text)


def test_load_names_the_file_when_missing_or_invalid(tmp_path):
    with pytest.raises(SpecError, match=r"nope\.json: cannot read spec"):
        ModelSpec.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    data = spec().to_dict()
    data["input_height"] = 0
    bad.write_text(json.dumps(data))
    with pytest.raises(SpecError, match=r"bad\.json: input_height: expected a positive integer"):
        ModelSpec.load(bad)
