"""The dynamic batcher's queue delay, chosen by measurement.

One model is served under several ``max_queue_delay_microseconds`` at once
(copies of its folder whose config.pbtxt differs only in name and delay), and
each is measured the same way, interleaved: p50 latency of single-patch
requests one at a time (the delay is pure waiting there), and throughput and
the mean batch the server formed with many single-patch requests in flight
(what the delay is for).
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks.common import interleave, percentiles_ms

DELAYS_US = (0, 100, 200, 500, 2000)
P50_BUDGET = 1.05  # the default may add at most 5% to the p50 latency at batch 1


def add_delay_variants(repo: Path, name: str, delays=DELAYS_US) -> dict[int, str]:
    """Copies of ``repo/name`` served as ``name_d{delay}``; weights hard-linked, config rewritten."""
    names = {}
    for delay in delays:
        variant = f"{name}_d{delay}"
        dst = repo / variant
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(repo / name, dst, copy_function=os.link)
        cfg = dst / "config.pbtxt"
        text = cfg.read_text()
        cfg.unlink()  # a hard link: write a new file, never through to the original
        text = re.sub(r'^name: ".*"$', f'name: "{variant}"', text, count=1, flags=re.M)
        text = re.sub(r"max_queue_delay_microseconds: \d+", f"max_queue_delay_microseconds: {delay}", text)
        cfg.write_text(text)
        names[delay] = variant
    return names


def _batch_stats(stats_client, model: str) -> tuple[int, int]:
    s = stats_client.get_inference_statistics(model_name=model, as_json=True)["model_stats"][0]
    return int(s.get("inference_count", 0)), int(s.get("execution_count", 0))


def measure_delays(url: str, names: dict[int, str], size: int, *, requests: int, concurrency: int,
                   repeats: int) -> list[dict]:
    """One row per delay: p50/p90/p99 at concurrency 1, patches/s and mean batch at ``concurrency``."""
    import tritonclient.grpc as grpcclient

    from serving.client.patch_client import PatchClient

    x = np.random.default_rng(0).integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    stats = grpcclient.InferenceServerClient(url)
    clients = {d: PatchClient(url, n, concurrency=concurrency) for d, n in names.items()}
    latencies: dict[int, list[float]] = {d: [] for d in names}
    counts = {d: [0, 0] for d in names}

    def one_at_a_time(d):
        def go():
            c = clients[d]
            for _ in range(requests):
                t0 = time.perf_counter()
                c.submit(c.info, x).result()
                latencies[d].append(time.perf_counter() - t0)
        return go

    def in_flight(d):
        def go():
            c = clients[d]
            before = _batch_stats(stats, names[d])
            window: collections.deque = collections.deque()
            for _ in range(requests * 4):
                if len(window) >= concurrency:
                    window.popleft().result()
                window.append(c.submit(c.info, x))
            while window:
                window.popleft().result()
            after = _batch_stats(stats, names[d])
            counts[d][0] += after[0] - before[0]
            counts[d][1] += after[1] - before[1]
        return go

    try:
        interleave({d: one_at_a_time(d) for d in names}, items=requests, repeats=repeats,
                   unit="requests/s")
        for d in names:  # the warm-up's latencies are first; keep the timed ones
            latencies[d] = latencies[d][requests:] or latencies[d]  # --smoke: no warm-up
        busy = interleave({d: in_flight(d) for d in names}, items=requests * 4, repeats=repeats,
                          unit="patches/s")
    finally:
        for c in clients.values():
            c.close()
        stats.close()
    base = percentiles_ms(latencies[min(names)])["p50_ms"]
    rows = []
    for d in names:
        pct = percentiles_ms(latencies[d])
        rows.append({"delay_us": d, **pct, "p50 / p50 at 0 us": pct["p50_ms"] / base,
                     "patches/s": busy[d].rate, "min": busy[d].rate_min, "max": busy[d].rate_max,
                     "mean batch": counts[d][0] / max(counts[d][1], 1), "concurrency": concurrency})
    return rows


def choose(rows: list[dict]) -> dict:
    """The largest delay within the p50 budget: the most batching the latency budget allows."""
    ok = [r for r in rows if r["p50 / p50 at 0 us"] <= P50_BUDGET]
    return max(ok, key=lambda r: r["delay_us"]) if ok else min(rows, key=lambda r: r["delay_us"])
