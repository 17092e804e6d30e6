"""Real DALI pipelines on the CPU: output format, augmentation bounds, sharding."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from serving.inputs.datasets import Sample, discover
from serving.core.spec import ModelSpec
from training.pipeline import (AugmentConfig, EvalLoader, TrainLoader, build_eval_pipeline, build_train_pipeline,
                               iterate, unpad)

NO_AUG = AugmentConfig(hflip_prob=0.0, vflip_prob=0.0, scale_min=1.0)


@pytest.fixture(scope="module")
def train_samples(synth_data):
    return discover(synth_data, split="train").samples


def _all(pipe, samples):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in iterate(pipe, samples)])
    return np.concatenate(xs), np.concatenate(ys)


def _train(samples, augment, seed=1, input_hw=(32, 32), **kw):
    return _all(build_train_pipeline(samples, input_hw=input_hw, augment=augment, batch_size=8, num_threads=1,
                                     seed=seed, **kw), samples)


def _spec(input_hw=(32, 32), source_hw=None, grey=False) -> ModelSpec:
    sh, sw = source_hw or input_hw
    return ModelSpec(name="t", class_names=("a", "b"), input_height=input_hw[0], input_width=input_hw[1],
                     source_height=sh, source_width=sw, mean=(0.5,) * 3, std=(0.25,) * 3,
                     extra={"grayscale_equalize": True} if grey else {})


def _val(samples, input_hw=(32, 32), source_hw=None, grey=False, **kw):
    spec = _spec(input_hw, source_hw, grey)
    return _all(build_eval_pipeline(samples, spec=spec, batch_size=8, num_threads=1, **kw), samples)


def _val_views(samples, spec):
    """The geometry's output per sample (views=True), cut back to each image's own size."""
    out = []
    for x, _, shapes in iterate(build_eval_pipeline(samples, spec=spec, views=True, batch_size=8, num_threads=1),
                                samples, with_shapes=True):
        out += unpad(x.numpy(), shapes.numpy())
    return out


def test_train_pipeline_outputs_uint8_nhwc_batches_with_labels(train_samples):
    pipe = build_train_pipeline(train_samples[:20], input_hw=(32, 40), augment=AugmentConfig(rotation_deg=20),
                                batch_size=8, num_threads=1, seed=0)
    batches = list(iterate(pipe, train_samples[:20]))
    assert [tuple(x.shape) for x, _ in batches] == [(8, 32, 40, 3), (8, 32, 40, 3), (4, 32, 40, 3)]
    assert all(str(x.dtype) == "torch.uint8" and x.is_contiguous() for x, _ in batches)
    assert np.concatenate([y.numpy() for _, y in batches]).tolist() == [s.label for s in train_samples[:20]]


def test_no_augmentation_gives_the_validation_image(train_samples):
    x_train, _ = _train(train_samples[:10], NO_AUG)
    x_val, _ = _val(train_samples[:10])
    np.testing.assert_array_equal(x_train, x_val)


@pytest.mark.parametrize("flag,axis", [("hflip_prob", 2), ("vflip_prob", 1)])
def test_flip_with_probability_one_equals_numpy_flip_of_the_validation_image(train_samples, flag, axis):
    x_train, _ = _train(train_samples[:10], AugmentConfig(**{**NO_AUG.__dict__, flag: 1.0}))
    x_val, _ = _val(train_samples[:10])
    np.testing.assert_array_equal(x_train, np.flip(x_val, axis=axis))


def test_rotation_fills_uncovered_corners_white_and_keeps_the_size(tmp_path):
    f = tmp_path / "black.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(f)
    samples = [Sample(str(f), 0)] * 8
    x, _ = _train(samples, AugmentConfig(**{**NO_AUG.__dict__, "rotation_deg": 45.0}))
    assert x.shape == (8, 32, 32, 3)
    centre = x[:, 12:20, 12:20]
    assert centre.max() == 0  # the middle stays image content
    assert (x[:, 0, 0] == 255).any()  # some corner left uncovered by a rotated image is white fill


def test_colour_jitter_stays_within_the_brightness_range(tmp_path):
    f = tmp_path / "grey.png"
    Image.fromarray(np.full((32, 32, 3), 100, np.uint8)).save(f)
    samples = [Sample(str(f), 0)] * 16
    x, _ = _train(samples, AugmentConfig(**{**NO_AUG.__dict__, "brightness": 0.5}))
    means = x.reshape(16, -1).mean(axis=1)
    assert means.min() >= 50 - 1 and means.max() <= 150 + 1
    assert len(np.unique(means)) > 1


def test_grayscale_equalize_outputs_equal_channels(train_samples):
    x, _ = _train(train_samples[:8], AugmentConfig(**{**NO_AUG.__dict__, "grayscale_equalize": True}))
    np.testing.assert_array_equal(x[..., 0], x[..., 1])
    np.testing.assert_array_equal(x[..., 1], x[..., 2])
    # Equalisation stretches to the full range; the antialiased resize after it
    # averages the extremes by a level or two (tissue alone spans far less).
    assert x.min() <= 2 and x.max() >= 253


def test_validation_centre_crop_is_the_serving_view_box(train_samples):
    from serving.core.views import view_boxes

    full = np.stack(_val_views(train_samples[:5], _spec((32, 32), (37, 37))))
    crop, _ = _val(train_samples[:5], source_hw=(37, 37))
    (top, left, _), = view_boxes("none", (37, 37), (32, 32))
    assert full.shape == (5, 37, 37, 3)
    np.testing.assert_array_equal(crop, full[:, top:top + 32, left:left + 32])


@pytest.mark.parametrize("num_shards", [2, 3])
def test_validation_shards_cover_every_sample_exactly_once_with_a_partial_last_batch(tmp_path, num_shards):
    files = []
    for i in range(13):
        f = tmp_path / f"{i:02d}.png"
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(f)
        files.append(Sample(str(f), i))
    seen = []
    for shard in range(num_shards):
        x, y = _val(files, input_hw=(8, 8), shard_id=shard, num_shards=num_shards)
        assert x[:, 0, 0, 0].tolist() == y.tolist()  # pixel value encodes the sample
        seen += y.tolist()
    assert sorted(seen) == list(range(13))


def test_hdf5_rows_flow_through_external_source_sharded_once(synth_data):
    from serving.inputs.datasets import read_hdf5

    ds = read_hdf5(synth_data / "pcam" / "val_x.h5")
    seen = []
    for shard in range(2):
        x, y = _val(ds.samples, input_hw=(48, 48), shard_id=shard, num_shards=2)
        seen.append(x)
        assert y.tolist() == [s.label for s in ds.samples][shard * 8:(shard + 1) * 8]
    import h5py

    with h5py.File(synth_data / "pcam" / "val_x.h5") as f:
        np.testing.assert_array_equal(np.concatenate(seen), f["x"][:])


def test_evaluation_pixels_equal_the_clients_on_downscaled_images(tmp_path):
    """Evaluation (DALI) and scoring (PIL) resize alike, so metrics match what is served.

    Textured tissue at 150 px downscaled to 73 px (like the users' 450 -> 384):
    without antialiasing DALI differed from PIL by up to 50 grey levels here.
    """
    from serving.core.imageio import load_rgb_u8, resize_u8
    from serving.core.views import view_boxes
    from serving.synth.dataset import make_patch

    rng = np.random.default_rng(0)
    samples = []
    for i in range(4):
        path = tmp_path / f"tissue_{i}.png"
        Image.fromarray(make_patch(rng, i % 2, 150)).save(path)
        samples.append(Sample(str(path), 0))
    got, _ = _val(samples, input_hw=(64, 64), source_hw=(73, 73))
    (top, left, _), = view_boxes("none", (73, 73), (64, 64))
    want = np.stack([resize_u8(load_rgb_u8(s.source), (73, 73))[top:top + 64, left:left + 64] for s in samples])
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.5, (diff.max(), diff.mean())


FULL_AUG = AugmentConfig(rotation_deg=20.0, brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05, scale_min=0.5)
# Random windows and HED stain jitter: their draws come from the epoch's seed too, not from DALI's state.
CROP_STAIN_AUG = AugmentConfig(rotation_deg=20.0, random_crop=True, stain_augment=True)


@pytest.mark.parametrize("aug", [FULL_AUG, CROP_STAIN_AUG], ids=["resized-crop-colour", "random-crop-stain"])
def test_one_train_pipeline_reset_per_epoch_gives_each_epoch_exactly_as_a_fresh_pipeline(train_samples, aug):
    samples = train_samples[:20]
    orders = [samples, samples[::-1], samples[5:] + samples[:5]]
    loader = TrainLoader(samples, input_hw=(24, 24), augment=aug, batch_size=8, num_threads=1)
    epochs = []
    assert loader._kwargs["batch_size"] % 8 == 0 and loader._kwargs["batch_size"] >= 20  # one DALI batch
    for seed, order in zip((11, 12, 13), orders):
        got = [(x.numpy(), y.numpy()) for x, y in loader.epoch(order, seed)]
        assert [len(g[1]) for g in got] == [8, 8, 4]  # handed out a training batch at a time
        x, y = np.concatenate([g[0] for g in got]), np.concatenate([g[1] for g in got])
        fresh_x, fresh_y = _train(order, aug, seed=seed, input_hw=(24, 24))
        np.testing.assert_array_equal(x, fresh_x)  # epoch k depends only on (order, seed): resume holds
        assert y.tolist() == fresh_y.tolist() == [s.label for s in order]
        epochs.append(x)
    assert loader.builds == 1
    assert not np.array_equal(epochs[0], epochs[1][::-1])  # new seed, new augmentation


@pytest.mark.parametrize("least, expected", [(12, 16), (128, 128), (5, 8)])
def test_train_loader_runs_several_training_batches_at_once_and_hands_them_out_unchanged(
        train_samples, monkeypatch, least, expected):
    """DALI's batch is a whole number of training batches of at least DALI_MIN_BATCH images; more than one of
    them an epoch (least 12: 16 + 4 images) or one (least 128), the epoch is the fresh batch-8 pipeline's."""
    import training.pipeline as tp

    monkeypatch.setattr(tp, "DALI_MIN_BATCH", least)
    samples = train_samples[:20]
    loader = TrainLoader(samples, input_hw=(24, 24), augment=FULL_AUG, batch_size=8, num_threads=1)
    assert loader._kwargs["batch_size"] == expected == tp.dali_batch(8)
    got = [(x.numpy(), y.numpy()) for x, y in loader.epoch(samples, 7)]
    assert [len(y) for _, y in got] == [8, 8, 4]
    fresh_x, fresh_y = _train(samples, FULL_AUG, seed=7, input_hw=(24, 24))
    np.testing.assert_array_equal(np.concatenate([x for x, _ in got]), fresh_x)
    assert np.concatenate([y for _, y in got]).tolist() == fresh_y.tolist()


def test_eval_loader_passes_are_identical_and_built_once(train_samples):
    loader = EvalLoader(train_samples[:20], spec=_spec(), batch_size=8, num_threads=1)
    passes = [np.concatenate([x.numpy() for x, _ in loader]) for _ in range(3)]
    assert [p.shape[0] for p in passes] == [20, 20, 20]
    np.testing.assert_array_equal(passes[0], passes[2])
    assert loader.builds == 1


def test_nearest_interpolation_only_keeps_source_colours(tmp_path):
    # Nearest-neighbour crop and rotation copy pixels: a two-colour image stays two colours (plus white fill).
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, 16:] = (200, 40, 40)
    f = tmp_path / "two.png"
    Image.fromarray(img).save(f)
    samples = [Sample(str(f), 0)] * 8
    aug = dict(rotation_deg=30.0, scale_min=0.5, hflip_prob=0.0, vflip_prob=0.0)
    x, _ = _train(samples, AugmentConfig(**aug, interpolation="nearest"))
    assert {tuple(c) for c in x.reshape(-1, 3)} <= {(0, 0, 0), (200, 40, 40), (255, 255, 255)}
    x, _ = _train(samples, AugmentConfig(**aug, interpolation="linear"))
    assert len({tuple(c) for c in x.reshape(-1, 3)}) > 3


