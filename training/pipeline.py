"""DALI pipelines for training, validation and evaluation.

Every layout becomes either a list of files (``fn.readers.file``) or rows of a
PCam HDF5 file (``fn.external_source``); both feed the same decode-free tail.
Pipelines output ``uint8`` NHWC: the model's Normalize layer is the only
normalisation. Without a GPU the pipelines are CPU-only (``device_id=None``).
Training pipelines are rebuilt every epoch with a seed derived from
(base seed, epoch, rank), so an epoch depends only on those and resume at an
epoch boundary reproduces it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from serving.sources import Sample, parse_hdf5_source, read_hdf5_rows
from serving.views import view_boxes
from training.errors import DataError, TrainingError
from training.stain import DEFAULT_STAIN_SCALE, DEFAULT_STAIN_SHIFT, check_stain_options, hed_jitter

READER = "Reader"
DALI_DEVICES = ("auto", "cpu", "gpu")


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentations (torchvision-style names and ranges)."""

    hflip_prob: float = 0.5
    vflip_prob: float = 0.5
    rotation_deg: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    scale_min: float = 0.08
    grayscale_equalize: bool = False
    random_crop: bool = False  # a window of the model's size, no resize (larger images, e.g. 150 -> 128 px)
    stain_augment: bool = False
    stain_scale: float = DEFAULT_STAIN_SCALE
    stain_shift: float = DEFAULT_STAIN_SHIFT

    def __post_init__(self) -> None:
        check_stain_options(self.stain_scale, self.stain_shift)
        for flag, v in (("--hflip-prob", self.hflip_prob), ("--vflip-prob", self.vflip_prob)):
            if not 0.0 <= v <= 1.0:
                raise TrainingError(f"{flag}: expected a probability in [0, 1], got {v}")
        if not 0.0 <= self.rotation_deg <= 180.0:
            raise TrainingError(f"--rotation-deg: expected degrees in [0, 180], got {self.rotation_deg}")
        for flag, v in (("--brightness", self.brightness), ("--contrast", self.contrast),
                        ("--saturation", self.saturation)):
            if not 0.0 <= v < 1.0:
                raise TrainingError(f"{flag}: expected a jitter strength in [0, 1), got {v}")
        if not 0.0 <= self.hue <= 0.5:
            raise TrainingError(f"--hue: expected a hue jitter in [0, 0.5] (fraction of the colour circle), got {self.hue}")
        if not 0.0 < self.scale_min <= 1.0:
            raise TrainingError(f"--scale-min: expected an area fraction in (0, 1], got {self.scale_min}")


