"""patchserve against a peer tool, WSInfer 0.6.1, on the same weights and the same slide.

One random-init ResNet18 run at 64 px and 0.5 um/px (the `bench slide` model) is exported by
``patchserve export``'s defaults into a repository served by the embedded Triton server, and written as
the TorchScript + config JSON WSInfer takes (benchmarks/peer_wsinfer.py). Each arm is the whole command
on the same synthetic slide, run as a child process: ``patchserve score SLIDE --url ...`` against the
running server, and ``wsinfer run`` (tissue detection, patching, inference, CSV and GeoJSON), each with
its own default options. The arms are interleaved after a warm-up each.

Per arm: tiles/s (the command's wall time), CPU seconds of its whole process tree (for patchserve the
server's tree too), CPU-ms per tile, and the peak RSS of the client tree and of the server tree
(benchmarks/proctree.py). The tiles of both are matched by their level-0 position: the count matched,
the top-1 agreement and the largest probability difference.

Target: patchserve at least 1.6x WSInfer's tiles/s.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks.common import Timing, bar_plot, interleave, ratio_target, write_results
from benchmarks.errors import BenchmarkError
from benchmarks.peer_wsinfer import (WSINFER, offline_environ, read_wsinfer_csv, write_wsinfer_model,
                                     wsinfer_command, wsinfer_csv, wsinfer_env)
from benchmarks.proctree import SAMPLE_INTERVAL_S, TreeRun, run_tree, tree_members

TARGET = 1.6  # patchserve / WSInfer tiles/s (issue 28)
SIZE = 64
BATCH = 32  # the spec's max batch size; WSInfer's default --batch-size is 32 too
PATCHSERVE, PEER = "patchserve", "WSInfer 0.6.1"
ONE_WORKER = "patchserve, 1 worker"  # the default of patchserve 0.2.0, for comparison
Tiles = dict[tuple[int, int], tuple[float, ...]]


def read_patchserve_parquet(path: Path, class_names: tuple[str, ...]) -> Tiles:
    """Level-0 top-left (x, y) of each scored tile -> its probabilities in ``class_names`` order."""
    import pyarrow.parquet as pq

    cols = [f"prob_{c}" for c in class_names]
    t = pq.read_table(path, columns=["x", "y", *cols]).to_pydict()
    return {(int(x), int(y)): tuple(float(t[c][i]) for c in cols) for i, (x, y) in enumerate(zip(t["x"], t["y"]))}


def match_tiles(ours: Tiles, theirs: Tiles) -> dict:
    """Tiles of both tools matched by position: counts, top-1 agreement and max |dp| over the matched ones."""
    common = sorted(set(ours) & set(theirs))
    agree, max_dp = 0, 0.0
    for xy in common:
        a, b = ours[xy], theirs[xy]
        if len(a) != len(b):
            raise BenchmarkError(f"tile {xy}: {len(a)} probabilities against {len(b)}")
        agree += max(range(len(a)), key=a.__getitem__) == max(range(len(b)), key=b.__getitem__)
        max_dp = max(max_dp, *(abs(p - q) for p, q in zip(a, b)))
    return {"ours": len(ours), "theirs": len(theirs), "matched": len(common), "only_ours": len(set(ours) - set(theirs)),
            "only_theirs": len(set(theirs) - set(ours)), "top1_agreement": agree / len(common) if common else None,
            "max_abs_dp": max_dp if common else None}


def _make_run(folder: Path):
    """The `bench slide` model (random-init resnet18, 64 px, max batch 32) recorded at the slide's 0.5 um/px."""
    from serving.core.spec import ModelSpec
    from serving.synth.slide import MPP
    from training.checkpoint import write_random_run

    spec = ModelSpec(name="peer", class_names=("normal", "tumour"), input_height=SIZE, input_width=SIZE,
                     mean=(0.7, 0.55, 0.7), std=(0.15, 0.2, 0.15), arch="resnet18", max_batch_size=BATCH,
                     trained_mpp=MPP)
    return write_random_run(folder, spec), spec


def _venv_torch(venv: Path) -> str:
    done = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch; print(torch.__version__)"],
                          capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def _median(runs: list[TreeRun], attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in runs)


