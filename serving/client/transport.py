"""One connection to one Triton server: connect with retries, model configs, requests out and answers in.

gRPC and HTTP through ``tritonclient``; tensors inline or through system
shared memory (one input and one output region per request slot). What the
answers mean is the caller's business (:mod:`serving.client.patch_client`).
"""

from __future__ import annotations

import time
from concurrent.futures import Future

import numpy as np

from serving.client.config import ClientConfig
from serving.client.model_info import ModelInfo, grpc_channel_args
from serving.client.retry import RetryPolicy
from serving.client.shm import create_private_region, remove_stale_regions
from serving.core.errors import InferenceError, RequestTimeoutError, ServerUnavailableError


class Transport:
    """A live connection to the server at ``url`` over ``config.protocol``; ServerUnavailableError if none."""

    def __init__(self, url: str, config: ClientConfig, policy: RetryPolicy, version: str = ""):
        self.url, self.config, self.policy, self.version = url, config, policy, version
        if config.protocol == "grpc":
            import tritonclient.grpc as lib
        else:
            import tritonclient.http as lib
        self._lib = lib
        self._client = self._connect()
        self._slots: list[dict] = []

    @property
    def grpc(self) -> bool:
        return self.config.protocol == "grpc"

    def _connect(self):
        cfg = self.config
        last: BaseException | None = None
        attempt, first_failure = 0, time.monotonic()
        while True:
            try:
                if self.grpc:
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

    # -- what the server says ---------------------------------------------------
    def is_model_ready(self, name: str) -> bool:
        return bool(self._client.is_model_ready(name, self.version))

    def model_config(self, name: str) -> dict:
        if self.grpc:
            return self._client.get_model_config(name, self.version, as_json=True)
        return self._client.get_model_config(name, self.version)

    def repository_index(self) -> list[dict]:
        if self.grpc:
            return self._client.get_model_repository_index(as_json=True).get("models", [])
        return self._client.get_model_repository_index()

    # -- shared memory ------------------------------------------------------------
    def setup_shared_memory(self, in_bytes: int, out_bytes: int) -> None:
        """One private input and output region per request slot (``concurrency`` of them), registered."""
        remove_stale_regions()  # what SIGKILLed clients of this host left behind
        for i in range(self.config.concurrency):
            slot: dict = {}
            self._slots.append(slot)  # appended first, so close() frees what was made if a later step fails
            for kind, size in (("in", in_bytes), ("out", out_bytes)):
                name, handle = create_private_region(kind, i, size)
                slot[kind] = (name, handle, size)
                self._client.register_system_shared_memory(name, "/" + name, size)

    @property
    def slots(self) -> int:
        return len(self._slots)

    # -- requests -----------------------------------------------------------------
    def send(self, info: ModelInfo, array: np.ndarray, slot: int | None, outputs: list[tuple[str, int]]):
        """Start one request for ``outputs`` (name, values per row; the first through shared memory when
        ``slot`` is given: only the single-output requests of a client with ``--shared-memory``); the returned
        handle goes to :meth:`receive`."""
        lib = self._lib
        dtype = "BYTES" if array.dtype == np.object_ else "UINT8"
        inp = lib.InferInput(info.input_name, list(array.shape), dtype)
        outs = [lib.InferRequestedOutput(name) if self.grpc else lib.InferRequestedOutput(name, binary_data=True)
                for name, _ in outputs]
        if slot is not None and dtype == "UINT8":
            import tritonclient.utils.shared_memory as shm

            s = self._slots[slot]
            shm.set_shared_memory_region(s["in"][1], [np.ascontiguousarray(array)])
            inp.set_shared_memory(s["in"][0], array.nbytes)
            outs[0].set_shared_memory(s["out"][0], len(array) * outputs[0][1] * 4)
        elif self.grpc:
            inp.set_data_from_numpy(array)
        else:
            inp.set_data_from_numpy(array, binary_data=True)
        if not self.grpc:
            return self._client.async_infer(info.name, [inp], model_version=self.version, outputs=outs)
        fut: Future = Future()
        self._client.async_infer(info.name, [inp], callback=lambda result, error: fut.set_result((result, error)),
                                 model_version=self.version, outputs=outs, client_timeout=self.config.timeout_s)
        return fut

    def receive(self, info: ModelInfo, handle, rows: int, outputs: list[tuple[str, int]],
                slot: int | None) -> list[np.ndarray]:
        """The float32 answers (rows x values, one per output of :meth:`send`) for a handle of :meth:`send`;
        transport errors propagate."""
        if isinstance(handle, BaseException):
            raise handle
        from tritonclient.utils import InferenceServerException

        if self.grpc:
            result, error = handle.result(timeout=self.config.timeout_s + 5.0)
            if error is not None:
                raise error
        else:
            try:
                result = handle.get_result(block=True, timeout=self.config.timeout_s)
            except InferenceServerException as exc:
                if exc.status() is None:  # tritonclient's own deadline: no answer, nothing from the server
                    raise RequestTimeoutError(f"{self.url}: no answer from model {info.name!r} within "
                                              f"{self.config.timeout_s:g} s") from exc
                raise
        got = []
        for i, (name, width) in enumerate(outputs):
            shape = (rows, width)
            if i == 0 and slot is not None and info.datatype == "UINT8":
                import tritonclient.utils.shared_memory as shm

                out = shm.get_contents_as_numpy(self._slots[slot]["out"][1], np.float32, list(shape))
                got.append(np.array(out, copy=True))
                continue
            values = result.as_numpy(name)
            if values is None or values.shape != shape:
                raise InferenceError(f"{self.url}: model {info.name!r} returned {name} of "
                                     f"{None if values is None else values.shape}, expected {shape}")
            got.append(values.astype(np.float32, copy=False))
        return got

    def close(self) -> None:
        if self._slots:
            import tritonclient.utils.shared_memory as shm

            for slot in self._slots:
                for name, handle, _ in slot.values():
                    try:
                        self._client.unregister_system_shared_memory(name)
                    except Exception:  # noqa: BLE001 - the server may be gone already
                        pass
                    shm.destroy_shared_memory_region(handle)
            self._slots = []
        if self._client is not None:
            self._client.close()
            self._client = None
