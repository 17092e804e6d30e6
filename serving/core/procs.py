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


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, pgrp, session, ...), or None."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(pid: int) -> list[tuple[int, int]]:
    """(pid, process group) of every live descendant of ``pid``, parents before children.

    Found by parent links, so children that started sessions of their own
    (torchrun's workers do) are found too, as long as their parents live.
    """
    children: dict[int, list[int]] = {}
    groups: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None or fields[0] in ("Z", "X"):
            continue
        child = int(entry.name)
        children.setdefault(int(fields[1]), []).append(child)
        groups[child] = int(fields[2])
    found, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop(0)
        found.append((p, groups[p]))
        todo += children.get(p, [])
    return found