def run(quick: bool, command: str, out: Path, cache: Path, log=print) -> dict:
    from export.build import export_run
    from serving.server.embedded import EmbeddedTriton
    from serving.synth.slide import MPP, write_slide

    cores = os.cpu_count() or 1
    slide_size = 4096 if quick else 8192
    repeats = 3 if quick else 5
    t0 = time.perf_counter()
    venv = wsinfer_env(cache, log=log)
    install_s = time.perf_counter() - t0
    wenv = offline_environ(venv, dict(os.environ))
    with tempfile.TemporaryDirectory(prefix="bench-peer-") as tmp:
        tmp = Path(tmp)
        run_dir, spec = _make_run(tmp / "run")
        t0 = time.perf_counter()
        export_run(run_dir, tmp / "repo", progress=False)  # every export option at its default
        export_s = time.perf_counter() - t0
        model_pt, config = write_wsinfer_model(run_dir, tmp / "wsinfer-model")
        written = write_slide(tmp / "synth", patch_size=SIZE, slide_size=slide_size)
        slides = tmp / "slides"  # WSInfer wants a folder holding slides only
        slides.mkdir()
        slide = slides / written.slide.name
        os.replace(written.slide, slide)
        work = tmp / "cwd"
        work.mkdir()
        log(f"  slide {written.level_dimensions[0][0]}x{written.level_dimensions[0][1]} at {MPP} um/px; "
            f"export {export_s:.0f} s; WSInfer environment {'ready' if install_s < 5 else f'built in {install_s:.0f} s'}")

        t0 = time.perf_counter()
        with EmbeddedTriton(tmp / "repo") as server, EmbeddedTriton(tmp / "repo", workers=1) as one_worker:
            start_s = time.perf_counter() - t0
            stubs = len(tree_members(server.process.pid)) - 1
            records: dict[str, list[tuple[TreeRun, int]]] = {PATCHSERVE: [], ONE_WORKER: [], PEER: []}
            last: dict[str, Tiles] = {}
            counter = iter(range(10 ** 6))

            def ours(server=server, name=PATCHSERVE) -> int:
                server_pid = server.process.pid
                folder = tmp / f"ps-{next(counter)}"
                folder.mkdir()
                scores = folder / "tiles.parquet"
                cmd = [sys.executable, "-m", "patchserve", "score", str(slide), "--url", server.urls.grpc,
                       "--model", spec.name, "--out", str(scores), "--no-progress"]
                r = run_tree(cmd, log=folder / "log.txt", cwd=work, server_pid=server_pid)
                last[name] = read_patchserve_parquet(scores, spec.class_names)
                records[name].append((r, len(last[name])))
                shutil.rmtree(folder)
                return len(last[name])

            def theirs() -> int:
                folder = tmp / f"ws-{next(counter)}"
                folder.mkdir()
                results = folder / "results"
                cmd = wsinfer_command(venv, slides, results, model_pt, config)
                r = run_tree(cmd, log=folder / "log.txt", env=wenv, cwd=work)
                last[PEER] = read_wsinfer_csv(wsinfer_csv(results, slide), spec.class_names)
                records[PEER].append((r, len(last[PEER])))
                shutil.rmtree(folder)
                return len(last[PEER])

            machine = interleave({PATCHSERVE: ours, PEER: theirs,
                                  ONE_WORKER: lambda: ours(one_worker, ONE_WORKER)},
                                 items=1, repeats=repeats, unit="tiles/s")
    # The timed repeats (interleave ran the warm-ups first); wall time is the command's own.
    timings, runs = {}, {}
    for name, recs in records.items():
        n = len(machine[name].seconds)
        runs[name] = [r for r, _ in recs[-n:]]
        counts = {c for _, c in recs}
        if len(counts) != 1:
            raise BenchmarkError(f"{name} scored a different number of tiles from run to run: {sorted(counts)}")
        timings[name] = Timing(name, counts.pop(), tuple(r.wall_s for r in runs[name]), "tiles/s",
                               cpu_seconds=tuple(r.total_cpu_s for r in runs[name]))
    match = match_tiles(last[PATCHSERVE], last[PEER])
    target = ratio_target(f"{PATCHSERVE} / {PEER} tiles/s", timings[PATCHSERVE], timings[PEER], TARGET)

    rows, results = [], []
    for name, t in timings.items():
        rs = runs[name]
        served = name != PEER
        rows.append({"tool": name, "tiles": t.items, "tiles/s": t.rate, "min": t.rate_min, "max": t.rate_max,
                     "CPU-s": _median(rs, "total_cpu_s"), "CPU-ms/tile": 1e3 * (t.cpu_per_item or 0.0),
                     "client tree peak RSS MB": _median(rs, "peak_rss_mb"),
                     "server tree peak RSS MB": _median(rs, "server_peak_rss_mb") if served else "-"})
        results.append({**t.to_dict(), "runs": [asdict(r) | {"total_cpu_s": r.total_cpu_s} for r in rs],
                        "machine_busy_cpu_s": list(machine[name].cpu_seconds)})
        print(f"  {name:14s} {t.items:6d} tiles {t.rate:8.1f} tiles/s  CPU {_median(rs, 'total_cpu_s'):6.1f} s "
              f"({1e3 * (t.cpu_per_item or 0):.2f} ms/tile)  client RSS {_median(rs, 'peak_rss_mb'):6.0f} MB"
              + (f"  server RSS {_median(rs, 'server_peak_rss_mb'):6.0f} MB" if served else ""))
    print(f"  tiles matched by position: {match['matched']} (patchserve {match['ours']}, WSInfer {match['theirs']}), "
          f"top-1 agreement {match['top1_agreement']}, max |dp| {match['max_abs_dp']}")
    ps = runs[PATCHSERVE]
    speedup = timings[PATCHSERVE].rate / timings[ONE_WORKER].rate
    notes = [
        f"Both arms score one synthetic slide ({written.level_dimensions[0][0]}x{written.level_dimensions[0][1]} px "
        f"at {MPP} um/px) with one random-init resnet18 at {SIZE} px, batch {BATCH}, on the CPU: patchserve through "
        f"the embedded Triton server (every export option at its default: tritonserver and {stubs} Python backend "
        f"stub processes, one per model instance), WSInfer in PyTorch "
        f"({WSINFER}, torch {_venv_torch(venv)}, its own environment, WSINFER_FORCE_CPU=1). Each command with its "
        f"default options; the {cores} cores are shared by client and server.",
        "Tiles/s: the tiles each tool scored over the wall time of its whole command (start-up, tissue detection, "
        f"reading, inference, outputs), median of {repeats} interleaved repeats after a warm-up each. The Triton "
        f"server runs throughout, as a deployed one does: its start-up ({start_s:.1f} s here) is not in "
        "patchserve's time; WSInfer loads its model in each run.",
        "CPU-s: user + system seconds of the command's process tree (wait4, forked workers included) plus, for "
        f"patchserve, the server tree's growth over the run (median {_median(ps, 'server_cpu_s'):.1f} s of "
        f"{_median(ps, 'total_cpu_s'):.1f} s). Peak RSS: the largest sum of the tree's RSS sampled every "
        f"{SAMPLE_INTERVAL_S * 1e3:.0f} ms; pages forked workers share are counted in each.",
        f"Tiles matched by level-0 position: {match['matched']} of patchserve's {match['ours']} and WSInfer's "
        f"{match['theirs']} (each tool detects tissue its own way); top-1 agreement and max |dp| over those.",
        f"'{ONE_WORKER}': the same repository served with `--workers 1`, what the default was before the backend "
        f"chose its workers from the cores; the default export scored {speedup:.2f}x its tiles/s here.",
    ]
    agreement = {"columns": ["patchserve tiles", "WSInfer tiles", "matched by position", "top-1 agreement",
                             "max abs dp"],
                 "rows": [[match["ours"], match["theirs"], match["matched"],
                           "-" if match["top1_agreement"] is None else f"{match['top1_agreement']:.4f}",
                           "-" if match["max_abs_dp"] is None else f"{match['max_abs_dp']:.2e}"]]}

    def plot(png: Path) -> None:
        bar_plot(png, [r["tool"] for r in rows], [r["tiles/s"] for r in rows], title="One slide, whole command",
                 xlabel="tiles/s (median)", errors=[(r["min"], r["max"]) for r in rows])

    summary = [{"what": f"patchserve / {PEER} tiles/s, whole command on one slide (CPU)",
                "ratio": f"{target.ratio:.2f} ({target.low:.2f}-{target.high:.2f})",
                "target": f">= {TARGET}, {'met' if target.met else 'missed'}"}]
    write_results("peer", out=out, command=command, rows=rows,
                  columns=["tool", "tiles", "tiles/s", "min", "max", "CPU-s", "CPU-ms/tile", "client tree peak RSS MB",
                           "server tree peak RSS MB"],
                  targets=[target], notes=notes, quick=quick, plot=plot, summary=summary,
                  payload={"results": results, "match": match, "tables": [agreement],
                           "server_start_s": start_s, "export_s": export_s, "install_s": install_s})
    return {"rows": rows, "targets": [target.to_dict()], "match": match}
