"""The gate's rule for the DALI preprocessing model against the reference decoding."""

from __future__ import annotations

import numpy as np

from export.fixture import EQUALISED_MAX_OFF_FRACTION, preprocess_agreement, reference_pixels
from serving.core.imageio import equalize_grey_u8, grey_equalize_u8


def _image(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(48, 48, 3), dtype=np.uint8)


def test_plain_models_allow_one_grey_level_and_no_more():
    want = _image()
    assert preprocess_agreement(np.clip(want.astype(int) + 1, 0, 255).astype(np.uint8), want, False)[0]
    ok, value, detail = preprocess_agreement(np.clip(want.astype(int) + 2, 0, 255).astype(np.uint8), want, False)
    assert (ok, value) == (False, 2) and detail == "max |pixel - reference decoding| 2 grey level(s) > 1"


def test_equalised_models_allow_a_few_stepped_pixels_but_not_another_order():
    want = equalize_grey_u8(_image())
    few = want.copy()
    few.reshape(-1)[:10] ^= 0x40  # 10 of 6912 values a histogram step away: rounding, not a different pipeline
    ok, value, _ = preprocess_agreement(few, want, True)
    assert ok and 0 < value <= EQUALISED_MAX_OFF_FRACTION
    # Equalising after a resize instead of before it (the bug the reference fixed) moves most pixels.
    other = grey_equalize_u8(np.ascontiguousarray(_image()[::2, ::2].repeat(2, 0).repeat(2, 1))[None])[0]
    ok, value, detail = preprocess_agreement(other, want, True)
    assert not ok and value > 0.5 and "equalised model" in detail


def test_reference_pixels_equalise_before_the_geometry(tiny_spec):
    import dataclasses
    import io

    from PIL import Image

    spec = dataclasses.replace(tiny_spec, extra={**tiny_spec.extra, "grayscale_equalize": True})
    big = _image(1).repeat(2, 0).repeat(2, 1)  # 96 px: resized to the model's size
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="PNG")
    _, crop = reference_pixels(buf.getvalue(), spec)
    from serving.core.preprocess import reference_views

    assert np.array_equal(crop, reference_views(big, spec, "none")[0])
