"""HED stain augmentation: the DALI graph against its numpy reference, seeding, the train pipeline hook."""

from __future__ import annotations

import numpy as np
import pytest

from serving.synth.texture import make_patch
from training.errors import TrainingError
from training.stain import HED_FROM_RGB, RGB_FROM_HED, check_stain_options, hed_jitter_numpy

N = 6


def _images(size: int = 24) -> list[np.ndarray]:
    return [make_patch(np.random.default_rng([4, i]), i % 2, size) for i in range(N)]


def _run(graph, images, seed: int = 1, extra=()):
    import nvidia.dali.fn as fn
    from nvidia.dali import pipeline_def

    @pipeline_def(batch_size=N, num_threads=1, device_id=None, seed=seed)
    def pipe():
        x = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        # A source with no parameters: DALI would pass the iteration number to one.
        args = [fn.external_source(source=(lambda vals: lambda: vals)(v), batch=True) for v in extra]
        return graph(x, *args)

    p = pipe()
    p.build()
    (out,) = p.run()
    return [np.array(out.at(i)) for i in range(N)]


def test_dali_hed_graph_equals_the_numpy_reference_pixel_for_pixel():
    from training.stain import apply_hed

    images = _images()
    rng = np.random.default_rng(0)
    alphas = [np.diag(rng.uniform(0.6, 1.4, 3)).astype(np.float32) for _ in range(N)]
    betas = [rng.uniform(-0.1, 0.1, 3).astype(np.float32) for _ in range(N)]
    got = _run(apply_hed, images, extra=(alphas, betas))
    for img, a, b, g in zip(images, alphas, betas, got):
        want = hed_jitter_numpy(img, np.diag(a), b)
        assert g.dtype == np.uint8 and g.shape == img.shape
        assert np.abs(g.astype(int) - want).max() <= 1  # float rounding at exact halves
        assert np.abs(g.astype(int) - img).mean() > 1.0  # and the jitter changed the image


def test_unit_scale_and_zero_shift_give_the_image_back():
    img = _images()[0]
    assert np.abs(hed_jitter_numpy(img, np.ones(3), np.zeros(3)).astype(int) - img).max() <= 1
    np.testing.assert_allclose(HED_FROM_RGB @ RGB_FROM_HED, np.eye(3), atol=1e-12)


def test_more_haematoxylin_darkens_nuclei_more_than_background():
    img = _images(48)[1]  # a tumour patch: many nuclei
    out = hed_jitter_numpy(img, np.array([1.5, 1.0, 1.0]), np.zeros(3)).astype(int)
    grey = img.astype(int).sum(-1)
    dark, light = grey < np.percentile(grey, 10), grey > np.percentile(grey, 90)
    drop = img.astype(int).sum(-1) - out.sum(-1)
    assert drop[dark].mean() > 3 * max(drop[light].mean(), 1.0)


def test_random_jitter_is_seeded_per_pipeline_and_differs_per_image():
    from training.stain import hed_jitter

    images = _images()
    graph = lambda x: hed_jitter(x, scale=0.3, shift=0.05)  # noqa: E731
    a, b, c = _run(graph, images, seed=7), _run(graph, images, seed=7), _run(graph, images, seed=8)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, z) for x, z in zip(a, c))
    # Each image gets its own draw: the mean colour change differs between images.
    shifts = [tuple(np.round((o.astype(float) - i).mean(axis=(0, 1)), 1)) for o, i in zip(a, images)]
    assert len(set(shifts)) == N


@pytest.mark.parametrize("scale, shift, match", [(1.0, 0.0, "--stain-scale"), (0.2, -0.1, "--stain-shift")])
def test_bad_strengths_are_refused_naming_the_flag(scale, shift, match):
    with pytest.raises(TrainingError, match=match):
        check_stain_options(scale, shift)


def test_train_pipeline_applies_the_jitter_only_with_stain_augment(synth_data):
    from serving.inputs.datasets import discover
    from training.pipeline import AugmentConfig, build_train_pipeline, iterate

    samples = discover(synth_data, split="train").samples[:8]
    plain = AugmentConfig(hflip_prob=0.0, vflip_prob=0.0, scale_min=1.0)
    stained = AugmentConfig(hflip_prob=0.0, vflip_prob=0.0, scale_min=1.0, stain_augment=True)
    outs = []
    for aug in (plain, stained, plain):
        pipe = build_train_pipeline(samples, input_hw=(48, 48), augment=aug, batch_size=8, num_threads=1, seed=3)
        (images, _), = list(iterate(pipe, samples))
        outs.append(images.numpy())
    np.testing.assert_array_equal(outs[0], outs[2])
    from serving.core.imageio import load_rgb_u8

    np.testing.assert_array_equal(outs[0][0], load_rgb_u8(samples[0].source))  # 48 px: the resize is a copy
    assert np.abs(outs[1].astype(int) - outs[0]).mean() > 1.0


def test_random_crop_takes_windows_of_the_model_size_without_resizing(synth_data):
    from serving.core.imageio import load_rgb_u8
    from serving.inputs.datasets import discover
    from training.pipeline import AugmentConfig, build_train_pipeline, iterate

    samples = discover(synth_data, split="train").samples[:8]
    aug = AugmentConfig(hflip_prob=0.0, vflip_prob=0.0, random_crop=True)
    pipe = build_train_pipeline(samples, input_hw=(32, 32), augment=aug, batch_size=8, num_threads=1, seed=5)
    (images, _), = list(iterate(pipe, samples))
    offsets = set()
    for crop, s in zip(images.numpy(), samples):
        src = load_rgb_u8(s.source)  # 48 x 48: every 32 x 32 crop is a window of it, pixel for pixel
        hits = [(y, x) for y in range(17) for x in range(17) if np.array_equal(src[y:y + 32, x:x + 32], crop)]
        assert len(hits) == 1, s.source
        offsets.add(hits[0])
    assert len(offsets) > 2  # random positions, not the centre every time


def test_random_crop_training_records_the_crop_geometry_of_its_images(synth_data, tmp_path):
    from training.data import resolve_training_data
    from training.train import _build_spec
    from tests.fixtures_train import small_train_config

    data = resolve_training_data(synth_data)
    cfg = small_train_config(synth_data, tmp_path / "run", image_size=32, random_crop=True,
                             mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    spec = _build_spec(cfg, data)
    # 48 px training images, 32 px windows: evaluation cuts the 48 px centre window, never resizes.
    assert (spec.eval_geometry, spec.source_hw, spec.input_hw) == ("crop", (48, 48), (32, 32))
    plain = _build_spec(small_train_config(synth_data, tmp_path / "run2", image_size=32,
                                           mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2)), data)
    assert (plain.eval_geometry, plain.source_hw) == ("resize_crop", (37, 37))