def test_unknown_interpolation_is_refused_naming_the_flag():
    from training.errors import TrainingError

    with pytest.raises(TrainingError, match=r"--interpolation 'cubic'.*linear, nearest"):
        AugmentConfig(interpolation="cubic")


def test_hdf5_loaders_reset_per_pass_give_every_row_each_time(synth_data):
    import h5py

    from serving.inputs.datasets import read_hdf5

    ds = read_hdf5(synth_data / "pcam" / "val_x.h5")
    with h5py.File(synth_data / "pcam" / "val_x.h5") as f:
        rows = f["x"][:]
    evals = EvalLoader(ds.samples, spec=_spec((48, 48)), batch_size=6, num_threads=1)
    for _ in range(2):
        np.testing.assert_array_equal(np.concatenate([x.numpy() for x, _ in evals]), rows)
    train = TrainLoader(ds.samples, input_hw=(48, 48), augment=NO_AUG, batch_size=6, num_threads=1)
    order = ds.samples[::-1]
    for seed in (1, 2):
        got = [(x.numpy(), y.numpy()) for x, y in train.epoch(order, seed)]
        np.testing.assert_array_equal(np.concatenate([g[0] for g in got]), rows[::-1])
        assert np.concatenate([g[1] for g in got]).tolist() == [s.label for s in order]
    assert evals.builds == train.builds == 1


