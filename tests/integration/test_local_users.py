"""What another local user can do to the embedded server, tried as another user.

Triton takes its restricted-API keys on its command line, which every local user can read from
/proc/PID/cmdline. A real second user (created by the test; it needs root) reads the server's
command line, takes every key it finds there and tries the restricted APIs over HTTP and gRPC with
tritonclient: changing the logging and trace settings must fail for it (those APIs are closed to
every client); the repository API takes the key it read, but only lists the models: loading and
unloading are refused to everyone.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig

import pytest

# Run as the other user: stdlib and tritonclient only, every attempt reported, nothing raised.
ATTACKER = r'''
import json, os, sys

http_port, grpc_port = sys.argv[1], sys.argv[2]
seen = []
for pid in os.listdir("/proc"):
    try:
        args = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace").split("\0")
    except OSError:
        continue
    if f"--http-port={http_port}" in args:
        seen = args
keys = {}
for arg in seen:
    if arg.startswith(("--http-restricted-api=", "--grpc-restricted-protocol=")):
        name, value = arg.split(":", 1)[1].split("=", 1)
        keys[name] = value
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

http = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}")
grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
header_sets = [{}] + [{k: v} for k, v in keys.items()] + [{"triton-grpc-protocol-" + k: v} for k, v in keys.items()]

def attempt(call):
    outcomes = []
    for headers in header_sets:
        try:
            call(headers)
            outcomes.append("done")
        except Exception as exc:
            status = getattr(exc, "status", None)
            outcomes.append(str(status()) if callable(status) else "not sent: " + type(exc).__name__)
    return outcomes

report = {"uid": os.getuid(), "read_cmdline": bool(seen), "keys_read": sorted(keys), "attempts": {
    "http logging": attempt(lambda h: http.update_log_settings({"log_verbose_level": 2}, headers=h)),
    "grpc logging": attempt(lambda h: grpc.update_log_settings({"log_error": False}, headers=h)),
    "http trace": attempt(lambda h: http.update_trace_settings(settings={"trace_rate": "7"}, headers=h)),
    "grpc trace": attempt(lambda h: grpc.update_trace_settings(settings={"log_frequency": "3"}, headers=h)),
    "http repository index": attempt(lambda h: http.get_model_repository_index(headers=h)),
    "http unload": attempt(lambda h: http.unload_model(sys.argv[3], headers=h)),
    "grpc load": attempt(lambda h: grpc.load_model(sys.argv[3], headers=h)),
}, "ready_after": http.is_server_ready() and http.is_model_ready(sys.argv[3])}
print(json.dumps(report))
'''


def _run_as(user: pwd.struct_passwd, argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, user=user.pw_uid, group=user.pw_gid, extra_groups=[], env=env, cwd="/",
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def other_user():
    """A second local user, removed afterwards, with a Python interpreter it may run and this
    environment's site-packages (for tritonclient) on its path."""
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("creating another local user needs root and useradd")
    name = f"psother{os.getpid() % 100000}"
    subprocess.run(["useradd", "--system", "--no-create-home", name], check=True, capture_output=True)
    try:
        user = pwd.getpwnam(name)
        paths = sysconfig.get_paths()
        env = {"PYTHONPATH": os.pathsep.join(dict.fromkeys((paths["purelib"], paths["platlib"]))), "HOME": "/"}
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        found = None
        for python in dict.fromkeys(p for p in (os.path.realpath(sys.executable),
                                                shutil.which(f"python{version}", path=os.defpath)) if p):
            try:
                probe = _run_as(user, [python, "-c", "import sys, tritonclient.grpc, tritonclient.http; "
                                                      "print('%d.%d' % sys.version_info[:2])"], env)
            except OSError:  # this user may not run it (an interpreter under another user's home)
                continue
            if probe.returncode == 0 and probe.stdout.strip() == version:
                found = python
                break
        if found is None:
            pytest.skip(f"no Python {version} with tritonclient that user {name} may run")
        yield user, found, env
    finally:
        subprocess.run(["userdel", name], capture_output=True)


def test_another_local_user_reads_the_command_line_but_cannot_change_logging_trace_or_the_repository(
        triton_server, other_user):
    user, python, env = other_user
    server, spec = triton_server.server, triton_server.spec
    done = _run_as(user, [python, "-c", ATTACKER, str(server.urls.http_port), str(server.urls.grpc_port),
                          spec.name], env)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["uid"] == user.pw_uid and report["read_cmdline"]
    assert "patchserve-api-key" in report["keys_read"]  # the repository key is no secret from local users
    attempts = report["attempts"]
    for api in ("http logging", "grpc logging", "http trace", "grpc trace", "http unload", "grpc load"):
        assert "done" not in attempts[api], (api, attempts[api])
    # HTTP answers 403 (restricted) to every header the user could send; a header no client can
    # send fails in the client, before it is sent.
    for api in ("http logging", "http trace"):
        assert all(o == "403" or o.startswith("not sent") for o in attempts[api]), (api, attempts[api])
    # What another user can do: list the repository with the key it read from the command line.
    assert "done" in attempts["http repository index"]
    assert report["ready_after"]
    # Closed to every client: the owner's key does not open the logging API either.
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    http = httpclient.InferenceServerClient(server.urls.http)
    try:
        with pytest.raises(InferenceServerException) as refused:
            http.get_log_settings(headers=server.admin_headers)
        assert refused.value.status() == "403"
    finally:
        http.close()
