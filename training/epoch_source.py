"""The training pipeline's input: one ``fn.external_source`` for the whole run.

A run builds its training pipeline once; each epoch hands this source that
epoch's sample order and seed, and the pipeline is reset, not rebuilt. Every
random choice of the augmentation (crop window, flips, angle, colour factors,
HED stain factors)
is drawn here from a generator seeded by the epoch's seed, in batch order, and
fed to DALI as per-sample arguments: an epoch depends only on (seed, epoch,
rank), so ``--resume`` at an epoch boundary reproduces an uninterrupted run
although DALI's own random state carries over between epochs.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from serving.inputs.datasets import Sample, parse_hdf5_source, read_hdf5_rows
from training.errors import DataError
from training.stain import hed_params

# torchvision RandomResizedCrop's aspect-ratio range and its number of tries.
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_TRIES = 10


def shard_range(n: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """The [start, end) of a shard, with the same integer arithmetic as DALI's readers."""
    return n * shard_id // num_shards, n * (shard_id + 1) // num_shards


def param_names(augment) -> tuple[str, ...]:
    """The per-sample arguments an augmentation config needs, in output order."""
    names: list[str] = []
    if augment.random_crop:
        names += ["crop_pos_y", "crop_pos_x"]
    elif augment.scale_min < 1.0:
        names += ["crop_start", "crop_end"]
    if augment.hflip_prob > 0 or augment.vflip_prob > 0:
        names += ["hflip", "vflip"]
    if augment.rotation_deg > 0:
        names.append("angle")
    if augment.brightness or augment.contrast or augment.saturation or augment.hue:
        names += ["brightness", "contrast", "saturation", "hue"]
    if augment.stain_augment:
        names += ["stain_alpha", "stain_beta"]
    return tuple(names)


def sample_params(rng: np.random.Generator, n: int, augment) -> dict[str, list[np.ndarray]]:
    """Per-sample augmentation arguments of ``n`` samples (torchvision's ranges and crop rule).

    The crop window is relative to the image: area fraction in [scale_min, 1],
    aspect ratio log-uniform in 3/4..4/3 (relative to the image's own, so
    exactly torchvision's rule on square patches), up to 10 tries, then the
    whole image.
    """
    a = augment
    names = param_names(a)
    out: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for _ in range(n):
        if "crop_pos_x" in out:
            # --random-crop: a window of the model's size at a uniform relative position.
            out["crop_pos_y"].append(np.array(rng.uniform(0.0, 1.0), np.float32))
            out["crop_pos_x"].append(np.array(rng.uniform(0.0, 1.0), np.float32))
        if "crop_start" in out:
            w = h = 1.0
            for _try in range(CROP_TRIES):
                area = rng.uniform(a.scale_min, 1.0)
                ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
                cw, ch = math.sqrt(area * ratio), math.sqrt(area / ratio)
                if cw <= 1.0 and ch <= 1.0:
                    w, h = cw, ch
                    break
            y0, x0 = rng.uniform(0.0, 1.0 - h), rng.uniform(0.0, 1.0 - w)
            out["crop_start"].append(np.array([y0, x0], np.float32))
            out["crop_end"].append(np.array([y0 + h, x0 + w], np.float32))
        if "hflip" in out:
            out["hflip"].append(np.array(int(rng.random() < a.hflip_prob), np.int32))
            out["vflip"].append(np.array(int(rng.random() < a.vflip_prob), np.int32))
        if "angle" in out:
            out["angle"].append(np.array(rng.uniform(-a.rotation_deg, a.rotation_deg), np.float32))
        if "brightness" in out:
            for key, centre, half in (("brightness", 1.0, a.brightness), ("contrast", 1.0, a.contrast),
                                      ("saturation", 1.0, a.saturation), ("hue", 0.0, a.hue * 360.0)):
                out[key].append(np.array(rng.uniform(centre - half, centre + half) if half > 0 else centre,
                                         np.float32))
        if "stain_alpha" in out:
            alpha, beta = hed_params(rng, a.stain_scale, a.stain_shift)
            out["stain_alpha"].append(alpha)
            out["stain_beta"].append(beta)
    return out


def hdf5_rows(chunk: list[Sample]) -> list[np.ndarray]:
    images: list[np.ndarray | None] = [None] * len(chunk)
    by_file: dict[str, list[tuple[int, int]]] = {}
    for i, s in enumerate(chunk):
        parsed = parse_hdf5_source(s.source)
        if parsed is None:
            raise DataError(f"{s.source}: expected an HDF5 row 'file.h5#index'")
        by_file.setdefault(parsed[0], []).append((i, parsed[1]))
    for f, items in by_file.items():
        # Oversampling repeats rows; h5py wants each index once.
        unique, inverse = np.unique(np.array([r for _, r in items]), return_inverse=True)
        rows = read_hdf5_rows(f, unique)
        for (i, _), j in zip(items, inverse):
            images[i] = np.ascontiguousarray(rows[j])
    return images  # type: ignore[return-value]


def _file_bytes(chunk: list[Sample]) -> list[np.ndarray]:
    out = []
    for s in chunk:
        try:
            out.append(np.fromfile(s.source, dtype=np.uint8))
        except OSError as exc:
            raise DataError(f"{s.source}: cannot read the training image ({exc})") from exc
    return out


class EpochSource:
    """``fn.external_source`` iterable: one epoch's batches of (images or encoded bytes, labels, params...).

    ``set_epoch`` before the pipeline runs an epoch; DALI calls ``iter()`` at
    each reset, and the generator reads the epoch's samples and seed lazily, at
    its first batch.
    """

    def __init__(self, samples: list[Sample], *, batch_size: int, augment, hdf5: bool, seed: int = 0,
                 shard_id: int = 0, num_shards: int = 1):
        self.batch_size, self.augment, self.hdf5 = batch_size, augment, hdf5
        self.shard_id, self.num_shards = shard_id, num_shards
        self.names = param_names(augment)
        self.set_epoch(samples, seed)

    @property
    def num_outputs(self) -> int:
        return 2 + len(self.names)

    def set_epoch(self, samples: list[Sample], seed: int) -> None:
        start, end = shard_range(len(samples), self.shard_id, self.num_shards)
        self.samples, self.seed = samples[start:end], seed

    def __iter__(self) -> Iterator[tuple]:
        samples, rng = self.samples, np.random.default_rng(self.seed)
        read = hdf5_rows if self.hdf5 else _file_bytes
        for lo in range(0, len(samples), self.batch_size):
            chunk = samples[lo:lo + self.batch_size]
            labels = [np.array([-1 if s.label is None else s.label], dtype=np.int32) for s in chunk]
            params = sample_params(rng, len(chunk), self.augment)
            yield (read(chunk), labels, *(params[k] for k in self.names))
