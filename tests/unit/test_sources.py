"""Data sources: every layout users have, and a clear error for each malformed one."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from serving.core.errors import InputError
from serving.inputs.datasets import (Sample, discover, has_splits, parse_hdf5_source, read_hdf5, read_hdf5_rows,
                                     read_manifest, split_root)


def _png(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)
    return path


def _h5(path: Path, **datasets) -> Path:
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f.create_dataset(k, data=v)
    return path


def test_class_folders_are_labelled_in_sorted_folder_order(tmp_path):
    _png(tmp_path / "tumour" / "b.png")
    _png(tmp_path / "normal" / "a.png")
    _png(tmp_path / "normal" / "sub" / "c.png")
    (tmp_path / "normal" / "notes.txt").write_text("not an image")
    ds = discover(tmp_path)
    assert (ds.kind, ds.classes) == ("folder", ("normal", "tumour"))
    assert [(Path(s.source).relative_to(tmp_path).as_posix(), s.label) for s in ds.samples] == [
        ("normal/a.png", 0), ("normal/sub/c.png", 0), ("tumour/b.png", 1)]
    assert ds.labelled and ds.labels().tolist() == [0, 0, 1]


def test_given_class_order_wins_and_foreign_class_folders_are_refused(tmp_path):
    _png(tmp_path / "tumour" / "b.png")
    _png(tmp_path / "normal" / "a.png")
    ds = discover(tmp_path, classes=("tumour", "normal"))
    assert ds.labels().tolist() == [1, 0]
    with pytest.raises(InputError, match=r"class folders \['normal'\] are not among the model's classes \['tumour', 'x'\]"):
        discover(tmp_path, classes=("tumour", "x"))


def test_split_folders_pick_the_split_and_without_one_are_refused_naming_the_splits(tmp_path):
    for split, n in (("train", 2), ("val", 1), ("test", 3)):
        for i in range(n):
            _png(tmp_path / split / "normal" / f"{i}.png")
            _png(tmp_path / split / "tumour" / f"{i}.png")
    assert has_splits(tmp_path) and split_root(tmp_path, "val") == tmp_path / "val"
    assert len(discover(tmp_path, split="test").samples) == 6
    assert len(discover(tmp_path, split="val").samples) == 2
    with pytest.raises(InputError, match=r"holds the splits test, train, val; pass --split to pick one"):
        discover(tmp_path)  # not silently train/: scores of the wrong split look plausible
    assert split_root(tmp_path / "train", "val") == tmp_path / "train"


def test_missing_split_folder_is_named(tmp_path):
    _png(tmp_path / "train" / "normal" / "a.png")
    with pytest.raises(InputError, match=r"has split folders but no 'val' folder"):
        discover(tmp_path, split="val")


def test_flat_folder_of_images_is_unlabelled(tmp_path):
    _png(tmp_path / "b.png")
    _png(tmp_path / "a.png")
    (tmp_path / ".hidden.png").write_bytes(b"")
    ds = discover(tmp_path)
    assert ds.kind == "images" and not ds.labelled
    assert [Path(s.source).name for s in ds.samples] == ["a.png", "b.png"]


@pytest.mark.parametrize("setup, match", [
    (lambda p: None, r"holds no images and no class folders"),
    (lambda p: (p / "normal").mkdir(), r"normal: class folder 'normal' holds no images"),
])
def test_empty_folders_give_clear_errors(tmp_path, setup, match):
    setup(tmp_path)
    with pytest.raises(InputError, match=match):
        discover(tmp_path)


def test_missing_path_and_unsupported_file_are_named(tmp_path):
    with pytest.raises(InputError, match=r"nowhere: no such file or folder"):
        discover(tmp_path / "nowhere")
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(InputError, match=r"data\.txt: expected a folder, a \.csv manifest or a \.h5 file"):
        discover(tmp_path / "data.txt")


def _manifest(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_manifest_paths_are_relative_to_its_folder_and_split_filters_rows(tmp_path):
    m = _manifest(tmp_path / "m.csv", "path,label,split\na.png,tumour,train\nb.png,normal,test\n/abs/c.png,normal,train\n")
    ds = discover(m, split="train")
    assert ds.kind == "manifest" and ds.classes == ("normal", "tumour")
    assert ds.samples == [Sample(str(tmp_path / "a.png"), 1), Sample("/abs/c.png", 0)]


def test_manifest_without_labels_is_unlabelled(tmp_path):
    m = _manifest(tmp_path / "m.csv", "path\na.png\n")
    ds = read_manifest(m)
    assert ds.classes is None and not ds.labelled and ds.samples == [Sample(str(tmp_path / "a.png"), None)]


@pytest.mark.parametrize("body, match", [
    ("path,label\na.png,normal\n,tumour\n", r"m\.csv:3: malformed manifest row: empty path \(1 bad rows in all\)"),
    ("path,label\na.png,normal,extra\n", r"m\.csv:2: malformed manifest row: more fields than the header"),
    ("path,label\na.png,normal\nb.png,cat\n", r"m\.csv:3: malformed manifest row: label 'cat' is not one of \['normal', 'tumour'\]"),
])
def test_malformed_manifest_row_names_file_and_line(tmp_path, body, match):
    m = _manifest(tmp_path / "m.csv", body)
    with pytest.raises(InputError, match=match):
        read_manifest(m, classes=("normal", "tumour"))


def test_non_strict_manifest_records_bad_rows_and_keeps_the_rest(tmp_path):
    m = _manifest(tmp_path / "m.csv", "path,label\na.png,normal\n,tumour\nb.png,cat\nc.png,tumour\n")
    ds = read_manifest(m, classes=("normal", "tumour"), strict=False)
    assert [Path(s.source).name for s in ds.samples] == ["a.png", "c.png"]
    assert ds.bad_rows == [(f"{m}:3", "empty path"), (f"{m}:4", "label 'cat' is not one of ['normal', 'tumour']")]


@pytest.mark.parametrize("body, match", [
    ("file,label\na.png,normal\n", r"manifest needs a 'path' column \(header 'path,label\[,split\]'\), got \['file', 'label'\]"),
    ("path,label,split\na.png,normal,train\n", r"m\.csv: manifest lists no samples for split 'val'"),
])
def test_manifest_without_path_column_or_rows_is_refused(tmp_path, body, match):
    with pytest.raises(InputError, match=match):
        read_manifest(_manifest(tmp_path / "m.csv", body), split="val")


def test_unreadable_manifest_is_named(tmp_path):
    with pytest.raises(InputError, match=r"gone\.csv: cannot read manifest"):
        read_manifest(tmp_path / "gone.csv")


def test_hdf5_single_file_with_x_and_y(tmp_path):
    x = np.arange(3 * 4 * 4 * 3, dtype=np.uint8).reshape(3, 4, 4, 3)
    f = _h5(tmp_path / "set.h5", x=x, y=np.array([1, 0, 1], np.uint8).reshape(3, 1, 1, 1))
    ds = discover(f)
    assert (ds.kind, ds.classes, ds.labels().tolist()) == ("hdf5", ("normal", "tumour"), [1, 0, 1])
    assert [s.source for s in ds.samples] == [f"{f}#0", f"{f}#1", f"{f}#2"]
    np.testing.assert_array_equal(read_hdf5_rows(f, np.array([2, 0])), x[[2, 0]])
    assert parse_hdf5_source(f"{f}#2") == (str(f), 2)
    assert parse_hdf5_source("a.png") is None and parse_hdf5_source("a.png#2") is None


def test_hdf5_x_y_pair_in_pcam_naming_with_stored_class_names(tmp_path):
    xf = tmp_path / "test_x.h5"
    with h5py.File(xf, "w") as f:
        f.create_dataset("x", data=np.zeros((2, 4, 4, 3), np.uint8))
        f.attrs["class_names"] = ["a", "b", "c"]
    _h5(tmp_path / "test_y.h5", y=np.array([2, 0], np.uint8).reshape(2, 1, 1, 1))
    ds = read_hdf5(xf)
    assert ds.classes == ("a", "b", "c") and ds.labels().tolist() == [2, 0]


def test_hdf5_without_labels_is_unlabelled(tmp_path):
    ds = read_hdf5(_h5(tmp_path / "u_x.h5", x=np.zeros((2, 4, 4, 3), np.uint8)))
    assert not ds.labelled and [s.label for s in ds.samples] == [None, None]


@pytest.mark.parametrize("datasets, match", [
    ({"x": np.zeros((2, 4, 4), np.uint8)}, r"dataset 'x' must be N x H x W x 3 uint8, got \(2, 4, 4\) uint8"),
    ({"x": np.zeros((2, 4, 4, 1), np.uint8)}, r"dataset 'x' must be N x H x W x 3 uint8, got \(2, 4, 4, 1\)"),
    ({"x": np.zeros((2, 4, 4, 3), np.float32)}, r"dataset 'x' must be N x H x W x 3 uint8, got \(2, 4, 4, 3\) float32"),
    ({"images": np.zeros((2, 4, 4, 3), np.uint8)}, r"HDF5 file has no dataset 'x' \(keys: \['images'\]\)"),
    ({"x": np.zeros((2, 4, 4, 3), np.uint8), "y": np.zeros((3, 1, 1, 1), np.uint8)},
     r"dataset 'y' has 3 labels for 2 images in 'x'"),
    ({"x": np.zeros((2, 4, 4, 3), np.uint8), "y": np.array([0, 5], np.uint8)},
     r"labels in dataset 'y' must be in 0\.\.1 for classes \['normal', 'tumour'\]; row 1 is 5"),
    ({"x": np.zeros((2, 4, 4, 3), np.uint8), "y": np.array([1.0, 0.7], np.float32).reshape(2, 1, 1, 1)},
     r"dataset 'y' must hold integer labels; row 1 is 0\.7"),
    ({"x": np.zeros((2, 4, 4, 3), np.uint8), "y": np.array([b"a", b"b"])},
     r"dataset 'y' must hold integer labels, got dtype \|S1"),
])
def test_hdf5_with_wrong_shapes_gives_a_clear_error_naming_the_file(tmp_path, datasets, match):
    f = _h5(tmp_path / "bad.h5", **datasets)
    with pytest.raises(InputError, match=r"bad\.h5: " + match):
        discover(f)


def test_hdf5_float_labels_that_are_whole_numbers_are_accepted(tmp_path):
    f = _h5(tmp_path / "f.h5", x=np.zeros((2, 4, 4, 3), np.uint8), y=np.array([1.0, 0.0], np.float32))
    assert discover(f).labels().tolist() == [1, 0]


@pytest.mark.parametrize("group", ["x", "y"])
def test_hdf5_group_where_a_dataset_belongs_is_named(tmp_path, group):
    with h5py.File(tmp_path / "g.h5", "w") as f:
        if group == "x":
            f.create_group("x").create_dataset("inner", data=np.zeros((2, 4, 4, 3), np.uint8))
        else:
            f.create_dataset("x", data=np.zeros((2, 4, 4, 3), np.uint8))
            f.create_group("y")
    want = (r"g\.h5: 'x' is a Group, expected a dataset of N x H x W x 3 uint8 images" if group == "x"
            else r"g\.h5: 'y' is a Group, expected a dataset of N labels")
    with pytest.raises(InputError, match=want):
        discover(tmp_path / "g.h5")


def test_file_that_is_not_hdf5_is_named(tmp_path):
    f = tmp_path / "fake.h5"
    f.write_bytes(b"not hdf5 at all")
    with pytest.raises(InputError, match=r"fake\.h5: not a readable HDF5 file"):
        discover(f)


def test_official_patchcamelyon_file_names_are_read_as_train_val_and_test(tmp_path):
    import h5py

    from training.data import resolve_eval_samples, resolve_training_data

    for split, n in (("train", 6), ("valid", 2), ("test", 3)):
        stem = tmp_path / f"camelyonpatch_level_2_split_{split}"
        with h5py.File(f"{stem}_x.h5", "w") as fx:
            fx.create_dataset("x", data=np.zeros((n, 8, 8, 3), np.uint8))
        with h5py.File(f"{stem}_y.h5", "w") as fy:
            fy.create_dataset("y", data=(np.arange(n) % 2).astype(np.uint8).reshape(-1, 1, 1, 1))
    for data in (tmp_path, tmp_path / "camelyonpatch_level_2_split_train_x.h5"):
        split = resolve_training_data(data)
        assert (len(split.train), len(split.val)) == (6, 2)
        assert split.val[0].source.startswith(str(tmp_path / "camelyonpatch_level_2_split_valid_x.h5"))
    test = resolve_eval_samples(tmp_path, "test", ("normal", "tumour"))
    assert [s.label for s in test] == [0, 1, 0]
    assert test[0].source == f"{tmp_path / 'camelyonpatch_level_2_split_test_x.h5'}#0"


def test_the_resolution_a_data_set_records_is_found_where_it_says_it(synth_data, tmp_path):
    import h5py
    import numpy as np

    from serving.inputs.datasets import PCAM_MPP, recorded_mpp

    for path in (synth_data, synth_data / "train", synth_data / "manifest.csv", synth_data / "pcam" / "train_x.h5"):
        mpp, where = recorded_mpp(path)
        assert mpp == 0.5 and where, path  # synth.json, or the HDF5 file's own attribute
    official = tmp_path / "camelyonpatch_level_2_split_train_x.h5"
    with h5py.File(official, "w") as f:
        f.create_dataset("x", data=np.zeros((2, 8, 8, 3), np.uint8))
    assert recorded_mpp(official) == (PCAM_MPP, f"{official.name} (PatchCamelyon: 40x scans undersampled to 10x)")
    plain = tmp_path / "plain"
    plain.mkdir()
    assert recorded_mpp(plain) == (None, "")
