"""Reload a model whose Python-backend stub process died, so the server never lies about readiness.

Triton runs each Python-backend model instance in a stub process. When one
dies (killed for memory, a crash in native code), Triton 2.51 keeps reporting
the server and the model ready while every request to it fails with "Stub
process ... is not healthy". The embedded server runs in explicit model
control mode; this watchdog looks at the server's stub children once a
second and asks Triton to load the model again when one of its stubs is gone.
While the model reloads it reports not ready; afterwards it answers again.
"""

from __future__ import annotations

import threading
import urllib.request
from pathlib import Path

STUB = "triton_python_backend_stub"


def _state_and_ppid(pid: str) -> tuple[str, int]:
    fields = (Path("/proc") / pid / "stat").read_text().rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def live_stubs(server_pid: int) -> dict[int, str]:
    """PID -> model name of the server's live stub processes (zombies count as gone)."""
    out: dict[int, str] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            state, ppid = _state_and_ppid(d.name)
            if ppid != server_pid or state == "Z":
                continue
            args = (d / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if args and args[0].decode(errors="replace").endswith(STUB) and len(args) > 1:
            out[int(d.name)] = Path(args[1].decode(errors="replace")).parents[1].name  # REPO/NAME/VERSION/model.py
    return out


class StubWatchdog:
    """A daemon thread: when a stub of model M disappears, POST /v2/repository/models/M/load."""

    def __init__(self, server_pid: int, http_url: str, every_s: float = 1.0, log=None,
                 headers: dict[str, str] | None = None):
        self.server_pid, self.http_url, self.every_s = server_pid, http_url, every_s
        self.headers = dict(headers or {})
        self.reloads: list[str] = []
        self._log = log or (lambda _msg: None)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="patchserve-stub-watchdog", daemon=True)

    def start(self) -> "StubWatchdog":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def reload(self, model: str) -> None:
        req = urllib.request.Request(f"http://{self.http_url}/v2/repository/models/{model}/load", data=b"",
                                     method="POST", headers=self.headers)
        with urllib.request.urlopen(req, timeout=300) as resp:
            resp.read()

    def _run(self) -> None:
        known = live_stubs(self.server_pid)
        while not self._stop.wait(self.every_s):
            current = live_stubs(self.server_pid)
            lost = sorted({m for pid, m in known.items() if pid not in current})
            for model in lost:
                self._log(f"the stub process of model {model!r} died; reloading it")
                try:
                    self.reload(model)
                    self.reloads.append(model)
                except OSError as exc:  # the server may be stopping; the next round sees it again
                    self._log(f"reloading {model!r} failed: {exc}")
            known = live_stubs(self.server_pid) if lost else current