def default_dali_threads(cuda_available: bool, cpu_count: int) -> int:
    """DALI threads when --workers is not given.

    On the CPU, DALI's threads share the cores with the model's own compute:
    with as many DALI threads as cores they contend, and on 2 cores DALI-fed
    training ran at about 0.65 of the model-only ceiling against about 0.97
    with one thread (benchmarks/bench_train.py). On a GPU the cores are DALI's.
    """
    return max(1, min(cpu_count, 8)) if cuda_available else max(1, cpu_count // 2)


def resolve_dali_device(dali_device: str, cuda_available: bool) -> str:
    """``auto`` -> ``gpu`` when CUDA is there, else ``cpu``; ``gpu`` without CUDA is an error."""
    if dali_device not in DALI_DEVICES:
        raise TrainingError(f"Invalid --dali-device {dali_device!r}. Only {', '.join(DALI_DEVICES)} are supported.")
    if dali_device == "auto":
        return "gpu" if cuda_available else "cpu"
    if dali_device == "gpu" and not cuda_available:
        raise TrainingError("--dali-device gpu: no CUDA device is available; use --dali-device cpu or auto")
    return dali_device


def shard_range(n: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """The [start, end) of a shard, with the same integer arithmetic as DALI's readers."""
    return n * shard_id // num_shards, n * (shard_id + 1) // num_shards


class HDF5Batches:
    """``fn.external_source`` callable: batches of PCam rows of one shard, then StopIteration."""

    def __init__(self, samples: list[Sample], batch_size: int, shard_id: int = 0, num_shards: int = 1):
        start, end = shard_range(len(samples), shard_id, num_shards)
        self.samples = samples[start:end]
        self.batch_size = batch_size
        self.pos = 0

    def __iter__(self) -> Iterator:
        return self

    def __next__(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        if self.pos >= len(self.samples):
            raise StopIteration
        chunk = self.samples[self.pos:self.pos + self.batch_size]
        self.pos += len(chunk)
        # Rows usually come from one file; group by file so each is opened once.
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
        labels = [np.array([-1 if s.label is None else s.label], dtype=np.int32) for s in chunk]
        return images, labels  # type: ignore[return-value]


def _is_hdf5(samples: list[Sample]) -> bool:
    return bool(samples) and parse_hdf5_source(samples[0].source) is not None


def _source(samples, *, batch_size, shard_id, num_shards, pad_last_batch, device):
    """Decoded uint8 HWC RGB images and int32 labels from files or HDF5 rows."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    if _is_hdf5(samples):
        images, labels = fn.external_source(
            source=HDF5Batches(samples, batch_size, shard_id, num_shards), num_outputs=2,
            batch=True, layout=["HWC", ""], dtype=[types.UINT8, types.INT32])
        return (images.gpu() if device == "gpu" else images), labels
    files = [s.source for s in samples]
    labels_in = [-1 if s.label is None else int(s.label) for s in samples]
    encoded, labels = fn.readers.file(
        files=files, labels=labels_in, shard_id=shard_id, num_shards=num_shards,
        random_shuffle=False, pad_last_batch=pad_last_batch, name=READER)
    images = fn.decoders.image(encoded, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)
    return images, labels


def resize_like_serving(images, hw: tuple[int, int]):
    """Resize to ``hw`` the way serving does.

    Linear with antialiasing, the closest DALI gets to PIL's bilinear resize
    that the client uses; training's plain resize, evaluation and export's
    DALI preprocessing all call this, so their pixels agree with served ones
    on downscaled images too.
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    sh, sw = hw
    return fn.resize(images, resize_x=sw, resize_y=sh, interp_type=types.INTERP_LINEAR, antialias=True)


def _grey_equalize(images):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    grey = fn.color_space_conversion(images, image_type=types.RGB, output_type=types.GRAY)
    grey = fn.equalize(grey)
    return fn.color_space_conversion(grey, image_type=types.GRAY, output_type=types.RGB)


def build_train_pipeline(samples: list[Sample], *, input_hw: tuple[int, int], augment: AugmentConfig,
                         batch_size: int, num_threads: int, seed: int, device: str = "cpu",
                         device_id: int | None = None, shard_id: int = 0, num_shards: int = 1):
    """Augmenting pipeline over ``samples`` in the given order (the caller shuffles per epoch)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    h, w = input_hw
    a = augment

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, seed=seed,
                  device_id=device_id if device == "gpu" else None, prefetch_queue_depth=2)
    def pipe():
        images, labels = _source(samples, batch_size=batch_size, shard_id=shard_id, num_shards=num_shards,
                                 pad_last_batch=False, device=device)
        if a.grayscale_equalize:
            images = _grey_equalize(images)
        if a.random_crop:
            # Smaller images are padded white (the background of slides), never stretched.
            images = fn.crop(images, crop=[h, w], crop_pos_x=fn.random.uniform(range=[0.0, 1.0]),
                             crop_pos_y=fn.random.uniform(range=[0.0, 1.0]), out_of_bounds_policy="pad",
                             fill_values=255)
        elif a.scale_min < 1.0:
            images = fn.random_resized_crop(images, size=[h, w], random_area=[a.scale_min, 1.0],
                                            random_aspect_ratio=[3.0 / 4.0, 4.0 / 3.0], antialias=False)
        else:
            images = resize_like_serving(images, (h, w))
        # Ops with a zero range are left out, so "no augmentation" is exactly the resize.
        if a.hflip_prob > 0 or a.vflip_prob > 0:
            images = fn.flip(images, horizontal=fn.random.coin_flip(probability=a.hflip_prob),
                             vertical=fn.random.coin_flip(probability=a.vflip_prob))
        if a.rotation_deg > 0:
            images = fn.rotate(images, angle=fn.random.uniform(range=[-a.rotation_deg, a.rotation_deg]),
                               keep_size=True, fill_value=255.0, interp_type=types.INTERP_LINEAR)
        if a.brightness or a.contrast or a.saturation or a.hue:
            def around(centre: float, half: float):
                # DALI refuses an empty range: a zero strength is the constant.
                return fn.random.uniform(range=[centre - half, centre + half]) if half > 0 else centre

            images = fn.color_twist(images, brightness=around(1.0, a.brightness), contrast=around(1.0, a.contrast),
                                    saturation=around(1.0, a.saturation), hue=around(0.0, a.hue * 360.0),
                                    dtype=types.UINT8)
        if a.stain_augment:
            images = hed_jitter(images, scale=a.stain_scale, shift=a.stain_shift)
        return images, labels

    return pipe()


def build_eval_pipeline(samples: list[Sample], *, source_hw: tuple[int, int], crop_hw: tuple[int, int] | None,
                        batch_size: int, num_threads: int, device: str = "cpu", device_id: int | None = None,
                        shard_id: int = 0, num_shards: int = 1, grayscale_equalize: bool = False):
    """Resize to ``source_hw``, then (if ``crop_hw``) the centre crop of serving.views ``none``.

    Without ``crop_hw`` the whole resized image comes out, for TTA views taken
    afterwards with serving.views. Each sample of the shard comes out once.
    """
    import nvidia.dali.fn as fn
    from nvidia.dali import pipeline_def


    @pipeline_def(batch_size=batch_size, num_threads=num_threads, seed=0,
                  device_id=device_id if device == "gpu" else None, prefetch_queue_depth=2)
    def pipe():
        images, labels = _source(samples, batch_size=batch_size, shard_id=shard_id, num_shards=num_shards,
                                 pad_last_batch=True, device=device)
        if grayscale_equalize:
            images = _grey_equalize(images)
        images = resize_like_serving(images, source_hw)
        if crop_hw is not None:
            (top, left, _), = view_boxes("none", source_hw, crop_hw)
            images = fn.slice(images, start=[top, left], shape=list(crop_hw), axis_names="HW")
        return images, labels

    return pipe()


def iterate(pipe, samples: list[Sample]):
    """A DALIGenericIterator yielding (images_nhwc_u8, labels) torch tensors; partial last batch."""
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    kwargs = {} if _is_hdf5(samples) else {"reader_name": READER}
    it = DALIGenericIterator([pipe], ["images", "labels"], last_batch_policy=LastBatchPolicy.PARTIAL,
                             auto_reset=False, **kwargs)
    for batch in it:
        yield batch[0]["images"], batch[0]["labels"].reshape(-1).long()
