"""Instances x threads of the served classifier: the default against the other ways to use the cores.

Each layout is the exported model with its config.pbtxt changed in a copy of
the repository (instance count, the backend's workers, ONNX Runtime's
intra-op threads); all layouts are served at once, each by its own embedded
server, and measured in turn (A, B, C, A, B, C, ...), so a drift of the
shared machine hits every layout alike. Beside patches/s: the server tree's
CPU-seconds per patch and its resident memory (the server and its stubs; more
instances mean more stub processes).
"""

from __future__ import annotations

import collections
import contextlib
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import interleave, windowed_requests


@dataclass(frozen=True)
class Layout:
    name: str
    instances: int
    workers: str  # "auto" (the default export) or a number
    threads: int  # ONNX Runtime intra-op threads of each session

    def describe(self, cores: int) -> str:
        """instances x workers x threads, the workers as the backend chooses them on ``cores`` cores."""
        from serving.server.backends.onnx_model import choose_workers

        workers, _ = choose_workers(self.workers, self.instances, environ={}, cores=(cores, ""))
        return f"{self.instances} x {workers} x {self.threads}"


def layouts(cores: int) -> list[Layout]:
    """The default export first, then 1 x 1 (the old default), N x 1 instances, 1 session of N threads."""
    out = [Layout("default export (1 instance, workers auto)", 1, "auto", 1),
           Layout("1 instance, 1 worker, 1 thread (before)", 1, "1", 1)]
    if cores > 1:
        out += [Layout(f"{cores} instances, 1 worker each", cores, "1", 1),
                Layout(f"1 instance, 1 worker, {cores} intra-op threads", 1, "1", cores)]
        if cores >= 4:
            half = cores // 2
            out.append(Layout(f"{half} instances, workers auto", half, "auto", 1))
    return out


def write_layout(repo: Path, model: str, layout: Layout, dest: Path) -> Path:
    """A copy of ``repo`` holding only ``model``, its config.pbtxt set to ``layout``."""
    shutil.copytree(repo / model, dest / model, symlinks=True)
    cfg = dest / model / "config.pbtxt"
    text = cfg.read_text()
    text, n = re.subn(r"(instance_group\s*\{[^}]*count:\s*)\d+", rf"\g<1>{layout.instances}", text)
    assert n == 1, f"{cfg}: no instance_group count to set"
    for key, value in (("workers", layout.workers), ("intra_op_threads", str(layout.threads))):
        text, n = re.subn(rf'(key:\s*"{key}"\s*value\s*\{{\s*string_value:\s*)"[^"]*"', rf'\g<1>"{value}"', text)
        assert n == 1, f"{cfg}: no {key} parameter to set"
    cfg.write_text(text)
    return dest


def tree_usage(pids: list[int]) -> tuple[float, int]:
    """(CPU-seconds, resident bytes) of the processes ``pids``, those still running."""
    import psutil

    cpu, rss = 0.0, 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            t = p.cpu_times()
            cpu += t.user + t.system
            rss += p.memory_info().rss
    return cpu, rss


def measure_layouts(repo: Path, model: str, images: np.ndarray, work: Path, *, cores: int, requests: int,
                    concurrency: int, repeats: int) -> list[dict]:
    """One row per layout: patches/s (median, min, max), server CPU-ms per patch, server RSS (MB, peak)."""
    from serving.client.patch_client import PatchClient
    from serving.server.embedded import EmbeddedTriton

    rows = []
    with contextlib.ExitStack() as stack:
        arms, servers, cpu = {}, {}, collections.defaultdict(list)
        peak: dict[str, int] = collections.defaultdict(int)
        for i, layout in enumerate(layouts(cores)):
            folder = write_layout(repo, model, layout, work / f"layout{i}")
            server = stack.enter_context(EmbeddedTriton(folder, workers=None))
            client = PatchClient(server.urls.grpc, model, concurrency=concurrency)
            stack.callback(client.close)
            servers[layout.name] = (layout, server)

            def arm(client=client, server=server, name=layout.name):
                c0, _ = tree_usage(server.group_members())
                windowed_requests(client, client.info, [images] * requests, concurrency)
                c1, rss = tree_usage(server.group_members())
                cpu[name].append(c1 - c0)
                peak[name] = max(peak[name], rss)

            arms[layout.name] = arm
        timings = interleave(arms, items=len(images) * requests, repeats=repeats, unit="patches/s")
        for name, t in timings.items():
            layout, server = servers[name]
            timed = cpu[name][-repeats:]
            rows.append({"layout": name, "instances x workers x threads": layout.describe(cores),
                         "patches/s": t.rate, "min": t.rate_min, "max": t.rate_max,
                         "server CPU-ms/patch": 1e3 * float(np.median(timed)) / t.items,
                         "server RSS MB": peak[name] / 1e6, "chosen": "; ".join(server.worker_choices()),
                         "timing": t.to_dict()})
    return rows
