"""Synthetic data: determinism, counts, imbalance, formats, HDF5 layout, stain shift, validation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from serving.core.errors import InputError
from serving.inputs.datasets import discover, read_hdf5_rows
from serving.synth.dataset import DEFAULT_OVERLAP, class_names_for, make_patch, synthesize
from serving.synth.texture import LOOKS, blend


def _all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _dark_fraction(patch: np.ndarray) -> float:
    return float((patch.astype(np.int32).sum(-1) < 450).mean())


@pytest.fixture(scope="module")
def three_class(tmp_path_factory):
    out = tmp_path_factory.mktemp("three")
    return synthesize(out, classes=3, per_class=30, imbalance=3.0, size=32, seed=7)


def test_same_seed_gives_identical_bytes_in_every_file_and_another_seed_differs(tmp_path):
    opts = dict(classes=2, per_class=5, size=24, fmt="png")
    a = _all_files(synthesize(tmp_path / "a", seed=3, **opts).out)
    b = _all_files(synthesize(tmp_path / "b", seed=3, **opts).out)
    c = _all_files(synthesize(tmp_path / "c", seed=4, **opts).out)
    assert len(a) == 2 * 5 + 2 * 1 + 1 + 8 + 1  # images, shifted test, manifest, 4 x/y HDF5 pairs, synth.json
    assert a == b
    assert a.keys() == c.keys()
    images = [k for k in a if k.endswith(".png")]
    assert all(a[k] != c[k] for k in images)
    assert a["pcam/train_x.h5"] != c["pcam/train_x.h5"]


def test_counts_per_split_and_class_follow_imbalance_largest_class_first(three_class):
    s = three_class
    assert s.class_names == ("tumour", "stroma", "complex")
    # 30, 30 / sqrt(3), 30 / 3 images; 20 % each to val and test, at least one.
    assert s.counts["train"] == {"tumour": 18, "stroma": 11, "complex": 6}
    assert s.counts["val"] == {"tumour": 6, "stroma": 3, "complex": 2}
    assert s.counts["test"] == {"tumour": 6, "stroma": 3, "complex": 2}
    assert s.counts["test_shifted"] == s.counts["test"]
    totals = [sum(s.counts[sp][c] for sp in ("train", "val", "test")) for c in s.class_names]
    assert totals == [30, 17, 10]
    assert totals[0] / totals[-1] == 3.0
    for split, per in s.counts.items():
        for name, n in per.items():
            assert len(list((s.out / split / name).glob("*.png"))) == n


def test_manifest_lists_every_image_with_relative_paths_and_discover_reads_it(three_class):
    s = three_class
    with open(s.manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", "label", "split"]
    assert len(rows) == sum(s.total(sp) for sp in s.counts)
    assert rows[0] == {"path": "train/tumour/tumour_0000.png", "label": "tumour", "split": "train"}
    assert all((s.out / r["path"]).is_file() and not Path(r["path"]).is_absolute() for r in rows)
    ds = discover(s.manifest, split="val", classes=s.class_names)
    assert sorted(np.bincount(ds.labels()).tolist()) == [2, 3, 6]
    folders = discover(s.out, split="test")
    assert folders.classes == tuple(sorted(s.class_names))
    assert len(folders.samples) == 11


def test_hdf5_has_pcam_layout_labels_in_manifest_order_and_matches_the_png_files(three_class):
    s = three_class
    xpath, ypath = s.hdf5["val"]
    assert (xpath.name, ypath.name) == ("val_x.h5", "val_y.h5")
    with h5py.File(xpath, "r") as fx, h5py.File(ypath, "r") as fy:
        x, y = fx["x"], fy["y"]
        assert (x.shape, x.dtype) == ((11, 32, 32, 3), np.uint8)
        assert (y.shape, y.dtype) == ((11, 1, 1, 1), np.uint8)
        assert y[:, 0, 0, 0].tolist() == [0] * 6 + [1] * 3 + [2] * 2
        assert [str(c) for c in fx.attrs["class_names"].astype(str)] == list(s.class_names)
    ds = discover(xpath)
    assert ds.kind == "hdf5" and ds.classes == s.class_names
    assert ds.labels().tolist() == [0] * 6 + [1] * 3 + [2] * 2
    rows = read_hdf5_rows(xpath, np.array([0, 6, 10]))
    files = ["val/tumour/tumour_0000.png", "val/stroma/stroma_0000.png", "val/complex/complex_0001.png"]
    for row, rel in zip(rows, files):
        np.testing.assert_array_equal(row, np.asarray(Image.open(s.out / rel)))


def test_synth_json_records_options_and_counts(three_class):
    doc = json.loads(three_class.info.read_text())
    assert doc["options"]["seed"] == 7 and doc["options"]["imbalance"] == 3.0
    assert doc["counts"] == three_class.counts
    assert doc["hdf5"]["train"] == ["pcam/train_x.h5", "pcam/train_y.h5"]


@pytest.mark.parametrize("fmt, suffix, pil_format", [("jpg", ".jpg", "JPEG"), ("tif", ".tif", "TIFF")])
def test_every_format_is_readable_by_pil_as_rgb_of_the_requested_size(tmp_path, fmt, suffix, pil_format):
    s = synthesize(tmp_path / fmt, per_class=3, size=40, fmt=fmt)
    files = sorted(s.out.glob(f"*/*/*{suffix}"))
    assert len(files) == 8  # 2 classes x (1 train + 1 val + 1 test + 1 shifted)
    for f in files:
        with Image.open(f) as img:
            assert (img.format, img.mode, img.size) == (pil_format, "RGB", (40, 40))


def test_shifted_test_set_has_same_tissue_and_labels_under_a_visibly_different_stain(three_class):
    s = three_class
    a = np.asarray(Image.open(s.out / "test/tumour/tumour_0000.png")).astype(np.float64)
    b = np.asarray(Image.open(s.out / "test_shifted/tumour/tumour_0000.png")).astype(np.float64)
    # More haematoxylin at the second centre: it absorbs red, so red drops by many grey levels.
    assert (a[..., 0] - b[..., 0]).mean() > 12.0
    assert np.abs(a - b).mean() > 8.0
    # Same nuclei under either stain: dark pixels overlap far more than by chance.
    da, db = a.sum(-1) < a.sum(-1).mean() - 60, b.sum(-1) < b.sum(-1).mean() - 60
    assert (da & db).sum() > 0.5 * da.sum() > 0


def test_tumour_patches_have_more_dark_nuclear_pixels_than_normal_on_average():
    normal = [_dark_fraction(make_patch(np.random.default_rng([1, i]), 0, 48)) for i in range(20)]
    tumour = [_dark_fraction(make_patch(np.random.default_rng([2, i]), 1, 48)) for i in range(20)]
    assert np.mean(tumour) > 3 * np.mean(normal)


def test_default_overlap_makes_some_patches_look_like_the_other_class_and_overlap_0_keeps_them_apart():
    def dark(c, overlap):
        return np.array([_dark_fraction(make_patch(np.random.default_rng([c, i]), c, 48, overlap=overlap))
                         for i in range(60)])

    def errors(n, t):
        """Fewest patches the best single threshold on nuclear darkness gets wrong."""
        return min(int((n > c).sum() + (t <= c).sum()) for c in np.r_[n, t])

    n, t = dark(0, DEFAULT_OVERLAP), dark(1, DEFAULT_OVERLAP)
    assert np.mean(t) > 2 * np.mean(n)  # still different on average...
    assert errors(dark(0, 0.0), dark(1, 0.0)) <= 2  # classes apart: one threshold sorts almost all
    assert errors(n, t) >= 12  # overlapping: at least a tenth of 120 patches on the wrong side


def test_blend_interpolates_every_number_of_a_look_from_one_class_to_the_other():
    a, b = LOOKS["normal"], LOOKS["tumour"]
    assert blend(a, b, 0.0) == a and blend(a, b, 1.0) == b
    mid = blend(a, b, 0.5)
    assert mid.eosin == pytest.approx((a.eosin + b.eosin) / 2)
    assert mid.nuclei == pytest.approx(((a.nuclei[0] + b.nuclei[0]) / 2, (a.nuclei[1] + b.nuclei[1]) / 2))


def test_label_noise_files_train_and_val_images_under_another_class_keeps_test_true_and_pixels_same(tmp_path):
    clean = synthesize(tmp_path / "clean", per_class=40, size=16, seed=5)
    noisy = synthesize(tmp_path / "noisy", per_class=40, size=16, seed=5, label_noise=0.25)
    doc = json.loads(noisy.info.read_text())
    flipped = doc["mislabelled"]
    assert 8 <= len(flipped) <= 30  # 0.25 of 64 train+val images, give or take chance
    assert all(p.split("/")[0] in ("train", "val") for p in flipped)
    for rel in flipped:  # filed under the other class, named (and drawn) as its true class
        split, label, name = rel.split("/")
        true = name.split("_")[0]
        assert label != true
        assert (noisy.out / rel).read_bytes() == (clean.out / split / true / name).read_bytes()
    assert _all_files(noisy.out / "test") == _all_files(clean.out / "test")
    assert sum(noisy.counts["train"].values()) == sum(clean.counts["train"].values())


def test_imbalance_three_to_one_like_the_chest_xray_study(tmp_path):
    s = synthesize(tmp_path / "x", per_class=30, size=16, imbalance=3.0)
    totals = [sum(s.counts[sp][c] for sp in ("train", "val", "test")) for c in s.class_names]
    assert totals == [30, 10]


def test_make_patch_is_deterministic_uint8_and_every_colorectal_class_looks_different():
    p = make_patch(np.random.default_rng(0), 1, 32)
    assert (p.shape, p.dtype) == ((32, 32, 3), np.uint8)
    np.testing.assert_array_equal(p, make_patch(np.random.default_rng(0), 1, 32))
    # Per class, the mean colour and dark fraction over a few patches: all 8 distinct.
    feats = []
    for c in range(8):
        ps = [make_patch(np.random.default_rng([c, i]), c, 32, num_classes=8) for i in range(6)]
        feats.append(np.r_[np.mean(ps, axis=(0, 1, 2)), 100 * np.mean([_dark_fraction(q) for q in ps])])
    feats = np.array(feats)
    dist = np.sqrt(((feats[:, None] - feats[None]) ** 2).sum(-1)) + np.eye(8) * 1e9
    assert dist.min() > 2.0


def test_class_names_for_two_is_normal_tumour_and_more_are_colorectal_tissue():
    assert class_names_for(2) == ("normal", "tumour")
    assert class_names_for(6) == ("tumour", "stroma", "complex", "lympho", "debris", "mucosa")
    assert len(set(class_names_for(8))) == 8
    with pytest.raises(ValueError, match="--classes"):
        class_names_for(9)


@pytest.mark.parametrize("kwargs, match", [
    ({"classes": 1}, r"--classes: expected an integer in 2\.\.8"),
    ({"classes": 9}, r"--classes: expected an integer in 2\.\.8, got 9"),
    ({"per_class": 2}, r"--per-class: expected an integer in 3\.\."),
    ({"imbalance": 0.5}, r"--imbalance: expected a number >= 1"),
    ({"imbalance": float("nan")}, r"--imbalance"),
    ({"per_class": 10, "imbalance": 5.0}, r"--imbalance: 5.0 with --per-class 10 leaves 2 images"),
    ({"size": 8}, r"--size: expected an integer in 16\.\.1024, got 8"),
    ({"size": 2048}, r"--size"),
    ({"fmt": "gif"}, r"--format: invalid format 'gif'. Only png, jpg, tif are supported"),
    ({"seed": -1}, r"--seed"),
    ({"slide_size": 100}, r"--slide-size: expected an integer in 512\.\."),
    ({"split_fractions": (0.8, 0.2, 0.0)}, r"split_fractions"),
    ({"overlap": 1.5}, r"--overlap: expected a number in \[0, 1\]"),
    ({"label_noise": 0.5}, r"--label-noise: expected a fraction in \[0, 0.5\)"),
])
def test_invalid_options_raise_input_error_naming_the_flag(tmp_path, kwargs, match):
    with pytest.raises(InputError, match=match):
        synthesize(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()  # validated before anything is written


def test_refuses_non_empty_folder_without_overwrite_and_overwrite_keeps_other_files(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"data: folder is not empty; pass --overwrite"):
        synthesize(out, per_class=3, size=16)
    synthesize(out, per_class=6, size=16, overwrite=True)
    s = synthesize(out, per_class=3, size=16, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    # Nothing left over from the larger first run.
    assert len(list(out.glob("train/*/*.png"))) == s.total("train") == 2
