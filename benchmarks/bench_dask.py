"""Bulk scoring in-process against the Dask path with one and with two local
worker processes, all against the same embedded Triton server and the same
folder of PNG patches (reading and decoding, not the model, is what a client
machine runs out of).

Each arm writes the full Parquet output; the Dask clusters are started once
and kept, so the timings measure the job (listing, tasks, commits, the end),
not the cluster's start. Arms are interleaved, repeat by repeat.

Target: the Dask path on one worker keeps at least 0.9 of the in-process
patches/s (its overhead stays under 10%).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import Target, Timing, bar_plot, export_random_model, write_results

UNITS_IN_FLIGHT = 2  # patchserve score's default: one unit's reading overlaps another's requests


def run(quick: bool, command: str, out: Path) -> dict:
    from distributed import LocalCluster

    from serving.jobs.config import ScoreConfig
    from serving.jobs.dask_config import DaskConfig
    from serving.jobs.engine import run_score
    from serving.server.embedded import EmbeddedTriton
    from serving.synth.dataset import synthesize

    cores = os.cpu_count() or 1
    size = 96
    per_class = 150 if quick else 600
    repeats = 3
    unit_patches = 128
    rows, targets, notes, results = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        repo, spec = export_random_model(tmp / "model", size=size, max_batch_size=32)
        synthesize(tmp / "data", classes=2, per_class=per_class, size=size)
        folders = tuple(str(tmp / "data" / s) for s in ("train", "val", "test"))
        n = sum(1 for f in folders for _ in Path(f).rglob("*.png"))
        with EmbeddedTriton(repo) as server:
            clusters = {w: LocalCluster(n_workers=w, threads_per_worker=UNITS_IN_FLIGHT, processes=True,
                                        host="127.0.0.1", dashboard_address=":0", silence_logs=logging.ERROR)
                        for w in (1, 2)}
            try:
                def job(name: str, i: int):
                    dask = DaskConfig() if name == "in-process" else DaskConfig(
                        scheduler=clusters[int(name[0])].scheduler_address)
                    cfg = ScoreConfig(inputs=folders, urls=(server.urls.grpc,), model=spec.name,
                                      out=str(tmp / f"{name}-{i}.parquet"), progress=False, dask=dask,
                                      unit_patches=unit_patches, units_in_flight=UNITS_IN_FLIGHT)
                    return lambda: run_score(cfg, log=lambda _m: None)

                arms = ("in-process", "1 worker", "2 workers")
                seconds: dict[str, list[float]] = {a: [] for a in arms}
                for a in arms:  # warm-up: server sessions, worker connections and imports
                    job(a, -1)()
                for i in range(repeats):
                    for a in arms:
                        go = job(a, i)
                        t0 = time.perf_counter()
                        result = go()
                        seconds[a].append(time.perf_counter() - t0)
                        assert result.rows == n, f"{a}: {result.rows} rows, expected {n}"
            finally:
                for c in clusters.values():
                    c.close()
    timings = {a: Timing(a, n, tuple(s), "patches/s") for a, s in seconds.items()}
    for a, t in timings.items():
        rows.append({"path": a, "patches": n, "patches/s": t.rate, "min": t.rate_min, "max": t.rate_max})
        results.append(t.to_dict())
        print(f"  {a}: {t.rate:.1f} patches/s (min {t.rate_min:.1f}, max {t.rate_max:.1f})")
    base = timings["in-process"].rate
    targets.append(Target("Dask, 1 worker / in-process patches/s", timings["1 worker"].rate / base, 0.9))
    notes.append(f"{n} PNG patches of {size}x{size} in three class-folder trees, units of {unit_patches} patches, "
                 f"{UNITS_IN_FLIGHT} units in flight in this process and per worker; the server's model has one "
                 "instance per core "
                 f"({cores} cores), "
                 "shared by every arm. Wall time of the whole job call, the cluster's start excluded; "
                 f"median of {repeats} interleaved repeats after one warm-up each.")
    notes.append(f"2 workers / 1 worker: {timings['2 workers'].rate / timings['1 worker'].rate:.2f}x "
                 f"on {cores} cores that the server and the workers share.")

    def plot(png: Path) -> None:
        bar_plot(png, [r["path"] for r in rows], [r["patches/s"] for r in rows], title="Bulk scoring: Dask path",
                 xlabel="patches/s (median)", errors=[(r["min"], r["max"]) for r in rows])

    ratio = timings["1 worker"].rate / base
    summary = [{"what": "Dask path, 1 worker / in-process, patches/s", "ratio": f"{ratio:.2f}",
                "target": f">= 0.9, {'met' if ratio >= 0.9 else 'missed'}"}]
    write_results("dask", out=out, command=command, rows=rows, columns=["path", "patches", "patches/s", "min", "max"],
                  targets=targets, notes=notes, payload={"results": results}, quick=quick, plot=plot, summary=summary)
    return {"rows": rows, "targets": [t.to_dict() for t in targets]}
