"""The Triton client for patch classifiers: no torch, no DALI.

:class:`PatchClient` ties the pieces of this package together for one server:
a :class:`~serving.client.transport.Transport` (connection, requests, shared
memory), the served model's identity and spec read back from its config
(:mod:`serving.client.identity`), request planning with test-time
augmentation (:mod:`serving.client.requests`), retries of requests in flight
(:mod:`serving.client.retry`), and predictions streamed in order over one or
more clients (:mod:`serving.client.stream`).
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from serving.client.config import ClientConfig, check_spec, check_url
from serving.client.identity import (ServedIdentity, check_features, check_input, identity_change, read_spec,
                                     served_identity)
from serving.client.model_info import ModelInfo, parse_config
from serving.client.requests import Request, plan_requests
from serving.client.retry import Pending, RetryPolicy, is_retryable
from serving.client.stream import Scored, stream_predictions
from serving.client.transport import Transport
from serving.core.errors import FlagError, ModelNotFoundError, ServerUnavailableError
from serving.core.preprocess import prepare_u8
from serving.core.spec import ModelSpec


class PatchClient:
    """Score uint8 NHWC patches against one Triton server.

    ``expected_spec`` is a :class:`ModelSpec` or a dict of spec fields (e.g.
    ``{"class_names": (...), "input_height": 48}``); any disagreement with
    the server's spec raises :class:`SpecMismatchError`. ``wait_timeout_s``
    > 0 keeps retrying a lost server that long (it may be restarting). ``features`` asks every request for
    the model's features output too (a features-only model: for it alone); answers are then
    :class:`~serving.client.stream.Scored` pairs instead of arrays of probabilities.
    """

    def __init__(self, url: str, model: str, *, protocol: str = "grpc",
                 expected_spec: ModelSpec | dict | None = None, timeout_s: float = 60.0, retries: int = 3,
                 backoff_s: float = 0.5, concurrency: int = 4, batch_size: int | None = None,
                 shared_memory: bool = False, version: str = "", wait_timeout_s: float = 0.0,
                 features: bool = False):
        self.url = check_url(url)
        self.model = model
        self.features = features
        if features and shared_memory:
            raise FlagError("--shared-memory: not with --features (the features travel inline); drop one of them")
        self.config = ClientConfig(protocol, timeout_s, retries, backoff_s, concurrency, batch_size, shared_memory)
        self.policy = RetryPolicy(retries, backoff_s, wait_timeout_s)
        self._infos: dict[str, ModelInfo] = {}
        self._seq = itertools.count()
        self.transport = Transport(self.url, self.config, self.policy, version)
        try:
            self.info = self.model_info(model)
            self.spec = read_spec(self.info)
            check_input(self.info, self.spec, features)
            if features:
                check_features(self.info, self.spec)
            if expected_spec is not None:
                check_spec(self.spec, expected_spec, where=f"{self.url} model {model!r}")
            if shared_memory:
                s = self.spec
                rows = self.request_rows()
                pixels = max(s.source_height * s.source_width, s.input_height * s.input_width)
                self.transport.setup_shared_memory(rows * pixels * 3, rows * s.num_classes * 4)
        except BaseException:
            self.close()
            raise

    # -- what the server serves -------------------------------------------------
    def model_info(self, name: str, output_name: str | None = None) -> ModelInfo:
        """The server's config of model ``name`` (cached); ModelNotFoundError if it is not ready."""
        if name in self._infos:
            return self._infos[name]
        try:
            ready = self.transport.is_model_ready(name)
        except Exception as exc:  # noqa: BLE001 - classified by is_retryable
            if is_retryable(exc):
                raise ServerUnavailableError(f"{self.url}: lost the server while asking for {name!r}: {exc}") from exc
            ready = False
        if not ready:
            served = self.served_models()
            listed = ("it does not list its models to clients ('patchserve serve' prints them when it starts)"
                      if served is None else f"it serves {served or 'no models'}")
            raise ModelNotFoundError(f"--model {name}: the server at {self.url} has no ready model of that name; "
                                     f"{listed}")
        try:
            raw = self.transport.model_config(name)
        except Exception as exc:  # noqa: BLE001 - tritonclient raises one type for every failure here
            raise ModelNotFoundError(f"--model {name}: cannot read its config from {self.url}: {exc}") from exc
        spec_out = self.spec.output_name if hasattr(self, "spec") else None
        info = parse_config(name, raw, output_name or spec_out)
        self._infos[name] = info
        return info

    def served_identity(self) -> ServedIdentity:
        """Name, version, weights' hash (from the config, written by export) and spec hash of the served model."""
        return served_identity(self.model, self.spec, self.info)

    def check_identity(self) -> None:
        """Re-read the configs of every model this client used: after a restart the server must serve the
        same spec and weights, or ServerMismatchError; transport errors propagate (the server is not back)."""
        for name, info in list(self._infos.items()):
            change = identity_change(self.url, info, parse_config(name, self.transport.model_config(name),
                                                                  info.output_name))
            if change is not None:
                raise change

    def served_models(self) -> list[str] | None:
        """Names of the models the server reports as ready; None when it does not list them to us
        (patchserve's embedded server restricts its repository API)."""
        try:
            index = self.transport.repository_index()
        except Exception:  # noqa: BLE001 - only used to make messages helpful
            return None
        return sorted(m["name"] for m in index if m.get("state", "READY") == "READY")

    def tta_info(self) -> ModelInfo:
        """The server-side TTA model (patches at the source size in, averaged probabilities out)."""
        return self._checked(self.model_info(self.spec.tta_model_name, self.spec.output_name))

    def ensemble_info(self) -> ModelInfo:
        """The ensemble taking encoded image bytes."""
        return self._checked(self.model_info(self.spec.ensemble_model_name, self.spec.output_name))

    def _checked(self, info: ModelInfo) -> ModelInfo:
        if self.features:
            check_features(info, self.spec)
        return info

    def outputs(self, info: ModelInfo) -> list[tuple[str, int]]:
        """The outputs a request to ``info`` asks for, with their values per row: the probabilities, and
        with ``features`` the features (alone, for a features-only model)."""
        s = self.spec
        if not self.features:
            return [(info.output_name, s.num_classes)]
        return ([] if s.features_only else [(info.output_name, s.num_classes)]) + [(s.features_name, s.feature_size)]

    # -- requests -----------------------------------------------------------------
    def request_rows(self, info: ModelInfo | None = None) -> int:
        """Rows per request: the server's max_batch_size, or --batch-size if smaller."""
        info = info or self.info
        limit = info.max_batch_size or 1
        return min(limit, self.config.batch_size) if self.config.batch_size else limit

    def plan(self, images: np.ndarray | Sequence, tta: str = "none", send: str = "pixels") -> list[Request]:
        """The requests for one group of prepared patches (or encoded files): (model, array, views) each."""
        return plan_requests(images, self.spec, tta, send, classifier=self.info,
                             info_of=lambda name: self.model_info(name, self.spec.output_name),
                             rows_of=self.request_rows)

    def _send(self, info: ModelInfo, array: np.ndarray, slot: int | None):
        return self.transport.send(info, array, slot, self.outputs(info))

    def _receive(self, info: ModelInfo, handle, rows: int, slot: int | None):
        got = self.transport.receive(info, handle, rows, self.outputs(info), slot)
        if not self.features:
            return got[0]
        return Scored(None, got[0]) if self.spec.features_only else Scored(got[0], got[1])

    def submit(self, info: ModelInfo, array: np.ndarray) -> Pending:
        """Send one request now; ``.result()`` on the returned object waits for it (retrying the transport)."""
        slot = next(self._seq) % self.transport.slots if self.transport.slots else None
        return Pending(self, info, array, slot)

    # -- prediction -----------------------------------------------------------------
    def predict(self, images: np.ndarray | Sequence, tta: str = "none", send: str = "pixels") -> np.ndarray:
        """Class probabilities (N x classes, float32) in input order.

        ``images``: decoded uint8 RGB images (an N x H x W x 3 array or a list
        of H x W x 3 arrays of any size), which go through the reference
        preprocessing (equalisation for grey-scale models, the geometry)
        here; or encoded file bytes with ``send="encoded"``.
        """
        if len(images) == 0:
            return np.empty((0, self.spec.num_classes), np.float32)
        if send != "encoded":
            prepared = [prepare_u8(np.asarray(im), self.spec) for im in images]
            images = np.stack(prepared) if len({p.shape for p in prepared}) == 1 else prepared
        return next(stream_predictions([self], [(None, images)], tta, send))[1]

    def stream(self, groups: Iterable[tuple[Any, np.ndarray]], tta: str = "none",
               send: str = "pixels") -> Iterator[tuple[Any, np.ndarray]]:
        """Predict groups of prepared patches lazily (serving/inputs prepares them), requests in flight."""
        return stream_predictions([self], groups, tta, send)

    def close(self) -> None:
        transport = getattr(self, "transport", None)
        if transport is not None:
            transport.close()

    def __enter__(self) -> "PatchClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