def test_the_training_loops_seeds_give_each_epoch_and_rank_its_own_augmentation(train_samples):
    """The seeds train() hands the pipeline (training.train.dali_seed): the same samples in the same order at
    epochs 0 and 1 must be augmented differently, and a rank differently from another; the same (seed, epoch,
    rank) again gives the same pixels (resume)."""
    from training.train import dali_seed

    samples = train_samples[:16]
    aug = AugmentConfig(rotation_deg=20.0, hflip_prob=0.5, vflip_prob=0.5, scale_min=0.6)
    loader = TrainLoader(samples, input_hw=(24, 24), augment=aug, batch_size=8, num_threads=1)

    def epoch(seed: int, e: int, rank: int) -> np.ndarray:
        return np.concatenate([x.numpy() for x, _ in loader.epoch(samples, dali_seed(seed, e, rank))])

    first, second, again = epoch(3, 0, 0), epoch(3, 1, 0), epoch(3, 0, 0)
    other_rank = epoch(3, 0, 1)
    np.testing.assert_array_equal(first, again)
    changed = [not np.array_equal(a, b) for a, b in zip(first, second)]
    assert sum(changed) >= len(samples) // 2, changed  # most images drew other parameters
    assert not np.array_equal(first, other_rank)
    assert len({dali_seed(3, e, r) for e in range(50) for r in range(8)}) == 400
