"""Retries for requests in flight: which errors are worth another try, and for how long.

A transport error (the server is gone, restarting, or the network dropped) is
retried with exponential backoff, ``retries`` times; with a wait window
(``--wait``) it is retried until the window closes, so a job rides out a
server restart. An error the server answered on purpose (bad input, model
failure) is never retried: it is raised as :class:`InferenceError` so the
caller can record it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from serving.core.errors import InferenceError, InputError, ServerMismatchError, ServerUnavailableError

# Statuses of a server that is gone, restarting, overloaded or too slow: worth another try. Anything
# else the server answered (bad input, a model that failed) is the request's own error.
RETRYABLE_GRPC = ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.RESOURCE_EXHAUSTED",
                  "StatusCode.ABORTED")
RETRYABLE_HTTP = ("429", "502", "503", "504")
# Backoff doubles per attempt but is capped, so a restarted server is noticed soon.
MAX_BACKOFF_S = 2.0


def _status(exc: BaseException) -> str | None:
    status = getattr(exc, "status", None)
    try:
        return status() if callable(status) else None
    except Exception:  # noqa: BLE001 - an exception type with another status() signature
        return None


def is_retryable(exc: BaseException) -> bool:
    """True for errors of the transport (decided by type and gRPC/HTTP status code), not of the request."""
    if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
        return True  # refused, reset, broken pipe, socket timeouts, our own deadline (RequestTimeoutError)
    status = _status(exc)
    return status is not None and status in RETRYABLE_GRPC + RETRYABLE_HTTP


@dataclass(frozen=True)
class RetryPolicy:
    """``retries`` tries with backoff, then keep trying until ``wait_timeout_s`` after the first failure."""

    retries: int = 3
    backoff_s: float = 0.5
    wait_timeout_s: float = 0.0  # 0: do not wait for a server to come back

    def __post_init__(self) -> None:
        if not self.wait_timeout_s >= 0:
            raise InputError(f"--wait-timeout-s: expected a non-negative number of seconds, got {self.wait_timeout_s}")

    def delay_s(self, attempt: int) -> float:
        return min(self.backoff_s * (2 ** min(attempt, 16)), max(self.backoff_s, MAX_BACKOFF_S))

    def again(self, attempt: int, first_failure: float) -> bool:
        """Whether attempt number ``attempt`` (0-based) may be followed by another."""
        if attempt < self.retries:
            return True
        return self.wait_timeout_s > 0 and time.monotonic() - first_failure < self.wait_timeout_s


class Pending:
    """One request in flight; ``result()`` waits, resending on transport errors.

    ``client`` provides ``url``, ``policy``, ``_send(info, array, slot)`` and
    ``_receive(info, handle, rows, slot)``.
    """

    def __init__(self, client, info, array, slot: int | None):
        self.client, self.info, self.array, self.slot = client, info, array, slot
        self.handle = client._send(info, array, slot)

    def result(self):
        c = self.client
        policy: RetryPolicy = c.policy
        attempt, first_failure = 0, None
        while True:
            try:
                return c._receive(self.info, self.handle, len(self.array), self.slot)
            except Exception as exc:  # noqa: BLE001 - classified below
                if not is_retryable(exc):
                    raise InferenceError(f"{c.url}: model {self.info.name!r} failed: {exc}") from exc
                first_failure = first_failure or time.monotonic()
                if not policy.again(attempt, first_failure):
                    waited = time.monotonic() - first_failure
                    raise ServerUnavailableError(
                        f"{c.url}: no answer from model {self.info.name!r} after {attempt + 1} attempts "
                        f"over {waited:.0f} s: {exc}") from exc
                time.sleep(policy.delay_s(attempt))
                attempt += 1
                try:
                    # A server that comes back must serve what the job started with before it gets more work.
                    check = getattr(c, "check_identity", None)
                    if check is not None:
                        check()
                    self.handle = c._send(self.info, self.array, self.slot)
                except ServerMismatchError:
                    raise
                except Exception as send_exc:  # noqa: BLE001 - not back yet: the next _receive raises, we retry
                    self.handle = send_exc if is_retryable(send_exc) else ConnectionError(f"not back yet: {send_exc}")
