"""The embedded Triton server: starts, is safe by default, stops cleanly."""

from __future__ import annotations

import socket

import pytest

from serving.core.errors import ServerError
from serving.server.embedded import EmbeddedTriton


def _listening_addresses(port: int) -> set[str]:
    """Addresses with a socket listening on ``port``, from /proc/net/tcp and tcp6.

    gRPC listens on IPv6 sockets: an IPv4-mapped address (::ffff:127.0.0.1) is
    reported as its IPv4 form.
    """
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        with open(table) as fh:
            next(fh)
            for line in fh:
                parts = line.split()
                local, state = parts[1], parts[3]
                hex_ip, hex_port = local.split(":")
                if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                    continue
                raw = bytes.fromhex(hex_ip)
                # The kernel prints each 32-bit word in host (little-endian) order.
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                addr = socket.inet_ntop(family, raw)
                found.add(addr.removeprefix("::ffff:"))
    return found


@pytest.fixture(scope="module")
def empty_server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("empty_repo")
    with EmbeddedTriton(repo) as server:
        yield server


def test_server_binds_loopback_only_by_default(empty_server):
    for port in (empty_server.urls.http_port, empty_server.urls.grpc_port):
        assert _listening_addresses(port) == {"127.0.0.1"}


def test_server_refuses_model_loading_over_the_api(empty_server):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(empty_server.urls.http)
    # Without the key the repository API is closed; with it, --model-control-mode=none still refuses.
    with pytest.raises(InferenceServerException, match="This API is restricted, expecting header 'patchserve-api-key'"):
        client.load_model("anything")
    with pytest.raises(InferenceServerException, match="explicit model load / unload is not allowed"):
        client.load_model("anything", headers=empty_server.admin_headers)
    client.close()


def test_server_stops_cleanly_and_frees_its_port(tmp_path):
    server = EmbeddedTriton(tmp_path).start()
    port = server.urls.http_port
    assert server.alive()
    server.close()
    assert not server.alive()
    assert server.process.returncode == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # would raise if tritonserver still held it


def test_missing_repository_is_a_clear_error(tmp_path):
    with pytest.raises(ServerError, match="--repo: no such model repository folder"):
        EmbeddedTriton(tmp_path / "nope")


def test_failed_start_reports_the_server_log(tmp_path):
    # A model folder with a config that does not parse: with exit-on-error the
    # server exits, and the error carries its log.
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.pbtxt").write_text("this is not protobuf text {")
    with pytest.raises(ServerError, match="tritonserver exited with code"):
        EmbeddedTriton(tmp_path, exit_on_error=True, startup_timeout_s=60).start()
