"""Per-channel mean and std of the training set, for the spec's Normalize layer.

The statistics are those of what the model is fed: images go through the
reference decode and, for grey-scale models, the equalisation (at the decoded
size, as every path does before resizing). They are accumulated as per-channel
histograms of uint8 values, so no image is ever turned into floats: memory is
a few hundred counters plus one decoded image.
"""

from __future__ import annotations

import numpy as np

from serving.core.imageio import DEFAULT_MAX_IMAGE_PIXELS, equalize_grey_u8, load_rgb_u8
from serving.inputs.datasets import Sample, parse_hdf5_source, read_hdf5_rows
from serving.core.progress import bar_disable

# The spec requires values in (0, 1]: a black or flat training set still gets a usable layer.
_MIN_VALUE = 1e-3


def _load(sample: Sample, max_pixels: int) -> np.ndarray:
    parsed = parse_hdf5_source(sample.source)
    if parsed is not None:
        return read_hdf5_rows(parsed[0], np.array([parsed[1]]))[0]
    return load_rgb_u8(sample.source, max_pixels=max_pixels)


def common_hw(samples: list[Sample], *, max_images: int = 64, seed: int = 0,
              max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """The most common image size (height, width) among up to ``max_images`` samples."""
    from collections import Counter

    if not samples:
        raise ValueError("common_hw: no samples")
    idx = np.arange(len(samples))
    if len(samples) > max_images:
        idx = np.sort(np.random.default_rng(seed).choice(len(samples), size=max_images, replace=False))
    sizes = Counter(tuple(int(v) for v in _load(samples[int(i)], max_pixels).shape[:2]) for i in idx)
    return max(sizes.items(), key=lambda kv: (kv[1], kv[0]))[0]


def channel_histograms(image_hwc_u8: np.ndarray) -> np.ndarray:
    """3 x 256 counts of each channel's values."""
    flat = image_hwc_u8.reshape(-1, 3)
    return np.stack([np.bincount(flat[:, c], minlength=256) for c in range(3)]).astype(np.int64)


def mean_std_from_histograms(hist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std per channel (values in [0, 1]) of 3 x 256 counts."""
    levels = np.arange(256, dtype=np.float64) / 255.0
    count = hist.sum(axis=1).astype(np.float64)
    mean = (hist * levels).sum(axis=1) / count
    var = (hist * (levels[None, :] - mean[:, None]) ** 2).sum(axis=1) / count
    return mean, np.sqrt(var)


def compute_mean_std(samples: list[Sample], *, max_images: int = 1000, seed: int = 0, progress: bool = False,
                     grayscale_equalize: bool = False, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                     transform=None) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Mean and std per channel over all pixels (in [0, 1]) of up to ``max_images`` samples, as the model sees
    them: ``transform`` (uint8 HWC -> uint8 HWC) first, such as its stain normalisation."""
    from tqdm import tqdm

    if not samples:
        raise ValueError("compute_mean_std: no samples")
    rng = np.random.default_rng(seed)
    idx = np.arange(len(samples))
    if len(samples) > max_images:
        idx = np.sort(rng.choice(len(samples), size=max_images, replace=False))
    hist = np.zeros((3, 256), np.int64)
    for i in tqdm(idx, desc="mean/std", unit="img", disable=bar_disable(progress), leave=False):
        image = _load(samples[int(i)], max_pixels)
        if grayscale_equalize:
            image = equalize_grey_u8(image)
        if transform is not None:
            image = transform(image)
        hist += channel_histograms(image)
    mean, std = mean_std_from_histograms(hist)
    mean = np.clip(mean, _MIN_VALUE, 1.0)
    std = np.clip(std, _MIN_VALUE, 1.0)
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)  # type: ignore[return-value]


def sample_images(samples: list[Sample], *, count: int, seed: int,
                  max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> list[np.ndarray]:
    """Up to ``count`` decoded images drawn from ``samples`` with ``seed`` (the same ones for the same seed)."""
    rng = np.random.default_rng(seed)
    idx = np.arange(len(samples))
    if len(samples) > count:
        idx = np.sort(rng.choice(len(samples), size=count, replace=False))
    return [_load(samples[int(i)], max_pixels) for i in idx]
