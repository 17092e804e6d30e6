"""DALI pipelines for training, validation and evaluation.

Every layout becomes either a list of files (``fn.readers.file``) or rows of a
PCam HDF5 file (``fn.external_source``); both feed the same decode-free tail.
Pipelines output ``uint8`` NHWC: the model's Normalize layer is the only
normalisation. Without a GPU the pipelines are CPU-only (``device_id=None``).
A run builds one training pipeline (:class:`TrainLoader`) and one evaluation
pipeline (:class:`EvalLoader`) and resets them each epoch; the training
augmentation's random choices come from the epoch's seed
(training/epoch_source.py), so an epoch depends only on (seed, epoch, rank)
and resume at an epoch boundary reproduces it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from serving.sources import Sample, parse_hdf5_source
from serving.views import view_boxes
from training.epoch_source import EpochSource, hdf5_rows, shard_range
from training.errors import TrainingError

READER = "Reader"
DALI_DEVICES = ("auto", "cpu", "gpu")
INTERPOLATIONS = ("linear", "nearest")
# Batches DALI prepares ahead. Depth 1 measured faster than 2 on the 2-core
# CPU machine (benchmarks/bench_data.py sweeps it): a deeper queue only adds
# work that competes with the consumer for the same cores.
PREFETCH_DEPTH = 1


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
    interpolation: str = "linear"  # of the crop's resize and the rotation

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise TrainingError(f"Invalid --interpolation {self.interpolation!r}. "
                                f"Only {', '.join(INTERPOLATIONS)} are supported.")
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


class HDF5Batches:
    """``fn.external_source`` iterable: batches of PCam rows of one shard; restarts at each reset."""

    def __init__(self, samples: list[Sample], batch_size: int, shard_id: int = 0, num_shards: int = 1):
        start, end = shard_range(len(samples), shard_id, num_shards)
        self.samples = samples[start:end]
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[tuple[list[np.ndarray], list[np.ndarray]]]:
        for lo in range(0, len(self.samples), self.batch_size):
            chunk = self.samples[lo:lo + self.batch_size]
            labels = [np.array([-1 if s.label is None else s.label], dtype=np.int32) for s in chunk]
            yield hdf5_rows(chunk), labels


def _is_hdf5(samples: list[Sample]) -> bool:
    return bool(samples) and parse_hdf5_source(samples[0].source) is not None


def _source(samples, *, batch_size, shard_id, num_shards, pad_last_batch, device):
    """Decoded uint8 HWC RGB images and int32 labels from files or HDF5 rows."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    if _is_hdf5(samples):
        images, labels = fn.external_source(
            source=HDF5Batches(samples, batch_size, shard_id, num_shards), num_outputs=2, cycle="raise",
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
                         device_id: int | None = None, shard_id: int = 0, num_shards: int = 1,
                         prefetch_queue_depth: int = PREFETCH_DEPTH):
    """Augmenting pipeline over ``samples`` in the given order (the caller shuffles per epoch).

    Its :class:`EpochSource` is ``pipe.epoch_source``: ``set_epoch`` it, then
    reset the pipeline, to run another epoch without rebuilding.
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    h, w = input_hw
    a = augment
    interp = types.INTERP_NN if a.interpolation == "nearest" else types.INTERP_LINEAR
    source = EpochSource(samples, batch_size=batch_size, augment=a, hdf5=_is_hdf5(samples), seed=seed,
                         shard_id=shard_id, num_shards=num_shards)

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, seed=seed,
                  device_id=device_id if device == "gpu" else None, prefetch_queue_depth=prefetch_queue_depth)
    def pipe():
        images, labels, *values = fn.external_source(source=source, num_outputs=source.num_outputs, batch=True,
                                                     cycle="raise")
        p = dict(zip(source.names, values))
        if source.hdf5:
            images = fn.reshape(images, layout="HWC")
            images = images.gpu() if device == "gpu" else images
        else:
            images = fn.decoders.image(images, device="mixed" if device == "gpu" else "cpu",
                                       output_type=types.RGB)
        if a.grayscale_equalize:
            images = _grey_equalize(images)
        if "crop_start" in p:
            # The crop window drawn by the source; one resampling does crop and resize.
            images = fn.resize(images, size=[h, w], roi_start=p["crop_start"], roi_end=p["crop_end"],
                               roi_relative=True, interp_type=interp, antialias=False)
        else:
            images = resize_like_serving(images, (h, w))
        # Ops with a zero range are left out, so "no augmentation" is exactly the resize.
        if "hflip" in p:
            images = fn.flip(images, horizontal=p["hflip"], vertical=p["vflip"])
        if "angle" in p:
            images = fn.rotate(images, angle=p["angle"], keep_size=True, fill_value=255.0, interp_type=interp)
        if "brightness" in p:
            images = fn.color_twist(images, brightness=p["brightness"], contrast=p["contrast"],
                                    saturation=p["saturation"], hue=p["hue"], dtype=types.UINT8)
        return images, labels

    built = pipe()
    built.epoch_source = source
    return built


def build_eval_pipeline(samples: list[Sample], *, source_hw: tuple[int, int], crop_hw: tuple[int, int] | None,
                        batch_size: int, num_threads: int, device: str = "cpu", device_id: int | None = None,
                        shard_id: int = 0, num_shards: int = 1, grayscale_equalize: bool = False,
                        prefetch_queue_depth: int = PREFETCH_DEPTH):
    """Resize to ``source_hw``, then (if ``crop_hw``) the centre crop of serving.views ``none``.

    Without ``crop_hw`` the whole resized image comes out, for TTA views taken
    afterwards with serving.views. Each sample of the shard comes out once.
    """
    import nvidia.dali.fn as fn
    from nvidia.dali import pipeline_def


    @pipeline_def(batch_size=batch_size, num_threads=num_threads, seed=0,
                  device_id=device_id if device == "gpu" else None, prefetch_queue_depth=prefetch_queue_depth)
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


def _iterator(pipe):
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    pipe.build()
    kwargs = {"reader_name": READER} if READER in pipe.reader_meta() else {}
    return DALIGenericIterator([pipe], ["images", "labels"], last_batch_policy=LastBatchPolicy.PARTIAL,
                               auto_reset=False, **kwargs)


def _batches(it):
    for batch in it:
        yield batch[0]["images"], batch[0]["labels"].reshape(-1).long()


def iterate(pipe, samples: list[Sample] | None = None):
    """One epoch of a fresh pipeline: (images_nhwc_u8, labels) torch tensors; partial last batch."""
    yield from _batches(_iterator(pipe))


class TrainLoader:
    """One training pipeline for a whole run: built at the first epoch, reset (not rebuilt) after.

    ``builds`` counts pipeline builds (1 for a run, whatever its epochs).
    """

    def __init__(self, samples: list[Sample], **pipeline_kwargs):
        self._samples, self._kwargs = samples, pipeline_kwargs
        self._pipe = self._it = None
        self.builds = 0

    def epoch(self, samples: list[Sample], seed: int):
        """The batches of one epoch over ``samples`` (this epoch's order), augmented from ``seed``."""
        if self._pipe is None:
            self._pipe = build_train_pipeline(samples, seed=seed, **self._kwargs)
            self.builds += 1
            self._it = _iterator(self._pipe)
        else:
            self._pipe.epoch_source.set_epoch(samples, seed)
            self._it.reset()
        return _batches(self._it)


class EvalLoader:
    """One evaluation pipeline over fixed samples, reset for each pass instead of rebuilt."""

    def __init__(self, samples: list[Sample], **pipeline_kwargs):
        self.samples, self._kwargs = samples, pipeline_kwargs
        self._pipe = self._it = None
        self.builds = 0

    def __iter__(self):
        if self._pipe is None:
            self._pipe = build_eval_pipeline(self.samples, **self._kwargs)
            self.builds += 1
            self._it = _iterator(self._pipe)
        else:
            self._it.reset()
        return _batches(self._it)
