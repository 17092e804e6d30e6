"""DATA layouts, the pre-flight scan, data statistics and pretrained weights."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from tests.fixtures_train import small_train_config
from training.data import resolve_eval_samples, resolve_training_data
from training.errors import DataError, ModelConfigError


def test_split_folders_give_train_and_val_folders(synth_data):
    d = resolve_training_data(synth_data)
    assert (d.kind, d.classes, len(d.train), len(d.val)) == ("splits", ("normal", "tumour"), 48, 16)


def test_single_class_folder_tree_gets_a_stratified_validation_fraction(synth_data):
    d = resolve_training_data(synth_data / "train", val_fraction=0.25, seed=0)
    assert d.kind == "folder" and len(d.val) == 12
    assert np.bincount([s.label for s in d.val]).tolist() == [6, 6]
    assert not {s.source for s in d.train} & {s.source for s in d.val}


def test_manifest_with_split_column_and_pcam_hdf5_resolve_to_the_same_counts(synth_data):
    m = resolve_training_data(synth_data / "manifest.csv")
    h = resolve_training_data(synth_data / "pcam")
    assert (m.kind, len(m.train), len(m.val)) == ("manifest", 48, 16)
    assert (h.kind, len(h.train), len(h.val)) == ("hdf5", 48, 16)
    assert [s.label for s in m.train] == [s.label for s in h.train]
    assert len(resolve_eval_samples(synth_data / "pcam", "test", h.classes)) == 16


def test_empty_class_folder_is_a_data_error_naming_it(tmp_path, synth_data):
    shutil.copytree(synth_data / "train", tmp_path / "d")
    (tmp_path / "d" / "empty").mkdir()
    with pytest.raises(DataError, match="empty.*holds no images"):
        resolve_training_data(tmp_path / "d")


def test_single_class_is_a_data_error(tmp_path, synth_data):
    shutil.copytree(synth_data / "train" / "normal", tmp_path / "d" / "normal")
    with pytest.raises(DataError, match="single class.*at least two"):
        resolve_training_data(tmp_path / "d")


def _odd_files(root):
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / "a" / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (20, 20, 4), dtype=np.uint8), "RGBA").save(root / "b" / f"{i}.png")
    (root / "a" / "zero.png").write_bytes(b"")
    (root / "b" / "text.png").write_bytes(b"not an image at all")
    good = (root / "a" / "0.png").read_bytes()
    (root / "b" / "cut.png").write_bytes(good[: len(good) // 2])


def test_scan_lists_bad_files_and_training_refuses_without_skip_bad(tmp_path):
    from training.train import train

    _odd_files(tmp_path / "d")
    with pytest.raises(DataError, match=r"3 unusable image file\(s\).*--skip-bad") as err:
        train(small_train_config(tmp_path / "d", tmp_path / "run", val_fraction=0.5))
    for name in ("zero.png: empty file", "text.png: not an image", "cut.png: truncated"):
        assert name in str(err.value)
    assert (tmp_path / "run" / "bad_files.csv").read_text().count("\n") == 4


def test_odd_modes_are_converted_once_into_the_run_cache_as_serving_decodes_them(tmp_path):
    from serving.core.imageio import load_rgb_u8
    from serving.inputs.datasets import discover
    from training.scan import scan_samples

    _odd_files(tmp_path / "d")
    samples = discover(tmp_path / "d").samples
    first = scan_samples(samples, tmp_path / "cache", progress=False)
    again = scan_samples(samples, tmp_path / "cache", progress=False)
    assert (first.converted, len(first.bad), len(first.samples)) == (6, 3, 12)
    assert [s.source for s in first.samples] == [s.source for s in again.samples]
    assert len(list((tmp_path / "cache").iterdir())) == 6
    conv = [(o, s.source) for o, s in zip(first.origins, first.samples) if o != s.source]
    np.testing.assert_array_equal(load_rgb_u8(conv[0][1]), load_rgb_u8(conv[0][0]))


def test_mean_std_is_computed_per_channel_over_pixels(tmp_path):
    from serving.inputs.datasets import Sample
    from training.stats import compute_mean_std

    a = np.zeros((4, 4, 3), np.uint8)
    a[..., 0], a[..., 1], a[..., 2] = 51, 102, 255
    b = a.copy()
    b[..., 0] = 153
    Image.fromarray(a).save(tmp_path / "a.png")
    Image.fromarray(b).save(tmp_path / "b.png")
    mean, std = compute_mean_std([Sample(str(tmp_path / "a.png")), Sample(str(tmp_path / "b.png"))])
    assert mean == pytest.approx((0.4, 0.4, 1.0))
    assert std == pytest.approx((0.2, 0.001, 0.001))  # flat channels are clamped to the spec's minimum


def test_pretrained_state_dict_from_a_local_file_loads_and_a_wrong_arch_is_refused(tmp_path, tiny_spec):
    import torch
    import torchvision

    from training.model import ModelConfig, build_model, load_pretrained_backbone

    ref = torchvision.models.resnet18(weights=None)
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    model = build_model(tiny_spec, ModelConfig(arch="resnet18", num_classes=2))
    assert load_pretrained_backbone(model, tmp_path / "r18.pth") == ["fc.weight", "fc.bias"]
    torch.testing.assert_close(model.backbone.conv1.weight, ref.conv1.weight)
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(ModelConfigError, match="--pretrained: .*r34.pth.*right --arch"):
        load_pretrained_backbone(build_model(tiny_spec, ModelConfig(num_classes=2)), tmp_path / "r34.pth")
    sd = ref.state_dict()
    sd["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ModelConfigError, match=r"conv1.weight has shape \(64, 3, 3, 3\)"):
        load_pretrained_backbone(build_model(tiny_spec, ModelConfig(num_classes=2)), tmp_path / "bad.pth")
