"""What a command costs as a whole process tree: wall time, CPU seconds and peak RSS.

A command runs as a child of this process; its CPU seconds are its own and those of every descendant it
waited for (``wait4``'s resource usage, so forked DataLoader workers and pools count). A long-lived
process tree (a Triton server and its backend stubs) is charged the growth of its members' CPU times
over the command. The RSS of each watched tree (the sum over its live members) is sampled every
``interval_s``, and the peak kept.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.errors import BenchmarkError

SAMPLE_INTERVAL_S = 0.05


def tree_members(pid: int) -> list:
    """``pid``'s process and its live descendants (psutil processes; none once it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_rss_bytes(pid: int) -> int:
    """The summed RSS of ``pid`` and its live descendants (0 once it is gone)."""
    import psutil

    total = 0
    for p in tree_members(pid):
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live descendants, with the children each has reaped."""
    import psutil

    total = 0.0
    for p in tree_members(pid):
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


class PeakSampler:
    """Samples the tree RSS of each named root pid every ``interval_s`` in a thread; ``peaks`` in bytes."""

    def __init__(self, roots: dict[str, int], interval_s: float = SAMPLE_INTERVAL_S):
        self.roots = dict(roots)
        self.interval_s = interval_s
        self.peaks = {name: 0 for name in roots}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def _loop(self) -> None:
        while True:
            for name, pid in self.roots.items():
                self.peaks[name] = max(self.peaks[name], tree_rss_bytes(pid))
            self.samples += 1
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class TreeRun:
    """One command's run: wall seconds, CPU seconds of its tree and of a watched server tree, peak RSS."""

    wall_s: float
    cpu_s: float  # the command and every descendant it reaped
    # The command's tree, sampled. Not wait4's ru_maxrss: a forked child starts from its parent's high-water
    # mark, which exec keeps, so it would report this (large) process.
    peak_rss_mb: float
    server_cpu_s: float = 0.0
    server_peak_rss_mb: float = 0.0
    samples: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def total_cpu_s(self) -> float:
        return self.cpu_s + self.server_cpu_s


def run_tree(cmd: list[str], *, log: Path, env: dict[str, str] | None = None, cwd: Path | None = None,
             server_pid: int | None = None, interval_s: float = SAMPLE_INTERVAL_S) -> TreeRun:
    """Run ``cmd`` to its end (output into ``log``) and measure it; BenchmarkError when it fails."""
    server0 = tree_cpu_s(server_pid) if server_pid is not None else 0.0
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        roots = {"client": proc.pid, **({"server": server_pid} if server_pid is not None else {})}
        with PeakSampler(roots, interval_s) as sampler:
            _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    server_cpu = tree_cpu_s(server_pid) - server0 if server_pid is not None else 0.0
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise BenchmarkError(f"{Path(cmd[0]).name} {' '.join(cmd[1:3])} ... exited with {proc.returncode}:\n{tail}")
    mb = 1024.0 * 1024.0
    return TreeRun(wall_s=wall, cpu_s=usage.ru_utime + usage.ru_stime, peak_rss_mb=sampler.peaks["client"] / mb,
                   server_cpu_s=server_cpu,
                   server_peak_rss_mb=sampler.peaks.get("server", 0) / mb, samples=sampler.samples)
