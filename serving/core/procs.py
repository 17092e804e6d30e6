"""Processes of this host, as /proc tells them."""

from __future__ import annotations

from pathlib import Path

SHM_DIR = Path("/dev/shm")  # POSIX shared memory regions of this host


def process_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (a zombie counts as gone: it holds no memory and runs nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")
