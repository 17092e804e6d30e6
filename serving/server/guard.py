"""A guard process: nothing of an embedded server keeps serving once the process that started it dies.

tritonserver runs in a session of its own (so Ctrl-C reaches its owner first and the owner stops it
in order), which also means it outlives an owner killed with SIGKILL: without this guard it kept
answering on its port, with its backend stubs and their shared memory, until the next server of the
same user cleaned up. The owner starts one guard per server, in a session of its own too, and holds
the write end of the guard's stdin. The guard waits on that pipe; it reaches end-of-file when the
owner's process is gone, however it died (the kernel closes the pipe). Unless the owner said
``stop`` first (a clean stop, done by the owner itself), the guard removes what the server left, as
the next server on the work folder would (serving/server/state.py): the server and its stubs, their
shared memory, the state file; and the work folder itself when the owner made it as a temporary one.
The stubs' own children (the DALI decoder) die with their stub.

Run as ``python -m serving.server.guard``; its instructions come on stdin, never from argv.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

STOP = b"stop\n"
OWNER_EXIT_TIMEOUT_S = 30.0


def start_guard(workdir: Path, *, remove_workdir: bool, env: dict[str, str]) -> subprocess.Popen:
    """Start the guard of the server whose state is in ``workdir``; stop it with :func:`release`."""
    proc = subprocess.Popen([sys.executable, "-m", "serving.server.guard"], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd="/",
                            start_new_session=True)
    proc.stdin.write(json.dumps({"workdir": str(Path(workdir).resolve()), "remove_workdir": remove_workdir})
                     .encode() + b"\n")
    proc.stdin.flush()
    return proc


def release(proc: subprocess.Popen | None) -> None:
    """The owner stops its server itself: tell the guard, and let it go."""
    if proc is None:
        return
    try:
        proc.stdin.write(STOP)
        proc.stdin.close()
    except OSError:
        pass  # the guard is gone already
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def guard(stdin) -> None:
    """Wait for the owner's end of the pipe to close; clean up unless it said ``stop``."""
    from serving.core.errors import ServerError
    from serving.core.procs import process_gone
    from serving.server.state import clean_stale

    config = json.loads(stdin.readline() or "{}")
    if "workdir" not in config:
        return
    rest = stdin.read()  # blocks until the owner closes its end, or dies
    if rest.startswith(STOP):
        return
    workdir = Path(config["workdir"])
    # The pipe closes while the owner is still exiting; its state must say "gone" before clean_stale
    # believes that no live owner holds the server.
    owner = _owner(workdir)
    deadline = time.monotonic() + OWNER_EXIT_TIMEOUT_S
    while owner is not None and not process_gone(owner) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        clean_stale(workdir)
    except ServerError:
        return  # another live process serves there now: not ours to remove
    if config.get("remove_workdir"):
        shutil.rmtree(workdir, ignore_errors=True)


def _owner(workdir: Path) -> int | None:
    from serving.server.state import STATE_FILE

    try:
        return int(json.loads((workdir / STATE_FILE).read_text())["owner_pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def main() -> None:
    # In a session of its own already; a hang-up or Ctrl-C meant for the owner's terminal is not for us.
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    guard(os.fdopen(sys.stdin.fileno(), "rb", buffering=0))


if __name__ == "__main__":
    main()
