"""Turning patches into requests, and keeping a bounded number in flight.

Pure numpy and the standard library: the client plans each group of patches
into requests no larger than the server's batch, and :func:`windowed` keeps at
most ``max_in_flight`` of them outstanding while yielding results in order.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np

from serving.errors import BadInputError
from serving.imageio import resize_u8
from serving.spec import ModelSpec
from serving.views import make_views, num_views

T = TypeVar("T")
H = TypeVar("H")
R = TypeVar("R")


def check_images(images_nhwc_u8: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Refuse arrays that are not N x H x W x 3 uint8 at the input or source size."""
    a = images_nhwc_u8
    if not isinstance(a, np.ndarray):
        raise BadInputError(f"images: expected a numpy array, got {type(a).__name__}")
    if a.dtype != np.uint8:
        raise BadInputError(f"images: expected dtype uint8 (the model takes uint8 NHWC), got {a.dtype}")
    if a.ndim != 4 or a.shape[-1] != 3:
        raise BadInputError(f"images: expected shape (N, H, W, 3), got {a.shape}")
    if a.shape[1:3] not in (spec.input_hw, spec.source_hw):
        raise BadInputError(f"images: expected patches of {spec.input_hw[0]}x{spec.input_hw[1]} (input size) "
                            f"or {spec.source_hw[0]}x{spec.source_hw[1]} (source size), got "
                            f"{a.shape[1]}x{a.shape[2]}")
    return a


def to_source_size(images_nhwc_u8: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Patches at the source size (resizing input-size patches up, as TTA needs the margin)."""
    if images_nhwc_u8.shape[1:3] == spec.source_hw:
        return images_nhwc_u8
    return np.stack([resize_u8(im, spec.source_hw) for im in images_nhwc_u8]) if len(images_nhwc_u8) else \
        np.empty((0, *spec.source_hw, 3), np.uint8)


def client_views(images_nhwc_u8: np.ndarray, spec: ModelSpec, tta: str) -> tuple[np.ndarray, int]:
    """The arrays to send for client-side TTA, patch-major, and the views per patch.

    ``none`` sends input-size patches as they are and centre-crops source-size
    ones (what evaluation does); the other modes crop views out of the
    source-size patch, so each patch is read once and its views built once.
    """
    if tta == "none" and images_nhwc_u8.shape[1:3] == spec.input_hw:
        return images_nhwc_u8, 1
    src = to_source_size(images_nhwc_u8, spec)
    return make_views(src, tta, spec.input_hw), num_views(tta)


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
