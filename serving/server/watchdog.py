"""Notice a Python-backend stub process that died, so the server never lies about readiness.

Triton runs each Python-backend model instance in a stub process. When one
dies (killed for memory, a crash in native code), Triton 2.51 keeps reporting
the server and the model ready while every request to it fails with "Stub
process ... is not healthy". This watchdog looks at the server's stub
children once a second and calls back when one is gone; the embedded server
then restarts (not ready while it does, whole again afterwards). Reloading
just the model would need the repository API, which stays closed.
"""

from __future__ import annotations

import threading
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
    """A daemon thread: when a stub process of the server is gone, call ``on_lost(models)`` once and stop."""

    def __init__(self, server_pid: int, on_lost, every_s: float = 1.0):
        self.server_pid, self.on_lost, self.every_s = server_pid, on_lost, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="patchserve-stub-watchdog", daemon=True)

    def start(self) -> "StubWatchdog":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        known = live_stubs(self.server_pid)
        while not self._stop.wait(self.every_s):
            current = live_stubs(self.server_pid)
            lost = sorted({m for pid, m in known.items() if pid not in current})
            if lost and not self._stop.is_set():
                self.on_lost(lost)
                return
            known = current
