"""The reference preprocessing: decode rule, equalisation order, evaluation geometry."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from serving.core.errors import SpecError
from serving.core.imageio import equalize_grey_u8, load_rgb_u8, read_header, resize_u8
from serving.core.preprocess import apply_geometry, fit_centre, prepare_u8, reference_views
from serving.core.spec import ModelSpec
from serving.core.views import make_views
from tests.matrix_images import upright_exif_image, write_matrix

SPEC = ModelSpec(name="m", class_names=("normal", "tumour"), input_height=32, input_width=32,
                 mean=(0.5,) * 3, std=(0.25,) * 3)
GREY = SPEC.replace(extra={"grayscale_equalize": True})
# A model trained with --random-crop on 40 px images: evaluation cuts, never resizes.
CROP = SPEC.replace(eval_geometry="crop", source_height=40, source_width=40)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    return write_matrix(tmp_path_factory.mktemp("matrix"))


def test_spec_records_the_geometry_rule_and_refuses_unknown_ones():
    assert SPEC.eval_geometry == "resize_crop" and SPEC.source_hw == (37, 37)
    assert ModelSpec.from_json(SPEC.to_json()).eval_geometry == "resize_crop"
    with pytest.raises(SpecError, match=r"eval_geometry: invalid rule 'stretch'. Only resize_crop, crop are supported"):
        SPEC.replace(eval_geometry="stretch")


@pytest.mark.parametrize("tta", ["none", "flip", "five", "ten"])
def test_an_input_size_image_is_never_resized_whatever_the_tta_mode(tta):
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    views = reference_views(img, SPEC, tta)
    for v, view in enumerate(views):
        mirrored = tta == "flip" and v == 1 or tta == "ten" and v >= 5
        np.testing.assert_array_equal(view, img[:, ::-1] if mirrored else img)


@pytest.mark.parametrize("side", [20, 37, 50])
def test_other_sizes_are_resized_to_the_source_size_then_cropped(side):
    img = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
    src = resize_u8(img, (37, 37))
    np.testing.assert_array_equal(apply_geometry(img, SPEC), src)
    np.testing.assert_array_equal(reference_views(img, SPEC, "none")[0], src[2:34, 2:34])
    np.testing.assert_array_equal(reference_views(img, SPEC, "five"), make_views(src[None], "five", (32, 32)))


def test_grey_models_equalise_at_the_source_resolution_before_the_resize():
    img = np.random.default_rng(3).integers(0, 256, (50, 50, 3), dtype=np.uint8)
    want = resize_u8(equalize_grey_u8(img), (37, 37))
    np.testing.assert_array_equal(prepare_u8(img, GREY), want)
    wrong_order = equalize_grey_u8(resize_u8(img, (37, 37)))
    assert np.abs(want.astype(int) - wrong_order.astype(int)).max() > 1  # the order is visible


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_applied(matrix, orientation):
    path = matrix[f"exif_{orientation}.jpg"]
    assert read_header(path).orientation == orientation
    got = load_rgb_u8(path)
    upright = upright_exif_image()
    assert got.shape == upright.shape
    diff = np.abs(got.astype(int) - upright.astype(int))
    assert diff.mean() < 3, diff.mean()  # JPEG loss only; a wrong orientation is tens of levels off
    with Image.open(path) as raw:
        stored = np.asarray(raw.convert("RGB"))
    if orientation != 1 and stored.shape == upright.shape:
        assert np.abs(stored.astype(int) - upright.astype(int)).mean() > 10


def test_mode_rule_for_grey_rgba_palette_16bit_and_cmyk(matrix):
    rgb = load_rgb_u8(matrix["rgb_equal.png"])
    grey = load_rgb_u8(matrix["grey_equal.png"])
    assert (grey[..., 0] == grey[..., 2]).all()
    rgba = load_rgb_u8(matrix["rgba_equal.png"])
    np.testing.assert_array_equal(rgba[:, 0], np.full((32, 3), 255))  # alpha 0: white
    np.testing.assert_array_equal(rgba[:, -1], rgb[:, -1])  # alpha 255: the pixel
    palette = load_rgb_u8(matrix["palette_equal.png"])
    assert np.abs(palette.astype(int) - rgb.astype(int)).mean() < 6  # 64 colours
    g16 = load_rgb_u8(matrix["grey16_equal.png"])
    v = (grey[..., 0].astype(np.uint32) * 257 + 100)
    np.testing.assert_array_equal(g16[..., 0], ((v * 255 + 32767) // 65535).astype(np.uint8))
    cmyk = load_rgb_u8(matrix["cmyk_equal.jpg"])
    assert cmyk.shape == (32, 32, 3) and np.abs(cmyk.astype(int) - rgb.astype(int)).mean() < 6


def test_mean_std_of_a_grey_model_are_those_of_the_equalised_images(tmp_path):
    from serving.inputs.datasets import Sample
    from training.stats import compute_mean_std

    # Bright, low-contrast grey images (an X-ray-like set): raw statistics are far from the equalised ones.
    rng = np.random.default_rng(0)
    samples = []
    for i in range(3):
        grey = np.clip(rng.normal(200, 25, (40, 48)), 0, 255).astype(np.uint8)
        Image.fromarray(grey).save(tmp_path / f"{i}.png")
        samples.append(Sample(str(tmp_path / f"{i}.png")))
    raw_mean, raw_std = compute_mean_std(samples)
    mean, std = compute_mean_std(samples, grayscale_equalize=True)
    pixels = np.concatenate([equalize_grey_u8(load_rgb_u8(s.source)).reshape(-1, 3) for s in samples]) / 255.0
    np.testing.assert_allclose(mean, pixels.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(std, pixels.std(axis=0), atol=1e-6)
    assert raw_mean[0] > 0.7 and abs(mean[0] - 0.5) < 0.05 and std[0] > 2 * raw_std[0]


def test_training_scan_lists_an_over_limit_image_by_its_header(tmp_path):
    from serving.inputs.datasets import Sample
    from tests.unit.test_bad_input_decode import png_header_only
    from training.scan import refuse_bad, scan_samples
    from training.errors import DataError

    (tmp_path / "bomb.png").write_bytes(png_header_only(20_000, 20_000))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "ok.png")
    scan = scan_samples([Sample(str(tmp_path / "bomb.png"), 0), Sample(str(tmp_path / "ok.png"), 1)], None,
                        progress=False)
    assert [s.source for s in scan.samples] == [str(tmp_path / "ok.png")]
    assert scan.bad == [(str(tmp_path / "bomb.png"),
                         "image too large: 20000x20000 = 400000000 pixels is over the limit of 67108864 "
                         "(--max-image-pixels)")]
    with pytest.raises(DataError, match=r"1 unusable image file\(s\).*--skip-bad[\s\S]*bomb\.png: image too large"):
        refuse_bad(scan, skip_bad=False)
    refuse_bad(scan, skip_bad=True)  # --skip-bad: trains on the rest; the file stays listed in scan.bad


def test_crop_geometry_keeps_the_input_size_and_cuts_the_source_window_of_larger_images():
    rng = np.random.default_rng(7)
    small = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(apply_geometry(small, CROP), small)
    np.testing.assert_array_equal(reference_views(small, CROP, "none")[0], small)
    big = rng.integers(0, 256, (51, 46, 3), dtype=np.uint8)
    window = big[5:45, 3:43]  # (51 - 40) // 2 = 5 rows, (46 - 40) // 2 = 3 columns: a cut, pixel for pixel
    np.testing.assert_array_equal(apply_geometry(big, CROP), window)
    np.testing.assert_array_equal(reference_views(big, CROP, "none")[0], window[4:36, 4:36])
    np.testing.assert_array_equal(reference_views(big, CROP, "five"), make_views(window[None], "five", (32, 32)))
    # The resize rule would have given other pixels: the geometry is really the spec's.
    assert not np.array_equal(apply_geometry(big, SPEC.replace(source_height=40, source_width=40)), window)


def test_crop_geometry_pads_smaller_images_with_white_around_the_centre():
    img = np.random.default_rng(8).integers(0, 255, (35, 28, 3), dtype=np.uint8)
    out = apply_geometry(img, CROP)
    assert out.shape == (40, 40, 3)
    np.testing.assert_array_equal(out[2:37, 6:34], img)  # 5 rows and 12 columns of padding, split evenly
    mask = np.ones((40, 40), bool)
    mask[2:37, 6:34] = False
    assert (out[mask] == 255).all()


@pytest.mark.parametrize("size,window", [(40, 40), (41, 40), (39, 40), (10, 3), (3, 10), (4, 9)])
def test_fit_centre_is_a_centred_window_or_a_centred_pad(size, window):
    img = np.arange(size, dtype=np.uint8)[:, None, None].repeat(2, 1).repeat(3, 2)
    out = fit_centre(img, (window, 2))
    assert out.shape == (window, 2, 3)
    inside = out[:, 0, 0][out[:, 0, 0] != 255]
    if size >= window:
        assert list(inside) == list(range((size - window) // 2, (size - window) // 2 + window))
    else:
        assert list(inside) == list(range(size))
        top = list(out[:, 0, 0]).index(0)
        assert top == (window - size) // 2
