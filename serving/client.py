"""The Triton client for patch classifiers: no torch, no DALI.

:class:`PatchClient` connects over gRPC or HTTP, reads the model's spec back
from the server (config parameter ``patchserve_spec``), refuses to score when
it disagrees with what the caller expects, and predicts class probabilities
with batching, several requests in flight, retries and test-time augmentation.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from serving.batching import all_at, check_images, client_views, encode_batch, split_rows, windowed
from serving.client_config import ClientConfig, check_spec, check_tta, check_url, info_tta_views
from serving.model_info import ModelInfo, grpc_channel_args, parse_config
from serving.preprocess import prepare_u8
from serving.errors import (InferenceError, ModelNotFoundError, ServerMismatchError, ServerUnavailableError,
                            SpecError, SpecMismatchError)
from serving.fingerprint import ServedIdentity, spec_sha256
from serving.retry import Pending, RetryPolicy, is_retryable
from serving.shm import create_private_region, remove_stale_regions
from serving.spec import SPEC_PARAMETER, WEIGHTS_PARAMETER, ModelSpec
from serving.views import combine_views

class PatchClient:
    """Score uint8 NHWC patches against one Triton server.

    ``expected_spec`` is a :class:`ModelSpec` or a dict of spec fields (e.g.
    ``{"class_names": (...), "input_height": 48}``); any disagreement with
    the server's spec raises :class:`SpecMismatchError`. ``wait_timeout_s``
    > 0 keeps retrying a lost server that long (it may be restarting).
    """

    def __init__(self, url: str, model: str, *, protocol: str = "grpc",
                 expected_spec: ModelSpec | dict | None = None, timeout_s: float = 60.0, retries: int = 3,
                 backoff_s: float = 0.5, concurrency: int = 4, batch_size: int | None = None,
                 shared_memory: bool = False, version: str = "", wait_timeout_s: float = 0.0):
        self.url = check_url(url)
        self.model = model
        self.version = version
        self.config = ClientConfig(protocol, timeout_s, retries, backoff_s, concurrency, batch_size, shared_memory)
        self.policy = RetryPolicy(retries, backoff_s, wait_timeout_s)
        self._lib = self._import_protocol()
        self._client = self._connect()
        self._infos: dict[str, ModelInfo] = {}
        self._shm: list[dict] = []
        self._seq = itertools.count()
        try:
            self.info = self.model_info(model)
            self.spec = self._read_spec(self.info)
            self._check_config(self.info)
            if expected_spec is not None:
                check_spec(self.spec, expected_spec, where=f"{self.url} model {model!r}")
            if shared_memory:
                self._setup_shared_memory()
        except BaseException:
            self.close()
            raise

    # -- connection ---------------------------------------------------------
    def _import_protocol(self):
        if self.config.protocol == "grpc":
            import tritonclient.grpc as lib
        else:
            import tritonclient.http as lib
        return lib

    def _connect(self):
        cfg = self.config
        last: BaseException | None = None
        attempt, first_failure = 0, time.monotonic()
        while True:
            try:
                if cfg.protocol == "grpc":
                    client = self._lib.InferenceServerClient(self.url, channel_args=grpc_channel_args(self._lib))
                    live = client.is_server_live(client_timeout=cfg.timeout_s)
                else:
                    client = self._lib.InferenceServerClient(
                        self.url, concurrency=cfg.concurrency, connection_timeout=cfg.timeout_s,
                        network_timeout=cfg.timeout_s)
                    live = client.is_server_live()
                if live:
                    return client
                client.close()
                last = RuntimeError("server is not live")
            except Exception as exc:  # noqa: BLE001 - tritonclient raises many types for a dead socket
                last = exc
            if not self.policy.again(attempt, first_failure):
                break
            time.sleep(self.policy.delay_s(attempt))
            attempt += 1
        raise ServerUnavailableError(
            f"--url {self.url}: no Triton server answered over {cfg.protocol} after {attempt + 1} attempts "
            f"({last}); is it running, and is this its {cfg.protocol} port?")

    def model_info(self, name: str, output_name: str | None = None) -> ModelInfo:
        """The server's config of model ``name`` (cached); ModelNotFoundError if it is not ready."""
        if name in self._infos:
            return self._infos[name]
        try:
            ready = self._client.is_model_ready(name, self.version)
        except Exception as exc:  # noqa: BLE001
            ready = False
            if is_retryable(exc):
                raise ServerUnavailableError(f"{self.url}: lost the server while asking for {name!r}: {exc}") from exc
        if not ready:
            served = self.served_models()
            listed = ("it does not list its models to clients ('patchserve serve' prints them when it starts)"
                      if served is None else f"it serves {served or 'no models'}")
            raise ModelNotFoundError(f"--model {name}: the server at {self.url} has no ready model of that name; "
                                     f"{listed}")
        try:
            raw = self._fetch_config(name)
        except Exception as exc:  # noqa: BLE001
            raise ModelNotFoundError(f"--model {name}: cannot read its config from {self.url}: {exc}") from exc
        spec_out = self.spec.output_name if hasattr(self, "spec") else None
        info = parse_config(name, raw, output_name or spec_out)
        self._infos[name] = info
        return info

    def _fetch_config(self, name: str) -> dict:
        if self.config.protocol == "grpc":
            return self._client.get_model_config(name, self.version, as_json=True)
        return self._client.get_model_config(name, self.version)

    def served_identity(self) -> ServedIdentity:
        """Name, version, weights' hash (from the config, written by export) and spec hash of the served model."""
        return ServedIdentity(self.model, int(self.spec.version), self.info.parameters.get(WEIGHTS_PARAMETER, ""),
                              spec_sha256(self.spec))

    def check_identity(self) -> None:
        """Re-read the configs of every model this client used: after a restart the server must serve the
        same spec and weights, or ServerMismatchError; transport errors propagate (the server is not back)."""
        for name, info in list(self._infos.items()):
            fresh = parse_config(name, self._fetch_config(name), info.output_name)
            for key in (WEIGHTS_PARAMETER, SPEC_PARAMETER):
                if fresh.parameters.get(key, "") != info.parameters.get(key, ""):
                    what = "weights" if key == WEIGHTS_PARAMETER else "spec"
                    raise ServerMismatchError(
                        f"--url {self.url}: the server came back serving model {name!r} with other {what} "
                        f"({key} {info.parameters.get(key, '')[:16]!r}... before, "
                        f"{fresh.parameters.get(key, '')[:16]!r}... now); no more work is sent to it")

    def served_models(self) -> list[str] | None:
        """Names of the models the server reports as ready; None when it does not list them to us
        (patchserve's embedded server restricts its repository API)."""
        try:
            if self.config.protocol == "grpc":
                index = self._client.get_model_repository_index(as_json=True).get("models", [])
            else:
                index = self._client.get_model_repository_index()
        except Exception:  # noqa: BLE001 - only used to make messages helpful
            return None
        return sorted(m["name"] for m in index if m.get("state", "READY") == "READY")

    def _read_spec(self, info: ModelInfo) -> ModelSpec:
        text = info.parameters.get(SPEC_PARAMETER)
        if not text:
            raise SpecMismatchError(f"--model {info.name}: the server's config has no {SPEC_PARAMETER!r} parameter; "
                                    "was the repository written by 'patchserve export'?")
        try:
            return ModelSpec.from_json(text)
        except SpecError as exc:
            raise SpecMismatchError(f"--model {info.name}: the server's spec is invalid: {exc}") from exc

    def _check_config(self, info: ModelInfo) -> None:
        s = self.spec
        want = (*s.input_hw, 3)
        if info.datatype != "UINT8" or info.dims != want or info.input_name != s.input_name:
            raise SpecMismatchError(
                f"--model {info.name}: config input {info.input_name} {info.datatype} {list(info.dims)} disagrees "
                f"with its spec ({s.input_name} UINT8 {list(want)})")

    # -- batching -----------------------------------------------------------
    def request_rows(self, info: ModelInfo | None = None) -> int:
        """Rows per request: the server's max_batch_size, or --batch-size if smaller."""
        info = info or self.info
        limit = info.max_batch_size or 1
        return min(limit, self.config.batch_size) if self.config.batch_size else limit

    def tta_info(self) -> ModelInfo:
        """The server-side TTA model (patches at the source size in, averaged probabilities out)."""
        return self.model_info(self.spec.tta_model_name, self.spec.output_name)

    def ensemble_info(self) -> ModelInfo:
        """The ensemble taking encoded image bytes."""
        return self.model_info(self.spec.ensemble_model_name, self.spec.output_name)

    # -- transport ----------------------------------------------------------
    def _setup_shared_memory(self) -> None:
        import tritonclient.utils.shared_memory as shm

        s = self.spec
        in_bytes = self.request_rows() * max(s.source_height * s.source_width, s.input_height * s.input_width) * 3
        out_bytes = self.request_rows() * s.num_classes * 4
        self._slots = []
        remove_stale_regions()  # what SIGKILLed clients of this host left behind
        for i in range(self.config.concurrency):
            slot: dict = {}
            self._slots.append(slot)
            self._shm = self._slots  # so close() frees whatever was made if a later step fails
            for kind, size in (("in", in_bytes), ("out", out_bytes)):
                name, handle = create_private_region(kind, i, size)
                slot[kind] = (name, handle, size)
                self._client.register_system_shared_memory(name, "/" + name, size)

    def _send(self, info: ModelInfo, array: np.ndarray, slot: int | None):
        lib = self._lib
        dtype = "BYTES" if array.dtype == np.object_ else "UINT8"
        inp = lib.InferInput(info.input_name, list(array.shape), dtype)
        if self.config.protocol == "http":
            out = lib.InferRequestedOutput(info.output_name, binary_data=True)
        else:
            out = lib.InferRequestedOutput(info.output_name)
        if slot is not None and dtype == "UINT8":
            import tritonclient.utils.shared_memory as shm

            s = self._slots[slot]
            shm.set_shared_memory_region(s["in"][1], [np.ascontiguousarray(array)])
            inp.set_shared_memory(s["in"][0], array.nbytes)
            out.set_shared_memory(s["out"][0], len(array) * self.spec.num_classes * 4)
        elif self.config.protocol == "http":
            inp.set_data_from_numpy(array, binary_data=True)
        else:
            inp.set_data_from_numpy(array)
        if self.config.protocol == "http":
            return self._client.async_infer(info.name, [inp], model_version=self.version, outputs=[out])
        from concurrent.futures import Future

        fut: Future = Future()
        self._client.async_infer(info.name, [inp], callback=lambda result, error: fut.set_result((result, error)),
                                 model_version=self.version, outputs=[out], client_timeout=self.config.timeout_s)
        return fut

    def _receive(self, info: ModelInfo, handle, rows: int, slot: int | None) -> np.ndarray:
        if isinstance(handle, BaseException):
            raise handle
        if self.config.protocol == "http":
            result = handle.get_result(block=True, timeout=self.config.timeout_s)
        else:
            result, error = handle.result(timeout=self.config.timeout_s + 5.0)
            if error is not None:
                raise error
        if slot is not None and info.datatype == "UINT8":
            import tritonclient.utils.shared_memory as shm

            out = shm.get_contents_as_numpy(self._slots[slot]["out"][1], np.float32, [rows, self.spec.num_classes])
            return np.array(out, copy=True)
        probs = result.as_numpy(info.output_name)
        if probs is None or probs.shape != (rows, self.spec.num_classes):
            raise InferenceError(f"{self.url}: model {info.name!r} returned {None if probs is None else probs.shape}, "
                                 f"expected ({rows}, {self.spec.num_classes})")
        return probs.astype(np.float32, copy=False)

    def submit(self, info: ModelInfo, array: np.ndarray) -> Pending:
        """Send one request now; ``.result()`` on the returned object waits for it."""
        slot = next(self._seq) % self.config.concurrency if self._shm else None
        return Pending(self, info, array, slot)

    # -- prediction -----------------------------------------------------------
    def plan(self, images: np.ndarray | Sequence, tta: str) -> list[tuple[ModelInfo, np.ndarray, int]]:
        """The requests for one group of prepared patches (serving/preprocess.py): (model, array, views) each."""
        if tta == "encoded":
            info = self.ensemble_info()
            return [(info, encode_batch(images[sl], info), 1) for sl in split_rows(len(images), self.request_rows(info))]
        check_tta(tta)
        images = check_images(images, self.spec)
        if tta == "server":
            if all_at(images, self.spec.source_hw):
                info = self.tta_info()
                src = np.stack(images) if not isinstance(images, np.ndarray) else images
                return [(info, src[sl], 1) for sl in split_rows(len(src), self.request_rows(info))]
            # Input-size patches are never resized up: their views (every one the whole patch)
            # are cut here and sent to the classifier, which is what the TTA model would compute.
            tta = info_tta_views(self.tta_info())
        if tta not in self.spec.tta_views:
            raise SpecMismatchError(f"--tta {tta}: the model supports only {', '.join(self.spec.tta_views)}")
        views, v = client_views(images, self.spec, tta)
        rows = self.request_rows()
        # Whole patches per request when they fit, so a patch's views travel together.
        per = max(1, rows // v) * v if v <= rows else rows
        return [(self.info, views[sl], v) for sl in split_rows(len(views), per)]

    def predict(self, images: np.ndarray | Sequence, tta: str = "none") -> np.ndarray:
        """Class probabilities (N x classes, float32) in input order.

        ``images``: decoded uint8 RGB images (an N x H x W x 3 array or a list
        of H x W x 3 arrays of any size), which go through the reference
        preprocessing (equalisation for grey-scale models, the geometry)
        here; or encoded file bytes with ``tta="encoded"``.
        """
        n = len(images)
        if n == 0:
            return np.empty((0, self.spec.num_classes), np.float32)
        if tta != "encoded":
            prepared = [prepare_u8(np.asarray(im), self.spec) for im in images]
            images = np.stack(prepared) if len({p.shape for p in prepared}) == 1 else prepared
        return next(stream_predictions([self], [(None, images)], tta))[1]

    def stream(self, groups: Iterable[tuple[Any, np.ndarray]], tta: str = "none") -> Iterator[tuple[Any, np.ndarray]]:
        """Predict groups of prepared patches lazily (serving/readers.py prepares them), requests in flight."""
        return stream_predictions([self], groups, tta)

    def close(self) -> None:
        if self._shm:
            import tritonclient.utils.shared_memory as shm

            for slot in self._shm:
                for name, handle, _ in slot.values():
                    try:
                        self._client.unregister_system_shared_memory(name)
                    except Exception:  # noqa: BLE001 - the server may be gone already
                        pass
                    shm.destroy_shared_memory_region(handle)
            self._shm = []
        client = getattr(self, "_client", None)
        if client is not None:
            client.close()
            self._client = None

    def __enter__(self) -> "PatchClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stream_predictions(clients: Sequence[PatchClient], groups: Iterable[tuple[Any, Any]],
                       tta: str = "none", on_error: str = "raise") -> Iterator[tuple[Any, Any]]:
    """Predict groups of patches across one or more servers, in order.

    Requests go round-robin to ``clients`` with at most ``concurrency`` in
    flight per client; each group's views are averaged once all its requests
    are back. ``tta="encoded"`` sends file bytes to the ensemble. With
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
            planned = first.plan(images, tta)
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
                probs = np.concatenate(parts) if parts else np.empty((0, first.spec.num_classes), np.float32)
                yield key, (combine_views(probs, v) if v > 1 else probs)
            parts, failed = [], None
