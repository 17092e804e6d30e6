"""The embedded Triton Inference Server: the real ``tritonserver`` of the
``nvidia-pytriton`` wheel, with its Python backend, serving a plain model
repository.

Like pytriton's own launcher, the distribution is copied into a work folder
and the Python backend stub for the running interpreter is put beside the
backend; site-packages is never written to. Safe by default: bound to
127.0.0.1, repository changes over the API disabled (``--model-control-mode
none``), no shell involved in starting it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from serving.core.errors import ModelLoadError, ServerError
from serving.server.guard import release, start_guard
from serving.server.backends.onnx_model import LOG_PREFIX, WORKERS_ENV
from serving.server.state import STATE_FILE, clean_stale, remove_stale_temp_workdirs, write_key_file
from serving.core.spec import GPU_FLAVOURS

NGC_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
# Triton's restricted APIs. Triton reads their keys from its command line only, and every local user
# can read a command line (/proc/PID/cmdline), so a key there is no secret. The logging and trace APIs
# (verbosity, log formats, trace rates: levers on a running server) are therefore restricted to a
# header that no HTTP/1.1 or HTTP/2 client can send, its name holding CR LF and capitals: closed to
# every client, patchserve included (start with --log-verbose instead). The repository API keeps a key:
# here it can only list the models, since --model-control-mode=none refuses loading and unloading to all.
API_KEY_HEADER = "patchserve-api-key"
KEYED_APIS = ("model-repository",)
CLOSED_APIS = ("logging", "trace")
CLOSED_HEADER = "Patchserve-Closed\r\nNo-Client-Can-Send-This"
KEY_FILE = "api_key"
TEMP_PREFIX = "patchserve-triton-"


def _pytriton_root() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("the embedded Triton server needs the 'nvidia-pytriton' package; install it with 'make install'")
    return Path(list(spec.submodule_search_locations)[0])


def triton_backends() -> tuple[str, ...]:
    """Backends the embedded distribution carries (the nvidia-pytriton wheel: python only)."""
    folder = _pytriton_root() / "tritonserver" / "backends"
    return tuple(sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name != "__pycache__"))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def prepare_distribution(workdir: Path) -> Path:
    """Copy tritonserver and its backends into ``workdir`` with this Python's stub."""
    root = _pytriton_root()
    dist = root / "tritonserver"
    target = workdir / "tritonserver"
    if not (target / "bin" / "tritonserver").exists():
        shutil.copytree(dist, target, ignore=shutil.ignore_patterns("python_backend_stubs", "__pycache__"),
                        dirs_exist_ok=True)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise ServerError(f"the nvidia-pytriton wheel has no Python backend stub for Python {version}")
    dst = target / "backends" / "python" / "triton_python_backend_stub"
    # On a restart after a kill, orphaned stubs may still be running it ("text file busy").
    if not dst.exists() or dst.stat().st_size != stub.stat().st_size:
        shutil.copy2(stub, dst)
        dst.chmod(0o755)
    return target


