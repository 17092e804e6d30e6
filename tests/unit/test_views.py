"""TTA view geometry against independent expectations (hand-written boxes, torchvision's crops)."""

from __future__ import annotations

import numpy as np
import pytest

from serving.core.errors import BadInputError
from serving.core.views import View, combine_views, make_views, num_views, view_boxes


def test_five_crop_boxes_are_corners_then_centre_in_torchvision_order():
    # 11 x 14 source, 6 x 8 crop: corners at 0 and 5 / 6; the centre rounds 2.5 -> 2 and 3.0 -> 3.
    assert view_boxes("five", (11, 14), (6, 8)) == [
        View(0, 0, False), View(0, 6, False), View(5, 0, False), View(5, 6, False), View(2, 3, False)]


def test_none_and_flip_are_the_centre_and_its_mirror():
    assert view_boxes("none", (10, 10), (4, 4)) == [View(3, 3, False)]
    assert view_boxes("flip", (10, 10), (4, 4)) == [View(3, 3, False), View(3, 3, True)]


def test_ten_crop_is_the_five_then_the_same_five_mirrored():
    five = view_boxes("five", (9, 9), (5, 5))
    assert view_boxes("ten", (9, 9), (5, 5)) == five + [View(t, left, True) for t, left, _ in five]


@pytest.mark.parametrize("mode, count", [("none", 1), ("flip", 2), ("five", 5), ("ten", 10)])
def test_num_views(mode, count):
    assert num_views(mode) == count


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (2, 11, 13, 3), dtype=np.uint8)


def test_five_views_equal_torchvision_five_crop(images):
    import torch
    from torchvision.transforms import functional as F

    views = make_views(images, "five", (6, 8)).reshape(2, 5, 6, 8, 3)
    for i, img in enumerate(images):
        crops = F.five_crop(torch.from_numpy(img).permute(2, 0, 1), [6, 8])
        for j, crop in enumerate(crops):
            np.testing.assert_array_equal(views[i, j], crop.permute(1, 2, 0).numpy())


def test_ten_views_are_the_same_set_as_torchvision_ten_crop_when_margins_are_even(images):
    # torchvision crops the mirrored image, so its mirrored corners come in another order;
    # averaging makes the order irrelevant, the set of views must match. With an odd
    # margin its mirrored centre sits one pixel off ours (rounding in mirrored coordinates).
    import torch
    from torchvision.transforms import functional as F

    even = images[:, :10, :12]
    views = make_views(even, "ten", (6, 8)).reshape(2, 10, 6, 8, 3)
    for i, img in enumerate(even):
        crops = F.ten_crop(torch.from_numpy(img).permute(2, 0, 1), [6, 8])
        theirs = sorted(c.permute(1, 2, 0).numpy().tobytes() for c in crops)
        assert sorted(v.tobytes() for v in views[i]) == theirs


def test_flipped_view_is_a_left_right_mirror(images):
    v = make_views(images, "flip", (7, 7)).reshape(2, 2, 7, 7, 3)
    np.testing.assert_array_equal(v[:, 1], v[:, 0, :, ::-1])
    np.testing.assert_array_equal(v[0, 0], images[0, 2:9, 3:10])


def test_views_are_patch_major(images):
    v = make_views(images, "five", (6, 8))
    np.testing.assert_array_equal(v[5 + 4], images[1, 2:8, 2:10])  # second image, centre view


def test_combine_averages_each_patch_over_its_views():
    probs = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.2, 0.8]])
    np.testing.assert_allclose(combine_views(probs, 2), [[0.75, 0.25], [0.1, 0.9]])
    np.testing.assert_allclose(combine_views(probs, 1), probs)


def test_invalid_mode_lists_the_supported_ones():
    with pytest.raises(ValueError, match=r"^Invalid TTA mode 'twelve'. Only none, flip, five, ten are supported.$"):
        view_boxes("twelve", (8, 8), (4, 4))


def test_crop_larger_than_source_is_refused():
    with pytest.raises(ValueError, match=r"crop \(9, 4\) is larger than the source \(8, 8\)"):
        view_boxes("none", (8, 8), (9, 4))


def test_make_views_refuses_images_that_are_not_nhwc_rgb():
    with pytest.raises(BadInputError, match=r"expected images of shape \(N, H, W, 3\), got \(8, 8, 3\)"):
        make_views(np.zeros((8, 8, 3), np.uint8), "none", (4, 4))
    with pytest.raises(BadInputError, match=r"got \(1, 8, 8, 4\)"):
        make_views(np.zeros((1, 8, 8, 4), np.uint8), "none", (4, 4))


def test_combine_refuses_rows_not_a_multiple_of_the_views():
    with pytest.raises(ValueError, match=r"^7 rows is not a multiple of 5 views$"):
        combine_views(np.zeros((7, 2)), 5)
