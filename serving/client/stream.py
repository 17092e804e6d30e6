"""Predictions for a stream of patch groups across one or more servers, requests in flight, in order."""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from serving.client.batching import windowed
from serving.client.config import check_spec
from serving.core.errors import InferenceError
from serving.core.views import combine_views


class Scored(NamedTuple):
    """What a client asked for features gets per group: probabilities (None for a features-only model) and
    features, float32, one row per patch."""

    probs: np.ndarray | None
    features: np.ndarray


def _join(parts: list, views: int, client) -> Any:
    """One group's answers joined and averaged over each patch's views (features too: their mean)."""
    spec = client.spec
    if not getattr(client, "features", False):
        probs = np.concatenate(parts) if parts else np.empty((0, spec.num_classes), np.float32)
        return combine_views(probs, views) if views > 1 else probs
    if not parts:
        return Scored(None if spec.features_only else np.empty((0, spec.num_classes), np.float32),
                      np.empty((0, spec.feature_size), np.float32))
    probs = None if parts[0].probs is None else np.concatenate([p.probs for p in parts])
    feats = np.concatenate([p.features for p in parts])
    if views > 1:
        probs = None if probs is None else combine_views(probs, views)
        feats = combine_views(feats, views)
    return Scored(probs, feats)


def stream_predictions(clients: Sequence[Any], groups: Iterable[tuple[Any, Any]],
                       tta: str = "none", send: str = "pixels",
                       on_error: str = "raise") -> Iterator[tuple[Any, Any]]:
    """Predict groups of patches across one or more servers, in order.

    Requests go round-robin to ``clients`` with at most ``concurrency`` in
    flight per client; each group's views are averaged once all its requests
    are back (a client that asks for features yields :class:`Scored` pairs, the
    features averaged over the views too). ``send="encoded"`` sends file bytes to the ensemble. With
    ``on_error="record"`` a group the server answered with an error yields its
    :class:`InferenceError` instead of probabilities, and the stream goes on.
    """
    if not clients:
        raise ValueError("stream_predictions needs at least one client")
    if on_error not in ("raise", "record"):
        raise ValueError(f"on_error: expected 'raise' or 'record', got {on_error!r}")
    first = clients[0]
    for c in clients[1:]:
        check_spec(c.spec, first.spec, where=f"{c.url} model {c.model!r}")
    turn = itertools.cycle(clients)

    def requests():
        for g, (key, images) in enumerate(groups):
            if len(images) == 0:
                yield (g, key, 0, 1, True), None
                continue
            planned = first.plan(images, tta, send)
            for i, (info, array, v) in enumerate(planned):
                yield (g, key, v, len(planned), i == len(planned) - 1), (info, array)

    def submit(item):
        req = item[1]
        if req is None:
            return None
        client = next(turn)
        info = client.model_info(req[0].name) if client is not first else req[0]
        return client.submit(info, req[1])

    def collect(handle):
        if handle is None:
            return None
        try:
            return handle.result()
        except InferenceError as exc:
            if on_error == "raise":
                raise
            return exc

    parts: list[np.ndarray] = []
    failed: InferenceError | None = None
    max_in_flight = sum(c.config.concurrency for c in clients)
    for (tag, _), handle_result in windowed(requests(), submit, collect, max_in_flight):
        g, key, v, _, last = tag
        if isinstance(handle_result, InferenceError):
            failed = failed or handle_result
        elif handle_result is not None:
            parts.append(handle_result)
        if last:
            if failed is not None:
                yield key, failed
            else:
                yield key, _join(parts, v, first)
            parts, failed = [], None