@dataclass(frozen=True)
class ServerURLs:
    host: str
    http_port: int
    grpc_port: int
    metrics_port: int

    @property
    def http(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"


class EmbeddedTriton:
    """Start ``tritonserver`` on a repository; use as a context manager.

    Ports of 0 are picked free. ``workdir`` (a temporary folder by default)
    holds the copied distribution and ``tritonserver.log``.
    """

    def __init__(self, repo: str | Path, *, host: str = "127.0.0.1", http_port: int = 0, grpc_port: int = 0,
                 metrics_port: int = 0, workdir: str | Path | None = None, startup_timeout_s: float = 120.0,
                 log_verbose: int = 0, exit_on_error: bool = False, extra_args: tuple[str, ...] = (),
                 workers: int | None = None):
        self.repo = Path(repo).resolve()
        if not self.repo.is_dir():
            raise ServerError(f"--repo: no such model repository folder {self.repo}")
        self.host = host
        bind = "127.0.0.1" if host in ("127.0.0.1", "localhost") else host
        self.urls = ServerURLs(
            "127.0.0.1" if host in ("0.0.0.0", "localhost") else host,
            http_port or free_port(bind), grpc_port or free_port(bind), metrics_port or free_port(bind))
        self._own_workdir = workdir is None
        if workdir is None:
            # Work folders of SIGKILLed servers (whose owner is gone) go before a new one is made.
            remove_stale_temp_workdirs(Path(tempfile.gettempdir()), TEMP_PREFIX)
        # Absolute: tritonserver starts in the work folder, and a relative path would name another.
        self.workdir = Path(workdir).absolute() if workdir else Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))
        self.api_key = ""
        self.startup_timeout_s = startup_timeout_s
        self.log_verbose = log_verbose
        self.exit_on_error = exit_on_error
        self.extra_args = tuple(extra_args)
        self.workers = workers  # None: each ONNX model chooses from the cores it sees (backends/onnx_model.py)
        self.process: subprocess.Popen | None = None
        self.recoveries: list[list[str]] = []  # models whose stub died, per restart
        self.log_path = self.workdir / "tritonserver.log"

    # -- life cycle ---------------------------------------------------------
    def command(self) -> list[str]:
        dist = self.workdir / "tritonserver"
        keyed = f"{','.join(KEYED_APIS)}:{API_KEY_HEADER}={self.api_key}"
        closed = f"{','.join(CLOSED_APIS)}:{CLOSED_HEADER}=closed"
        return [
            str(dist / "bin" / "tritonserver"),
            f"--model-repository={self.repo}",
            f"--backend-directory={dist / 'backends'}",
            f"--cache-directory={dist / 'caches'}",
            f"--http-address={self.host}", f"--http-port={self.urls.http_port}",
            f"--grpc-address={self.host}", f"--grpc-port={self.urls.grpc_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.urls.metrics_port}",
            "--allow-metrics=true", "--allow-gpu-metrics=false", "--allow-cpu-metrics=true",
            "--model-control-mode=none",
            "--strict-readiness=true",
            f"--exit-on-error={'true' if self.exit_on_error else 'false'}",
            f"--log-verbose={self.log_verbose}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--http-restricted-api={keyed}", f"--http-restricted-api={closed}",
            f"--grpc-restricted-protocol={keyed}", f"--grpc-restricted-protocol={closed}",
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        env = os.environ.copy()
        libs = _pytriton_root().parent / "nvidia_pytriton.libs"
        pylib = sysconfig.get_config_var("LIBDIR") or ""
        env["LD_LIBRARY_PATH"] = ":".join(p for p in (env.get("LD_LIBRARY_PATH", ""), str(libs), pylib) if p)
        # The Python backend stub embeds this interpreter's libpython: give it
        # this environment's packages (numpy, onnxruntime, DALI) and nothing else.
        paths = [p for p in sys.path if p and Path(p).is_dir()]
        env["PYTHONPATH"] = ":".join(dict.fromkeys(paths))
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        env.setdefault("OMP_NUM_THREADS", "1")
        if self.workers is not None:
            env[WORKERS_ENV] = str(self.workers)
        return env

    def worker_choices(self) -> list[str]:
        """What each ONNX model instance chose at load time (workers x threads, and why), from the log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return [line[line.index(LOG_PREFIX) + len(LOG_PREFIX):].strip().rstrip('"').strip()
                for line in text.splitlines() if LOG_PREFIX in line]

    @property
    def shm_prefix(self) -> str:
        return f"patchserve{os.getpid()}-{self.urls.grpc_port}"

    @property
    def admin_headers(self) -> dict[str, str]:
        """Headers that unlock the repository API (listing models) for patchserve's own calls."""
        return {API_KEY_HEADER: self.api_key}

    def start(self) -> "EmbeddedTriton":
        self.workdir.mkdir(parents=True, exist_ok=True)
        # What a SIGKILLed server of this work folder left: its process group, stubs, shared memory.
        clean_stale(self.workdir)
        prepare_distribution(self.workdir)
        self.api_key = secrets.token_urlsafe(24)
        write_key_file(self.workdir / KEY_FILE, self.api_key)
        self._log = open(self.log_path, "ab")
        # A new session: the server and its Python-backend stubs form one process group that stop()
        # ends as a whole, and Ctrl-C in a terminal reaches us first so we stop them in order. umask
        # 077: the server's shared-memory regions (patients' pixels) and files are owner-only.
        self.process = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                        env=self.environment(), cwd=self.workdir, start_new_session=True,
                                        umask=0o077)
        state = {"owner_pid": os.getpid(), "server_pid": self.process.pid, "pgid": self.process.pid,
                 "shm_prefix": self.shm_prefix, "workdir": str(self.workdir.resolve())}
        (self.workdir / STATE_FILE).write_text(json.dumps(state) + "\n")
        # Should this process die, however it dies, the guard ends the server and removes what it left.
        release(getattr(self, "_guard", None))  # a guard of a server killed without stop() (fault tests)
        self._guard = start_guard(self.workdir, remove_workdir=self._own_workdir, env=self.environment())
        self.wait_ready()
        from serving.server.watchdog import StubWatchdog

        # Triton keeps a model "ready" after its stub process died; restarting the server is the recovery
        # that needs no repository API (which stays closed): not ready while it restarts, then whole again.
        self.watchdog = StubWatchdog(self.process.pid, on_lost=self._recover).start()
        return self

    def wait_ready(self) -> None:
        import tritonclient.http as httpclient

        deadline = time.monotonic() + self.startup_timeout_s
        client = httpclient.InferenceServerClient(self.urls.http, connection_timeout=2.0, network_timeout=2.0)
        try:
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise ServerError(f"tritonserver exited with code {self.process.returncode} while starting:\n"
                                      f"{self.log_tail()}")
                try:
                    if client.is_server_ready():
                        self.protect_shared_memory()
                        return
                    failures = self._load_failures(client)
                except Exception:  # noqa: BLE001 - not listening yet
                    failures = None
                if failures:
                    self.stop()
                    raise ModelLoadError(self._load_failure_message(failures), tuple(failures))
                time.sleep(0.25)
        finally:
            client.close()
        self.stop()
        raise ServerError(f"tritonserver was not ready after {self.startup_timeout_s:.0f} s:\n{self.log_tail()}")

    def _load_failures(self, client):
        """Live but not ready: the models that failed to load (loading is over once the server is live)."""
        from serving.server.readiness import load_failures

        if not client.is_server_live():
            return None
        index = client.get_model_repository_index(headers=self.admin_headers)
        return load_failures(index, self.log_path.read_text(errors="replace"))

    def _load_failure_message(self, failures) -> str:
        lines = [f"tritonserver could not load {len(failures)} model(s) of {self.repo}"
                 + (f" ({' '.join(self.extra_args)})" if self.extra_args else "") + ":"]
        lines += [f"  {f.describe()}" for f in failures]
        lines.append(f"the server was stopped; its log: {self.log_path}")
        return "\n".join(lines)

    def protect_shared_memory(self) -> list[Path]:
        """Make the Python backend's shared-memory regions (they carry the pixels of every request)
        owner-only: the backend creates them 0644 whatever the umask. Returns the regions seen."""
        regions = sorted(Path("/dev/shm").glob(self.shm_prefix + "*"))
        for r in regions:
            try:
                if r.stat().st_mode & 0o077:
                    r.chmod(0o600)
            except OSError:
                pass  # removed meanwhile
        return regions

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])

    def _recover(self, models: list[str]) -> None:
        """A stub died: restart on the same ports, on a thread of its own (not the watchdog's)."""
        self.recoveries.append(models)
        threading.Thread(target=self.restart, name="patchserve-recover", daemon=True).start()

    def _stop_watchdog(self) -> None:
        # First: stubs leaving with a stopping server must not be "reloaded".
        if getattr(self, "watchdog", None) is not None:
            self.watchdog.stop()
            self.watchdog = None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the server: SIGTERM (Triton drains in-flight requests), then SIGKILL; then whatever is left
        of its process group (backend stubs), its shared memory and its state file."""
        self._stop_watchdog()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None:
            clean_stale(self.workdir)
        release(getattr(self, "_guard", None))  # last: an owner killed while stopping is still covered
        self._guard = None
        if getattr(self, "_log", None):
            self._log.close()

    def kill(self) -> None:
        """SIGKILL the server only, as a crash would (fault tests); its stubs are left to the next start."""
        self._stop_watchdog()
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def group_members(self) -> list[int]:
        """PIDs of the server's process group still running (the server and its backend stubs)."""
        from serving.server.state import members

        return members(self.process.pid, self.workdir) if self.process is not None else []

    def restart(self) -> None:
        """Start again on the same ports (fault tests: the server comes back)."""
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "EmbeddedTriton":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def ngc_command(self, model_config_name: str | None = None) -> str:
        """How to serve the same repository from NGC's container on a GPU machine."""
        return ngc_command(self.repo, model_config_name=model_config_name or gpu_flavour(self.repo),
                           http_port=self.urls.http_port, grpc_port=self.urls.grpc_port,
                           metrics_port=self.urls.metrics_port, workers=self.workers)


