"""The embedded server and what it leaves on the host: restricted APIs, private shared memory, stale state."""

from __future__ import annotations

import json
import os
import signal
import time
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from serving.client.patch_client import PatchClient
from serving.server.embedded import free_port
from serving.server.state import members
from serving.core.procs import process_gone


def test_logging_and_trace_apis_are_closed_to_every_client_and_the_repository_api_needs_the_key(triton_server):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    server = triton_server.server
    key_file = server.workdir / "api_key"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    assert key_file.read_text().strip() == server.api_key and len(server.api_key) >= 32
    http = httpclient.InferenceServerClient(server.urls.http)
    grpc = grpcclient.InferenceServerClient(server.urls.grpc)
    grpc_key = {f"triton-grpc-protocol-{k}": v for k, v in server.admin_headers.items()}
    try:
        for headers in ({}, server.admin_headers, {"patchserve-api-key": "guess"}):
            with pytest.raises(InferenceServerException) as refused:
                http.update_log_settings({"log_verbose_level": 1}, headers=headers)
            assert refused.value.status() == "403"
            with pytest.raises(InferenceServerException) as refused:
                http.update_trace_settings(settings={"trace_rate": "7"}, headers=headers)
            assert refused.value.status() == "403"
        for headers in ({}, grpc_key):
            with pytest.raises(InferenceServerException) as refused:
                grpc.update_log_settings({"log_verbose_level": 1}, headers=headers)
            assert refused.value.status() == "StatusCode.UNAVAILABLE" and grpc.is_server_ready()
        with pytest.raises(InferenceServerException) as refused:
            http.get_model_repository_index(headers={"patchserve-api-key": "guess"})
        assert refused.value.status() == "403"
        # patchserve's own listing, with the key, works; inference needs no key.
        names = {m["name"] for m in http.get_model_repository_index(headers=server.admin_headers)}
        assert triton_server.spec.name in names
        assert grpc.get_model_repository_index(headers=grpc_key).models
        assert http.is_model_ready(triton_server.spec.name)
    finally:
        http.close()
        grpc.close()


def _python_child():
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as a terminal starts a foreground job


def _serve(repo: Path, workdir: Path | None, ports: tuple[int, int, int]) -> tuple[subprocess.Popen, list[str]]:
    http, grpc, metrics = ports
    cmd = [sys.executable, "-m", "patchserve", "serve", "--repo", str(repo), "--http-port", str(http),
           "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    cmd += ["--workdir", str(workdir)] if workdir is not None else []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=_python_child)
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip())
        if line.startswith("Press Ctrl-C"):
            return proc, lines
    proc.wait()
    raise AssertionError("serve did not become ready:\n" + "\n".join(lines))


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _children(pid: int) -> dict[int, str]:
    """Live children of ``pid``: PID -> command line."""
    out = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                out[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
    return out


def _guard_of(serve_pid: int) -> int:
    (pid,) = [p for p, cmd in _children(serve_pid).items() if "serving.server.guard" in cmd]
    return pid


def _workdir_of(lines: list[str]) -> Path:
    (line,) = [ln for ln in lines if ln.startswith("Triton is ready (log: ")]
    return Path(line[len("Triton is ready (log: "):-1]).parent


@pytest.mark.parametrize("given_workdir", [False, True], ids=["temporary-workdir", "given-workdir"])
def test_nothing_keeps_serving_after_serve_is_sigkilled(exported_repo, tmp_path, given_workdir):
    """SIGKILL gives serve no chance to stop its server: its guard does, and removes what it left."""
    repo, spec = exported_repo
    ports = (free_port(), free_port(), free_port())
    proc, lines = _serve(repo, tmp_path / "work" if given_workdir else None, ports)
    try:
        workdir = _workdir_of(lines)
        state = json.loads((workdir / "server.json").read_text())
        group = members(state["pgid"], workdir)
        stubs = [p for p in group if p != state["server_pid"]]
        decoders = [c for s in stubs for c in _children(s)]  # the preprocessing stub's DALI process
        regions = sorted(Path("/dev/shm").glob(state["shm_prefix"] + "*"))
        assert len(stubs) == 3 and len(decoders) == 1 and regions
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 60  # a condition wait on a busy machine, not a speed check
    left = lambda: ([p for p in group + decoders if not process_gone(p)], [r for r in regions if r.exists()])  # noqa: E731
    while left() != ([], []) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left() == ([], [])
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # nothing listens there any more
    assert workdir.exists() == given_workdir
    if given_workdir:
        assert not (workdir / "server.json").exists()


def test_sigkilled_serve_is_cleaned_up_by_the_next_serve_on_its_work_folder(exported_repo, tmp_path):
    repo, spec = exported_repo
    workdir = tmp_path / "work"
    ports = (free_port(), free_port(), free_port())
    first, _ = _serve(repo, workdir, ports)
    try:
        state = json.loads((workdir / "server.json").read_text())
        server_pid, prefix = state["server_pid"], state["shm_prefix"]
        group = members(state["pgid"], workdir)
        stubs = [p for p in group if p != server_pid]
        assert server_pid in group and len(stubs) == 3  # one stub per Python-backend model: classifier, TTA, preprocess
        regions = sorted(Path("/dev/shm").glob(prefix + "*"))
        assert regions and {oct(r.stat().st_mode & 0o777) for r in regions} == {"0o600"}
        # serve and its guard die together (a whole process tree killed): nothing could stop the server
        os.kill(_guard_of(first.pid), signal.SIGKILL)
        first.kill()
        first.wait()
        assert not process_gone(server_pid)  # the orphaned server and its stubs still run, holding the ports
        second, lines = _serve(repo, workdir, ports)
    finally:
        _stop(first)
    try:
        assert all(process_gone(p) for p in group), [p for p in group if not process_gone(p)]
        assert not any(r.exists() for r in regions)
        assert f"  {spec.name} (version 1): READY" in lines
        with PatchClient(f"127.0.0.1:{ports[1]}", spec.name) as client:
            assert client.predict(np.zeros((2, *spec.input_hw, 3), np.uint8)).shape == (2, spec.num_classes)
        new_state = json.loads((workdir / "server.json").read_text())
        new_group = members(new_state["pgid"], workdir)
        new_regions = sorted(Path("/dev/shm").glob(new_state["shm_prefix"] + "*"))
        # Ctrl-C in the terminal: serve stops the server and every stub of its group.
        os.killpg(second.pid, signal.SIGINT)
        rest = second.communicate(timeout=60)[0]
    finally:
        _stop(second)
    assert second.returncode == 0, rest
    assert all(process_gone(p) for p in new_group)
    assert not any(r.exists() for r in new_regions) and not (workdir / "server.json").exists()
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[1]))


def test_client_shared_memory_is_private_and_stale_regions_of_dead_clients_are_removed(triton_server):
    spec = triton_server.spec
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = Path("/dev/shm") / f"patchserve_{int(dead.stdout)}_00ff_0_in"
    stale.write_bytes(b"pixels of a crashed job")
    with PatchClient(triton_server.grpc, spec.name, shared_memory=True, concurrency=2) as client:
        import os

        mine = sorted(Path("/dev/shm").glob(f"patchserve_{os.getpid()}_*"))
        assert len(mine) == 4 and {oct(p.stat().st_mode & 0o777) for p in mine} == {"0o600"}
        assert not stale.exists()
        assert client.predict(np.zeros((3, *spec.input_hw, 3), np.uint8)).shape == (3, spec.num_classes)
    assert not any(p.exists() for p in mine)
