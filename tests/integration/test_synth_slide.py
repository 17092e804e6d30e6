"""The synthetic slide opens in real OpenSlide, with its levels and MPP, and its masks line up."""

from __future__ import annotations

import json

import numpy as np
import openslide
import pytest
from PIL import Image

from serving.synth.dataset import make_patch
from serving.synth.slide import write_slide

MASK_DOWNSAMPLE = 16


@pytest.fixture(scope="module")
def slide(synth_slide):
    s = openslide.OpenSlide(str(synth_slide / "slides" / "slide_0.tiff"))
    yield s
    s.close()


@pytest.fixture(scope="module")
def level0(slide):
    rgba = np.asarray(slide.read_region((0, 0), 0, slide.level_dimensions[0]))
    assert (rgba[..., 3] == 255).all()  # every pixel inside the slide is opaque
    return rgba[..., :3]


@pytest.fixture(scope="module")
def masks(synth_slide):
    d = synth_slide / "slides"
    tumour = np.asarray(Image.open(d / "slide_0_mask.png")) == 255
    tissue = np.asarray(Image.open(d / "slide_0_tissue.png")) == 255
    return tissue, tumour


def _cells(level0: np.ndarray) -> np.ndarray:
    """Mean RGB of every 16 x 16 block of level 0: one row per mask pixel."""
    h, w = level0.shape[0] // MASK_DOWNSAMPLE, level0.shape[1] // MASK_DOWNSAMPLE
    return level0.reshape(h, MASK_DOWNSAMPLE, w, MASK_DOWNSAMPLE, 3).mean(axis=(1, 3))


def test_slide_opens_with_three_levels_downsampled_by_four(slide):
    assert slide.properties[openslide.PROPERTY_NAME_VENDOR] == "generic-tiff"
    assert slide.level_count == 3
    assert slide.level_dimensions == ((2048, 1536), (512, 384), (128, 96))
    assert slide.level_downsamples == (1.0, 4.0, 16.0)


def test_slide_reports_half_a_micrometre_per_pixel(slide):
    assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
    assert float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(0.5)


def test_reduced_level_is_the_box_average_of_level_zero(slide, level0):
    level1 = np.asarray(slide.read_region((0, 0), 1, (512, 384)))[..., :3].astype(np.float64)
    expected = level0.reshape(384, 4, 512, 4, 3).mean(axis=(1, 3))
    assert np.abs(level1 - expected).max() <= 1.0


def test_read_region_at_an_offset_returns_the_same_pixels_as_the_full_level(slide, level0):
    region = np.asarray(slide.read_region((700, 300), 0, (96, 64)))
    assert region.shape == (64, 96, 4)
    np.testing.assert_array_equal(region[..., :3], level0[300:364, 700:796])


def test_mask_json_describes_the_mask_geometry(synth_slide, masks):
    doc = json.loads((synth_slide / "slides" / "slide_0_mask.json").read_text())
    assert doc["mask_downsample"] == MASK_DOWNSAMPLE
    assert doc["mask_mpp"] == pytest.approx(8.0)
    assert (doc["level0_width"], doc["level0_height"], doc["patch_size"]) == (2048, 1536, 48)
    tissue, tumour = masks
    assert tissue.shape == tumour.shape == (1536 // MASK_DOWNSAMPLE, 2048 // MASK_DOWNSAMPLE)
    assert doc["tumour_fraction_of_tissue"] == pytest.approx(tumour.sum() / tissue.sum(), abs=1e-6)


def test_tumour_lies_inside_tissue_and_both_cover_a_real_share_of_the_slide(masks):
    tissue, tumour = masks
    assert not (tumour & ~tissue).any()
    assert 0.3 < tissue.mean() < 0.6
    assert 0.15 < tumour.sum() / tissue.sum() < 0.45
    border = np.ones_like(tissue)
    border[2:-2, 2:-2] = False
    assert not (tissue & border).any()  # tissue keeps off the edges of the glass


def test_mask_lines_up_glass_white_tumour_darker_and_more_purple_than_normal_tissue(level0, masks):
    tissue, tumour = masks
    cells = _cells(level0)
    glass, normal, tum = cells[~tissue], cells[tissue & ~tumour], cells[tumour]
    assert glass.min() > 235  # every glass cell is white
    brightness = lambda c: c.sum(-1)  # noqa: E731
    # Each class's cells separate on brightness at the median; tumour is darker, bluer.
    assert np.median(brightness(tum)) < np.median(brightness(normal)) - 40
    purple = lambda c: c[:, 2] - c[:, 1]  # noqa: E731 - haematoxylin raises blue over green
    assert np.median(purple(tum)) > np.median(purple(normal))
    assert np.median(brightness(normal)) < np.median(brightness(glass)) - 60


def test_slide_tiles_have_the_nuclear_density_of_the_training_patches_of_their_class(level0, masks):
    tissue, tumour = masks

    def dark(p: np.ndarray) -> float:
        return float((p.astype(np.int32).sum(-1) < 450).mean())

    def tiles(mask: np.ndarray) -> list[float]:
        # 48 px tiles whose three 16 px cells each way all lie inside the region.
        out = []
        for i in range(0, mask.shape[0] - 2, 3):
            for j in range(0, mask.shape[1] - 2, 3):
                if mask[i:i + 3, j:j + 3].all():
                    out.append(dark(level0[i * 16:i * 16 + 48, j * 16:j * 16 + 48]))
        return out

    slide_normal, slide_tumour = np.mean(tiles(tissue & ~tumour)), np.mean(tiles(tumour))
    patch_normal = np.mean([dark(make_patch(np.random.default_rng([9, i]), 0, 48)) for i in range(30)])
    patch_tumour = np.mean([dark(make_patch(np.random.default_rng([9, i]), 1, 48)) for i in range(30)])
    assert slide_tumour > 3 * slide_normal
    assert slide_normal == pytest.approx(patch_normal, rel=0.5)
    assert slide_tumour == pytest.approx(patch_tumour, rel=0.5)


def test_same_seed_writes_the_same_slide_bytes(tmp_path):
    a = write_slide(tmp_path / "a", seed=5, patch_size=32, slide_size=512)
    b = write_slide(tmp_path / "b", seed=5, patch_size=32, slide_size=512)
    for pa, pb in ((a.slide, b.slide), (a.tumour_mask, b.tumour_mask), (a.mask_json, b.mask_json)):
        assert pa.read_bytes() == pb.read_bytes()
    assert a.level_dimensions == ((512, 384), (128, 96))