def gpu_flavour(repo: str | Path) -> str:
    """The flavour a GPU server should load: tensorrt when a model of ``repo`` has a plan config, else onnxruntime."""
    for flavour in GPU_FLAVOURS:
        if any(Path(repo).glob(f"*/configs/{flavour}.pbtxt")):
            return flavour
    return GPU_FLAVOURS[-1]


def ngc_command(repo: str | Path, *, model_config_name: str, http_port: int = 8000, grpc_port: int = 8001,
                metrics_port: int = 8002, workers: int | None = None) -> str:
    """``docker run`` of NGC's tritonserver on ``repo``, loading configs/MODEL_CONFIG_NAME.pbtxt of every model.

    Without --model-config-name the container would load config.pbtxt, the CPU
    python flavour; models without that flavour (the ensemble) fall back to it.
    Python-flavour models in the container choose their workers from the
    container's cores (``--cpus`` is its cgroup quota), as the embedded server
    does; ``workers`` passes an override as ``-e``.
    """
    env = f"-e {WORKERS_ENV}={workers} " if workers is not None else ""
    return (f"docker run --gpus all --rm {env}-p {http_port}:8000 -p {grpc_port}:8001 -p {metrics_port}:8002 "
            f"-v {Path(repo).resolve()}:/models {NGC_IMAGE} tritonserver --model-repository=/models "
            f"--model-control-mode=none --model-config-name={model_config_name}")
