"""Client settings, validated on construction; the CLI maps flags onto them."""

from __future__ import annotations

from dataclasses import dataclass

from serving.core.errors import InputError, SpecMismatchError
from serving.core.spec import TTA_MODES, TTA_VIEWS_PARAMETER, ModelSpec

PROTOCOLS = ("grpc", "http")
CLIENT_TTA_MODES = TTA_MODES + ("server",)
# What travels: decoded uint8 pixels to the classifier (or the TTA model), or the files' encoded bytes to
# the ensemble, which decodes them in the server.
SEND_MODES = ("pixels", "encoded")
# Fields a caller may pin with ``expected_spec``; the rest are the server's business.
CHECKED_FIELDS = ("name", "class_names", "input_height", "input_width", "source_height", "source_width", "eval_geometry",
                  "input_dtype", "input_layout", "mean", "std")


def check_tta(mode: str, flag: str = "--tta") -> str:
    if mode not in CLIENT_TTA_MODES:
        raise InputError(f"{flag}: invalid TTA mode {mode!r}. Only {', '.join(CLIENT_TTA_MODES)} are supported.")
    return mode


def check_send(mode: str, tta: str = "none") -> str:
    if mode not in SEND_MODES:
        raise InputError(f"--send: invalid mode {mode!r}. Only {', '.join(SEND_MODES)} are supported.")
    if mode == "encoded" and tta != "none":
        raise InputError(f"--send encoded: the ensemble scores the centre crop only; use --tta none, not {tta}")
    return mode


def check_url(url: str, flag: str = "--url") -> str:
    """``HOST:PORT`` (a scheme is tolerated and dropped: tritonclient wants none)."""
    if not isinstance(url, str) or not url:
        raise InputError(f"{flag}: expected HOST:PORT, got {url!r}")
    for scheme in ("http://", "https://", "grpc://"):
        if url.startswith(scheme):
            url = url[len(scheme):]
    url = url.rstrip("/")
    host, sep, port = url.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"{flag}: expected HOST:PORT such as 127.0.0.1:8001, got {url!r}")
    return url


@dataclass(frozen=True)
class ClientConfig:
    """How a :class:`serving.client.PatchClient` talks to one server."""

    protocol: str = "grpc"
    timeout_s: float = 60.0
    retries: int = 3
    backoff_s: float = 0.5
    concurrency: int = 4
    batch_size: int | None = None
    shared_memory: bool = False

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise InputError(f"--protocol: invalid protocol {self.protocol!r}. Only grpc and http are supported.")
        if not self.timeout_s > 0:
            raise InputError(f"--timeout-s: expected a positive number of seconds, got {self.timeout_s}")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise InputError(f"--retries: expected a non-negative integer, got {self.retries!r}")
        if not self.backoff_s >= 0:
            raise InputError(f"--backoff-s: expected a non-negative number of seconds, got {self.backoff_s}")
        if isinstance(self.concurrency, bool) or not isinstance(self.concurrency, int) or self.concurrency < 1:
            raise InputError(f"--concurrency: expected a positive integer, got {self.concurrency!r}")
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int)
                                            or self.batch_size < 1):
            raise InputError(f"--batch-size: expected a positive integer, got {self.batch_size!r}")


def check_spec(actual: ModelSpec, expected: ModelSpec | dict, where: str = "server") -> None:
    """Raise SpecMismatchError naming every field where ``actual`` disagrees with ``expected``."""
    want = {f: getattr(expected, f) for f in CHECKED_FIELDS} if isinstance(expected, ModelSpec) else dict(expected)
    bad = []
    for key, value in want.items():
        if not hasattr(actual, key):
            raise SpecMismatchError(f"expected_spec: unknown field {key!r}; known fields are {list(CHECKED_FIELDS)}")
        have = getattr(actual, key)
        if isinstance(have, tuple):
            value = tuple(value)
        if have != value:
            bad.append(f"{key}: server has {have!r}, expected {value!r}")
    if bad:
        raise SpecMismatchError(f"{where}: the served model's spec disagrees: " + "; ".join(bad))


def info_tta_views(info) -> str:  # info: serving.client.ModelInfo
    """The views a server-side TTA model averages (its config's ``tta_views`` parameter)."""
    mode = info.parameters.get(TTA_VIEWS_PARAMETER, "")
    if mode not in ("five", "ten"):
        raise SpecMismatchError(f"--tta server: model {info.name!r} does not say which views it averages "
                                f"(parameter {TTA_VIEWS_PARAMETER!r} is {mode!r})")
    return mode
