"""Options of ``patchserve serve``: the embedded Triton server on a model repository."""

from __future__ import annotations

from dataclasses import dataclass

from serving.core.errors import InputError
from serving.core.options import flag_of, option


@dataclass(frozen=True)
class ServeConfig:
    """Where the embedded server listens and what it loads."""

    repo: str = option(help="Triton model repository (written by 'patchserve export')")
    host: str = option("127.0.0.1", "address to bind; 0.0.0.0 exposes the server to the network")
    http_port: int = option(8000, "HTTP port")
    grpc_port: int = option(8001, "gRPC port")
    metrics_port: int = option(8002, "Prometheus metrics port")
    model_config_name: str | None = option(None, "flavour: load configs/NAME.pbtxt of every model "
                                                 "(python, onnxruntime or tensorrt)",
                                           default_text="the plain config.pbtxt, the python flavour")
    workdir: str | None = option(None, "folder for the server's files, log and restricted-API key; a new serve there "
                                       "first removes what a killed one left", default_text="a temporary one")
    startup_timeout_s: float = option(120.0, "seconds to wait until the server is ready")
    log_verbose: int = option(0, "tritonserver --log-verbose level")

    def __post_init__(self) -> None:
        for name in ("http_port", "grpc_port", "metrics_port"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 < v < 65536:
                raise InputError(f"{flag_of(ServeConfig, name)}: expected a TCP port in 1..65535, got {v}")
        if not self.startup_timeout_s > 0:
            raise InputError(f"--startup-timeout-s: expected a positive number of seconds, got {self.startup_timeout_s}")
