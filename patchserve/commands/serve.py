"""``patchserve serve``: the embedded Triton server on a model repository, until Ctrl-C."""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading

from serving.core.options import add_options, from_args
from serving.server.config import ServeConfig


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Serve a model repository with the embedded Triton server.")
    add_options(p, ServeConfig)
    return p


def main(args: argparse.Namespace) -> int:
    from serving.core.spec import GPU_FLAVOURS
    from serving.server.embedded import EmbeddedTriton

    cfg = from_args(ServeConfig, args)
    extra = (f"--model-config-name={cfg.model_config_name}",) if cfg.model_config_name else ()
    server = EmbeddedTriton(cfg.repo, host=cfg.host, http_port=cfg.http_port, grpc_port=cfg.grpc_port,
                            metrics_port=cfg.metrics_port, workdir=cfg.workdir,
                            startup_timeout_s=cfg.startup_timeout_s, log_verbose=cfg.log_verbose,
                            extra_args=extra, workers=cfg.workers)
    stop = threading.Event()
    # SIGTERM (docker stop, systemd) stops as cleanly as Ctrl-C.
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with _gpu_hint_on_load_failure(server, cfg.model_config_name), server:
            print(f"Triton is ready (log: {server.log_path})")
            print("  logging and trace APIs: closed to every client (restart with --log-verbose to log more)")
            print(f"  repository API: lists the models with the header in {server.workdir / 'api_key'}; other local "
                  "users can read that key on tritonserver's command line, and loading or unloading is refused "
                  "to everyone")
            print(f"  HTTP     {server.urls.http}")
            print(f"  gRPC     {server.urls.grpc}")
            print(f"  metrics  {server.urls.metrics}")
            print("models:")
            for name, version, state in _models(server):
                print(f"  {name} (version {version}): {state}")
            print("cores (change with --workers N):")
            for choice in server.worker_choices():
                print(f"  {choice}")
            print("The same repository on a GPU machine, from NGC's container:")
            gpu = cfg.model_config_name if cfg.model_config_name in GPU_FLAVOURS else None
            print(f"  {server.ngc_command(gpu)}")
            print("Press Ctrl-C to stop.", flush=True)
            while not stop.wait(0.5):
                server.protect_shared_memory()  # a stub the backend restarts makes a new region
                if not server.alive():
                    print(f"tritonserver exited unexpectedly:\n{server.log_tail()}", flush=True)
                    return 1
            print("stopping tritonserver", flush=True)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0


@contextlib.contextmanager
def _gpu_hint_on_load_failure(server, flavour: str | None):
    """Models of a GPU flavour failed to load here: add where that flavour can be served."""
    from serving.core.errors import ModelLoadError
    from serving.core.spec import GPU_FLAVOURS
    from serving.server.embedded import triton_backends

    try:
        yield
    except ModelLoadError as exc:
        if flavour not in GPU_FLAVOURS:
            raise
        raise ModelLoadError(f"{exc}\nthe embedded server has the {', '.join(triton_backends())} backend only: "
                             f"serve the {flavour} flavour from NGC's container:\n  {server.ngc_command(flavour)}",
                             exc.failures) from None


def _models(server) -> list[tuple[str, str, str]]:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.urls.http)
    try:
        index = client.get_model_repository_index(headers=server.admin_headers)
    finally:
        client.close()
    return [(m["name"], m.get("version", "-"), m.get("state", "?")) for m in index]
