"""Options of ``patchserve serve``: the embedded Triton server on a model repository."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
    workers: int | None = option(None, "threads each ONNX model instance runs its batches on (slices of a batch, one "
                                       "ONNX Runtime thread each); sets PATCHSERVE_SERVER_WORKERS for the server",
                                 default_text="the cores the server may use (CPU affinity, cgroup quota) / instances")

    def __post_init__(self) -> None:
        for name in ("http_port", "grpc_port", "metrics_port"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 < v < 65536:
                raise InputError(f"{flag_of(ServeConfig, name)}: expected a TCP port in 1..65535, got {v}")
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 1):
            raise InputError(f"--workers: expected an integer >= 1, got {self.workers!r}")
        if not self.startup_timeout_s > 0:
            raise InputError(f"--startup-timeout-s: expected a positive number of seconds, got {self.startup_timeout_s}")
        check_repository_folder(Path(self.repo))


def _is_model_folder(folder: Path) -> bool:
    """A Triton model folder: its config.pbtxt, or a numeric version folder."""
    return folder.is_dir() and ((folder / "config.pbtxt").is_file()
                                or any(v.is_dir() and v.name.isdigit() for v in folder.iterdir()))


def check_repository_folder(repo: Path) -> None:
    """InputError naming --repo unless ``repo`` is a folder holding at least one model folder: Triton
    would start on anything else, serve nothing and say nothing."""
    try:
        if not repo.is_dir():
            raise InputError(f"--repo {repo}: no such model repository folder")
        if any(_is_model_folder(p) for p in repo.iterdir()):
            return
    except OSError as exc:
        raise InputError(f"--repo {repo}: cannot read it ({exc.strerror})") from exc
    run = (repo / "spec.json").is_file() or any(repo.glob("*.pt"))
    hint = ("; it looks like a run folder: export it first (patchserve export RUN --repo REPO) and serve REPO"
            if run else "")
    raise InputError(f"--repo {repo}: holds no model folder (NAME/config.pbtxt or NAME/VERSION/), so the server "
                     f"would serve nothing{hint}")
