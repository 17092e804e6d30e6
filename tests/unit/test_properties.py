"""Property-based tests (hypothesis): view geometry, spec round trip, manifests."""

from __future__ import annotations

import csv
import string

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.inputs.datasets import read_manifest
from serving.core.spec import TTA_MODES, ModelSpec
from serving.core.views import combine_views, make_views, num_views, view_boxes

sizes = st.tuples(st.integers(1, 40), st.integers(1, 40))


@st.composite
def source_and_crop(draw):
    ch, cw = draw(sizes)
    sh = draw(st.integers(ch, ch + 30))
    sw = draw(st.integers(cw, cw + 30))
    return (sh, sw), (ch, cw)


@given(source_and_crop(), st.sampled_from(TTA_MODES))
def test_every_view_lies_inside_the_source(geom, mode):
    (sh, sw), (ch, cw) = geom
    boxes = view_boxes(mode, (sh, sw), (ch, cw))
    assert len(boxes) == num_views(mode)
    for top, left, _ in boxes:
        assert 0 <= top <= sh - ch and 0 <= left <= sw - cw


@given(source_and_crop())
def test_ten_crop_is_five_crop_then_its_mirrors(geom):
    src, crop = geom
    five, ten = view_boxes("five", src, crop), view_boxes("ten", src, crop)
    assert ten[:5] == five
    assert [(v.top, v.left) for v in ten[5:]] == [(v.top, v.left) for v in five]
    assert all(v.flip for v in ten[5:]) and not any(v.flip for v in five)


@settings(max_examples=30, suppress_health_check=[HealthCheck.too_slow])
@given(source_and_crop(), st.sampled_from(TTA_MODES), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_make_views_equals_slicing_each_box(geom, mode, n, seed):
    (sh, sw), (ch, cw) = geom
    images = np.random.default_rng(seed).integers(0, 256, (n, sh, sw, 3), dtype=np.uint8)
    views = make_views(images, mode, (ch, cw))
    boxes = view_boxes(mode, (sh, sw), (ch, cw))
    assert views.shape == (n * len(boxes), ch, cw, 3)
    for i in range(n):
        for j, (top, left, flip) in enumerate(boxes):
            expected = images[i, top:top + ch, left:left + cw]
            if flip:
                expected = expected[:, ::-1]
            np.testing.assert_array_equal(views[i * len(boxes) + j], expected)


@given(st.integers(1, 5), st.integers(1, 10), st.integers(2, 6), st.integers(0, 2**31 - 1))
def test_combine_views_is_the_mean_per_patch(n, v, c, seed):
    probs = np.random.default_rng(seed).random((n * v, c))
    combined = combine_views(probs, v)
    for i in range(n):
        np.testing.assert_allclose(combined[i], probs[i * v:(i + 1) * v].mean(axis=0))


class_name = st.text(alphabet=string.ascii_letters + string.digits + " _-", min_size=1, max_size=12).filter(str.strip)
unit = st.floats(min_value=1e-3, max_value=1.0, allow_nan=False)


@st.composite
def specs(draw):
    names = draw(st.lists(class_name, min_size=2, max_size=8, unique=True))
    h, w = draw(st.integers(1, 512)), draw(st.integers(1, 512))
    return ModelSpec(
        name=draw(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,20}", fullmatch=True)),
        class_names=tuple(names), input_height=h, input_width=w,
        mean=tuple(draw(unit) for _ in range(3)), std=tuple(draw(unit) for _ in range(3)),
        version=draw(st.integers(1, 1000)), max_batch_size=draw(st.integers(1, 1024)),
        tta_views=("none",) + tuple(draw(st.sets(st.sampled_from(TTA_MODES[1:])))),
    )


@given(specs())
def test_spec_json_round_trip_is_exact(spec):
    again = ModelSpec.from_json(spec.to_json())
    assert again == spec
    assert again.to_json() == spec.to_json()


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(st.from_regex(r"[a-z]{1,8}\.png", fullmatch=True),
                               st.sampled_from(["normal", "tumour"]),
                               st.sampled_from(["train", "val", "test"])), min_size=1, max_size=20,
                      unique_by=lambda r: r[0]),  # a path listed twice is refused (test_job_safety.py)
       split=st.sampled_from(["train", "val", "test"]))
def test_manifest_keeps_every_row_of_the_split_in_order(tmp_path_factory, rows, split):
    folder = tmp_path_factory.mktemp("manifest")
    path = folder / "m.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    wanted = [r for r in rows if r[2] == split]
    if not wanted:
        return
    ds = read_manifest(path, split=split, classes=("normal", "tumour"))
    assert [s.source for s in ds.samples] == [str(folder / r[0]) for r in wanted]
    assert [ds.classes[s.label] for s in ds.samples] == [r[1] for r in wanted]
