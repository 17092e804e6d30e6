"""Per-channel mean and std of the training set, for the spec's Normalize layer."""

from __future__ import annotations

import numpy as np

from serving.imageio import load_rgb_u8
from serving.sources import Sample, parse_hdf5_source, read_hdf5_rows
from serving.progress import bar_disable

# The spec requires values in (0, 1]: a black or flat training set still gets a usable layer.
_MIN_VALUE = 1e-3


def _load(sample: Sample) -> np.ndarray:
    parsed = parse_hdf5_source(sample.source)
    if parsed is not None:
        return read_hdf5_rows(parsed[0], np.array([parsed[1]]))[0]
    return load_rgb_u8(sample.source)


def compute_mean_std(samples: list[Sample], *, max_images: int = 1000, seed: int = 0,
                     progress: bool = False) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Mean and std per channel over all pixels (in [0, 1]) of up to ``max_images`` samples."""
    from tqdm import tqdm

    if not samples:
        raise ValueError("compute_mean_std: no samples")
    rng = np.random.default_rng(seed)
    idx = np.arange(len(samples))
    if len(samples) > max_images:
        idx = np.sort(rng.choice(len(samples), size=max_images, replace=False))
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for i in tqdm(idx, desc="mean/std", unit="img", disable=bar_disable(progress), leave=False):
        px = _load(samples[int(i)]).reshape(-1, 3).astype(np.float64) / 255.0
        total += px.sum(axis=0)
        total_sq += (px * px).sum(axis=0)
        count += px.shape[0]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
    mean = np.clip(mean, _MIN_VALUE, 1.0)
    std = np.clip(std, _MIN_VALUE, 1.0)
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)  # type: ignore[return-value]
