"""``patchserve serve``: the embedded Triton server on a model repository, until Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import threading


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Serve a model repository with the embedded Triton server.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--repo", required=True, help="Triton model repository (written by 'patchserve export')")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the server to the network")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--model-config-name", default=None,
                   help="flavour: load configs/NAME.pbtxt of every model (default: the plain config.pbtxt, "
                        "the python flavour)")
    p.add_argument("--workdir", default=None, help="folder for the server's files and log (default: a temporary one)")
    p.add_argument("--startup-timeout-s", type=float, default=120.0)
    p.add_argument("--log-verbose", type=int, default=0)
    return p


def _ports(args) -> None:
    from serving.errors import InputError

    for flag in ("http_port", "grpc_port", "metrics_port"):
        v = getattr(args, flag)
        if not 0 < v < 65536:
            raise InputError(f"--{flag.replace('_', '-')}: expected a TCP port in 1..65535, got {v}")


def main(args: argparse.Namespace) -> int:
    from serving.server import EmbeddedTriton

    _ports(args)
    extra = (f"--model-config-name={args.model_config_name}",) if args.model_config_name else ()
    server = EmbeddedTriton(args.repo, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                            metrics_port=args.metrics_port, workdir=args.workdir,
                            startup_timeout_s=args.startup_timeout_s, log_verbose=args.log_verbose,
                            extra_args=extra)
    stop = threading.Event()
    # SIGTERM (docker stop, systemd) stops as cleanly as Ctrl-C.
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with server:
            print(f"Triton is ready (log: {server.log_path})")
            print(f"  logging, trace and repository APIs need the header in {server.workdir / 'api_key'}")
            print(f"  HTTP     {server.urls.http}")
            print(f"  gRPC     {server.urls.grpc}")
            print(f"  metrics  {server.urls.metrics}")
            print("models:")
            for name, version, state in _models(server):
                print(f"  {name} (version {version}): {state}")
            print("The same repository on a GPU machine, from NGC's container:")
            print(f"  {server.ngc_command()}")
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


def _models(server) -> list[tuple[str, str, str]]:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.urls.http)
    try:
        index = client.get_model_repository_index(headers=server.admin_headers)
    finally:
        client.close()
    return [(m["name"], m.get("version", "-"), m.get("state", "?")) for m in index]
