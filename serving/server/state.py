"""What an embedded server leaves on the host, and how the next one removes it.

``WORKDIR/server.json`` records the process that owns the server, the
server's process group (the server and its Python-backend stubs) and the
prefix of its shared-memory regions. A SIGKILLed ``serve`` cannot clean up;
the next server started on the same work folder (or any new one, for
temporary work folders whose owner is gone) does: it kills the group's
members that still run a binary of that work folder, unlinks the regions and
drops the folder's state.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

from serving.core.errors import ServerError
from serving.core.procs import SHM_DIR, process_gone

STATE_FILE = "server.json"
GONE_TIMEOUT_S = 10.0


def write_key_file(path: Path, key: str) -> Path:
    """The restricted-API key, readable by this user only (created 0600, never world-readable in between)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, key.encode() + b"\n")
    finally:
        os.close(fd)
    return path


def _pgrp(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[2])


def _runs_from(pid: int, root: Path) -> bool:
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return False
    return exe.startswith(str(root.resolve()) + os.sep)


def members(pgid: int, workdir: Path) -> list[int]:
    """Live processes of group ``pgid`` running a binary of ``workdir`` (a reused PID is never ours)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _pgrp(int(entry)) == pgid and _runs_from(int(entry), workdir):
            found.append(int(entry))
    return sorted(found)


def kill_members(pids: list[int]) -> None:
    """SIGKILL ``pids`` and wait until each is gone (a zombie counts as gone)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + GONE_TIMEOUT_S
    while any(not process_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def _read_state(workdir: Path) -> dict | None:
    try:
        return json.loads((workdir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def clean_stale(workdir: Path) -> bool:
    """Remove what the last server of ``workdir`` left; ServerError if another live process still serves it.

    Returns True when there was a state to clean.
    """
    state = _read_state(workdir)
    if state is None:
        return False
    owner = int(state.get("owner_pid", -1))
    pgid = int(state.get("pgid", -1))
    left = members(pgid, workdir) if pgid > 0 else []
    if owner != os.getpid() and not process_gone(owner) and int(state.get("server_pid", -1)) in left:
        raise ServerError(f"--workdir {workdir}: a server of process {owner} is running there; stop it first "
                          "or pick another work folder")
    kill_members(left)
    prefix = str(state.get("shm_prefix", ""))
    if prefix.startswith("patchserve"):
        for region in SHM_DIR.glob(prefix + "*"):
            try:
                region.unlink()
            except OSError:
                pass
    try:
        (workdir / STATE_FILE).unlink()
    except FileNotFoundError:
        pass
    return True


def remove_stale_temp_workdirs(tmp: Path, prefix: str) -> list[Path]:
    """Temporary work folders whose owning process is gone: clean them and delete them."""
    removed = []
    uid = os.getuid()
    for d in tmp.glob(prefix + "*"):
        try:
            if not d.is_dir() or d.stat().st_uid != uid:
                continue
        except OSError:
            continue
        state = _read_state(d)
        if state is None or not process_gone(int(state.get("owner_pid", -1))):
            continue
        try:
            clean_stale(d)
        except ServerError:
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed
