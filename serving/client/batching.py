"""Turning patches into requests, and keeping a bounded number in flight.

Pure numpy and the standard library: the client plans each group of patches
into requests no larger than the server's batch, and :func:`windowed` keeps at
most ``max_in_flight`` of them outstanding while yielding results in order.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np

from serving.core.errors import BadInputError
from serving.core.spec import ModelSpec
from serving.core.views import make_views, num_views

T = TypeVar("T")
H = TypeVar("H")
R = TypeVar("R")


def check_images(images: np.ndarray | Sequence[np.ndarray], spec: ModelSpec) -> list[np.ndarray] | np.ndarray:
    """Refuse prepared images that are not uint8 H x W x 3 at the input or source size.

    ``images`` is an N x H x W x 3 array, or a list of H x W x 3 arrays (a
    group whose prepared images have different sizes).
    """
    a = images
    if isinstance(a, np.ndarray):
        if a.dtype != np.uint8:
            raise BadInputError(f"images: expected dtype uint8 (the model takes uint8 NHWC), got {a.dtype}")
        if a.ndim != 4 or a.shape[-1] != 3:
            raise BadInputError(f"images: expected shape (N, H, W, 3), got {a.shape}")
        shapes = {a.shape[1:3]}
    elif isinstance(a, (list, tuple)) and all(isinstance(im, np.ndarray) for im in a):
        for im in a:
            if im.dtype != np.uint8 or im.ndim != 3 or im.shape[-1] != 3:
                raise BadInputError(f"images: expected uint8 arrays of shape (H, W, 3), got {im.dtype} {im.shape}")
        shapes = {im.shape[:2] for im in a}
    else:
        raise BadInputError(f"images: expected a numpy array, got {type(a).__name__}")
    for hw in shapes:
        if hw not in (spec.input_hw, spec.source_hw):
            raise BadInputError(f"images: expected patches of {spec.input_hw[0]}x{spec.input_hw[1]} (input size) "
                                f"or {spec.source_hw[0]}x{spec.source_hw[1]} (source size), got {hw[0]}x{hw[1]}")
    return a


def all_at(images: np.ndarray | Sequence[np.ndarray], hw: tuple[int, int]) -> bool:
    """True when every image of the group is of size ``hw``."""
    if isinstance(images, np.ndarray):
        return images.shape[1:3] == hw
    return all(im.shape[:2] == hw for im in images)


def client_views(images: np.ndarray | Sequence[np.ndarray], spec: ModelSpec, tta: str) -> tuple[np.ndarray, int]:
    """The arrays to send for client-side TTA, patch-major, and the views per patch.

    Views are cut from each prepared image as it is (serving/core/preprocess.py):
    an input-size image is never resized, its "none" view is itself; a
    source-size image gives the crops of serving.core.views.
    """
    if isinstance(images, np.ndarray):
        if tta == "none" and images.shape[1:3] == spec.input_hw:
            return images, 1
        return make_views(images, tta, spec.input_hw), num_views(tta)
    return np.concatenate([make_views(im[None], tta, spec.input_hw) for im in images]), num_views(tta)


def split_rows(n: int, size: int) -> list[slice]:
    """Consecutive slices of at most ``size`` rows covering ``range(n)``."""
    if size < 1:
        raise ValueError(f"batch size must be positive, got {size}")
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def windowed(items: Iterable[T], submit: Callable[[T], H], collect: Callable[[H], R],
             max_in_flight: int) -> Iterator[tuple[T, R]]:
    """Submit items, keep at most ``max_in_flight`` outstanding, yield results in submission order."""
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be positive, got {max_in_flight}")
    pending: deque[tuple[T, H]] = deque()
    for item in items:
        if len(pending) >= max_in_flight:
            done, handle = pending.popleft()
            yield done, collect(handle)
        pending.append((item, submit(item)))
    while pending:
        done, handle = pending.popleft()
        yield done, collect(handle)


def encode_batch(blobs: Sequence[bytes], info) -> np.ndarray:
    """Encoded files as the ensemble's input: BYTES one per row, or zero-padded UINT8 rows."""
    if info.datatype == "BYTES":
        return np.array([bytes(b) for b in blobs], dtype=np.object_).reshape(len(blobs), *([1] * len(info.dims)))
    if info.datatype != "UINT8":
        raise BadInputError(f"model {info.name!r}: cannot send encoded bytes as {info.datatype}")
    # Decoders stop at the end-of-image marker, so trailing zeros are harmless.
    width = max(len(b) for b in blobs)
    out = np.zeros((len(blobs), width), np.uint8)
    for i, b in enumerate(blobs):
        out[i, :len(b)] = np.frombuffer(b, np.uint8)
    return out
