"""Run a command with a time limit and end its whole process tree, whatever it started.

Killing a command's process group is not enough: torchrun puts every worker
in a session of its own, so a timeout that kills torchrun (or its group)
leaves the workers running, holding the GPU and their NCCL rendezvous. Here
the tree is read from /proc before anything is signalled; every process of
it and every process group it spans is ended: SIGTERM first (torchrun then
stops its workers itself), SIGKILL after a grace period.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from serving.core.procs import descendants, process_gone

_PR_SET_PDEATHSIG = 1
# Loaded here, not in the forked child: a child of a threaded process must not enter the dynamic loader.
_LIBC = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class TreeRun:
    """How a command ended: ``returncode`` None when it was killed at its time limit."""

    pid: int
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float


def _signal_all(members: list[tuple[int, int]], sig: int) -> None:
    for pgid in dict.fromkeys(g for _, g in members):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for pid, _ in members:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def end_tree(proc: subprocess.Popen, grace_s: float = 5.0) -> list[int]:
    """End ``proc`` and all its descendants (their groups too); returns the PIDs that were signalled."""
    members = [(proc.pid, proc.pid), *descendants(proc.pid)]  # proc leads its own session (start_new_session)
    _signal_all(members, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and not all(process_gone(p) for p, _ in members):
        proc.poll()  # reap our own child so it reads as gone
        time.sleep(0.05)
    # Whatever is left, and anything started meanwhile, is killed.
    members += [m for m in descendants(proc.pid) if m not in members]
    _signal_all([m for m in members if not process_gone(m[0])], signal.SIGKILL)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not ignorable
        pass
    return [p for p, _ in members]


def run_tree(cmd: Sequence[str], *, timeout_s: float, env: Mapping[str, str] | None = None,
             cwd: str | Path | None = None, grace_s: float = 5.0, die_with_parent: bool = False) -> TreeRun:
    """Run ``cmd`` in a session of its own, its output captured; at ``timeout_s``, or when this call is
    interrupted (Ctrl-C, pytest-timeout's signal), end the whole tree before returning or raising.

    ``die_with_parent``: the command is SIGKILLed by the kernel if this process dies first, so a
    killed caller leaves no command behind (its own children are covered by ``end_tree`` only).
    """
    t0 = time.monotonic()
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=None if env is None else dict(env), cwd=cwd, start_new_session=True,
                            preexec_fn=set_parent_death_signal if die_with_parent else None)
    timed_out = False
    try:
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            end_tree(proc, grace_s)
            out, err = _drain(proc, grace_s)
    except BaseException:
        end_tree(proc, grace_s)
        raise
    # Members of its group that outlived the command (a background grandchild) go too; children that
    # left the group and outlived their parents cannot be found any more: end_tree reads the tree first.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return TreeRun(proc.pid, None if timed_out else proc.returncode, out, err, timed_out,
                   time.monotonic() - t0)


def _drain(proc: subprocess.Popen, timeout_s: float) -> tuple[str, str]:
    """What the ended command wrote; empty when a process outside the tree still holds its pipes."""
    try:
        return proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        return "", "(output lost: a process outside the command's tree held its pipes open)"


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux prctl)."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
