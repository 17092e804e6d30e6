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

from serving.inputs.datasets import Sample, parse_hdf5_source
from serving.core.spec import ModelSpec
from serving.core.views import view_boxes
from training.epoch_source import EpochSource, hdf5_rows, shard_range
from training.errors import TrainingError
from training.stain import DEFAULT_STAIN_SCALE, DEFAULT_STAIN_SHIFT, apply_hed, check_stain_options

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
    random_crop: bool = False  # a window of the model's size, no resize (larger images, e.g. 150 -> 128 px)
    stain_augment: bool = False
    stain_scale: float = DEFAULT_STAIN_SCALE
    stain_shift: float = DEFAULT_STAIN_SHIFT

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise TrainingError(f"Invalid --interpolation {self.interpolation!r}. "
                                f"Only {', '.join(INTERPOLATIONS)} are supported.")
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


def resize_like_serving(images, hw):
    """Resize to ``hw`` the way serving does.

    Linear with antialiasing, the closest DALI gets to PIL's bilinear resize
    that the client uses. ``hw`` is a pair of ints or of per-sample DataNodes.
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    sh, sw = hw
    if not isinstance(sh, int):
        sh, sw = fn.cast(sh, dtype=types.FLOAT), fn.cast(sw, dtype=types.FLOAT)
    return fn.resize(images, resize_x=sw, resize_y=sh, interp_type=types.INTERP_LINEAR, antialias=True)


def eval_geometry(images, input_hw: tuple[int, int], source_hw: tuple[int, int], crop: bool,
                  geometry: str = "resize_crop"):
    """The spec's ``eval_geometry`` in DALI operators, as serving/core/preprocess.py defines it.

    An image of the input size is kept. ``resize_crop``: any other size is
    resized to the source size; ``crop``: the source-size window at its
    centre, no resampling, padded white (serving.core.preprocess.fit_centre); per
    sample, from the decoded shape. With ``crop`` the "none" view of
    serving.core.views follows (every output at the input size), without it the
    images come out at their geometry size.
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    ih, iw = input_hw
    sh, sw = source_hw
    shape = images.shape(dtype=types.INT32)
    keep = fn.cast((shape[0] == ih) & (shape[1] == iw), dtype=types.INT32)  # 1: already the input size
    if geometry == "crop":
        starts = []
        for size, window in ((shape[0], sh), (shape[1], sw)):
            d = size - window  # serving.core.preprocess.centre_start: towards zero when it pads
            starts.append((1 - keep) * (dmath.abs(d) // 2) * (2 * fn.cast(d >= 0, dtype=types.INT32) - 1))
        images = fn.slice(images, start=fn.stack(*starts),
                          shape=fn.stack(keep * ih + (1 - keep) * sh, keep * iw + (1 - keep) * sw),
                          axis_names="HW", out_of_bounds_policy="pad", fill_values=255)
    elif geometry == "resize_crop":
        images = resize_like_serving(images, (keep * ih + (1 - keep) * sh, keep * iw + (1 - keep) * sw))
    else:
        raise ValueError(f"unknown eval_geometry {geometry!r}")
    if not crop:
        return images
    (top, left, _), = view_boxes("none", source_hw, input_hw)
    start = fn.stack((1 - keep) * top, (1 - keep) * left)
    return fn.slice(images, start=start, shape=[ih, iw], axis_names="HW", out_of_bounds_policy="error")


def grey_equalize(images):
    """Grey-scale + histogram equalisation (serving.core.imageio.equalize_grey_u8 is the reference)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    grey = fn.color_space_conversion(images, image_type=types.RGB, output_type=types.GRAY)
    grey = fn.equalize(grey)
    return fn.color_space_conversion(grey, image_type=types.GRAY, output_type=types.RGB)


_grey_equalize = grey_equalize  # the name tests and older callers use


def build_train_pipeline(samples: list[Sample], *, input_hw: tuple[int, int], augment: AugmentConfig,
                         batch_size: int, num_threads: int, seed: int, device: str = "cpu",
                         device_id: int | None = None, shard_id: int = 0, num_shards: int = 1,
                         prefetch_queue_depth: int = PREFETCH_DEPTH, source_hw: tuple[int, int] | None = None):
    """Augmenting pipeline over ``samples`` in the given order (the caller shuffles per epoch).

    Its :class:`EpochSource` is ``pipe.epoch_source``: ``set_epoch`` it, then
    reset the pipeline, to run another epoch without rebuilding.

    Decoding and equalisation (at the decoded size, before any resize) follow
    the reference preprocessing. With ``--scale-min 1`` the geometry is the
    evaluation geometry for the spec's ``source_hw`` (training passes it), so
    "no augmentation" is exactly what evaluation and serving feed the model;
    without ``source_hw`` it is a plain resize to ``input_hw``.
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
            images = grey_equalize(images)
        if "crop_pos_x" in p:
            # The window's position drawn by the source; smaller images are padded white
            # (the background of slides), never stretched.
            images = fn.crop(images, crop=[h, w], crop_pos_x=p["crop_pos_x"], crop_pos_y=p["crop_pos_y"],
                             out_of_bounds_policy="pad", fill_values=255)
        elif "crop_start" in p:
            # The crop window drawn by the source; one resampling does crop and resize.
            images = fn.resize(images, size=[h, w], roi_start=p["crop_start"], roi_end=p["crop_end"],
                               roi_relative=True, interp_type=interp, antialias=False)
        else:
            images = eval_geometry(images, input_hw, source_hw or input_hw, crop=True)
        # Ops with a zero range are left out, so "no augmentation" is exactly the evaluation input.
        if "hflip" in p:
            images = fn.flip(images, horizontal=p["hflip"], vertical=p["vflip"])
        if "angle" in p:
            images = fn.rotate(images, angle=p["angle"], keep_size=True, fill_value=255.0, interp_type=interp)
        if "brightness" in p:
            images = fn.color_twist(images, brightness=p["brightness"], contrast=p["contrast"],
                                    saturation=p["saturation"], hue=p["hue"], dtype=types.UINT8)
        if "stain_alpha" in p:
            # Drawn by the source too: a fn.random op would carry its state across epochs.
            images = apply_hed(images, p["stain_alpha"], p["stain_beta"])
        return images, labels

    built = pipe()
    built.epoch_source = source
    return built


def build_eval_pipeline(samples: list[Sample], *, spec: ModelSpec, views: bool = False, batch_size: int,
                        num_threads: int, device: str = "cpu", device_id: int | None = None,
                        shard_id: int = 0, num_shards: int = 1, prefetch_queue_depth: int = PREFETCH_DEPTH):
    """The reference preprocessing in DALI: decode, equalise (grey models), geometry.

    Without ``views`` the "none" view comes out (input size). With ``views``
    the geometry's output comes out padded to the source size, with its true
    shape as a third output; :func:`unpad` cuts each image back so TTA views
    are taken with serving.core.views. Each sample of the shard comes out once.
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, seed=0,
                  device_id=device_id if device == "gpu" else None, prefetch_queue_depth=prefetch_queue_depth)
    def pipe():
        images, labels = _source(samples, batch_size=batch_size, shard_id=shard_id, num_shards=num_shards,
                                 pad_last_batch=True, device=device)
        if spec.grayscale_equalize:
            images = grey_equalize(images)
        images = eval_geometry(images, spec.input_hw, spec.source_hw, crop=not views, geometry=spec.eval_geometry)
        if not views:
            return images, labels
        # Images of the input size and of the source size can share a batch: pad to one shape.
        shapes = images.shape(dtype=types.INT32)
        return fn.pad(images, axis_names="HW", shape=list(spec.source_hw)), labels, shapes

    return pipe()


def unpad(padded_nhwc, shapes) -> list[np.ndarray]:
    """The images of a ``views=True`` batch at their own sizes."""
    return [padded_nhwc[i, :int(s[0]), :int(s[1])] for i, s in enumerate(shapes)]


def _iterator(pipe, with_shapes: bool = False):
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    pipe.build()
    kwargs = {"reader_name": READER} if READER in pipe.reader_meta() else {}
    names = ["images", "labels"] + (["shapes"] if with_shapes else [])
    return DALIGenericIterator([pipe], names, last_batch_policy=LastBatchPolicy.PARTIAL,
                               auto_reset=False, **kwargs)


def _batches(it, with_shapes: bool = False):
    for batch in it:
        out = (batch[0]["images"], batch[0]["labels"].reshape(-1).long())
        yield out + (batch[0]["shapes"],) if with_shapes else out


def iterate(pipe, samples: list[Sample] | None = None, with_shapes: bool = False):
    """One epoch of a fresh pipeline: (images_nhwc_u8, labels[, shapes]) torch tensors; partial last batch."""
    yield from _batches(_iterator(pipe, with_shapes), with_shapes)


# DALI runs each operator over a whole batch on its threads and waits for the slowest thread before the next
# operator: the fewer images a batch, the more of each wait. The DALI arm of `bench data` (96-px PNG, 3 threads on
# 2 cores, depth 2) kept the cores 83% busy at 32 images a batch, 88% at 64, 92% at 128 and 93% at 256. The
# training pipeline runs batches of at least this many images, handed out a training batch at a time.
DALI_MIN_BATCH = 128


def dali_batch(batch_size: int) -> int:
    """The training pipeline's own batch: the smallest whole number of training batches of at least
    :data:`DALI_MIN_BATCH` images (so its partial last batch splits into the training batches' own)."""
    return batch_size * max(1, -(-DALI_MIN_BATCH // batch_size))


def _split(batches, size: int):
    """Each batch of ``batches`` as consecutive batches of ``size`` rows (views, no copy)."""
    for batch in batches:
        n = batch[0].shape[0]
        if n <= size:
            yield batch
            continue
        for lo in range(0, n, size):
            yield tuple(t[lo:lo + size] for t in batch)


class TrainLoader:
    """One training pipeline for a whole run: built at the first epoch, reset (not rebuilt) after.

    The pipeline runs :func:`dali_batch` images at a time and the loader hands them out ``batch_size`` at a
    time: the same images in the same order with the same augmentation as a pipeline of ``batch_size`` (the
    source draws every sample's parameters in turn, whatever the batch), with less of DALI's waiting between
    operators. ``builds`` counts pipeline builds (1 for a run, whatever its epochs).
    """

    def __init__(self, samples: list[Sample], **pipeline_kwargs):
        self.batch_size = int(pipeline_kwargs["batch_size"])
        self._samples = samples
        self._kwargs = {**pipeline_kwargs, "batch_size": dali_batch(self.batch_size)}
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
        return _split(_batches(self._it), self.batch_size)


class EvalLoader:
    """One evaluation pipeline over fixed samples, reset for each pass instead of rebuilt.

    With ``views=True`` each batch also carries the images' true shapes (see :func:`unpad`).
    """

    def __init__(self, samples: list[Sample], **pipeline_kwargs):
        self.samples, self._kwargs = samples, pipeline_kwargs
        self.with_shapes = bool(pipeline_kwargs.get("views", False))
        self._pipe = self._it = None
        self.builds = 0

    def __iter__(self):
        if self._pipe is None:
            self._pipe = build_eval_pipeline(self.samples, **self._kwargs)
            self.builds += 1
            self._it = _iterator(self._pipe, self.with_shapes)
        else:
            self._it.reset()
        return _batches(self._it, self.with_shapes)
