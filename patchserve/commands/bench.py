"""``patchserve bench STAGE [--quick] [--out DIR]``: throughput benchmarks of every stage.

Each stage lives in its own script (``benchmarks/bench_STAGE.py``), warms
up, interleaves the arms it compares, reports min/median/max per arm and the
ratio of medians, and writes ``DIR/STAGE.json`` and ``DIR/STAGE.png``
(default ``./bench-results``), never into the source tree or the installed
package. ``patchserve bench report --out DIR`` (or ``--update-results`` on a
run) regenerates ``benchmarks/RESULTS.md`` and the README table from DIR.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from types import ModuleType

from benchmarks.common import BenchConfig
from serving.core.options import add_options, from_args


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_options(p, BenchConfig)
    return p


def _stage(name: str) -> ModuleType:
    """A stage's benchmark module, imported here (not by string) so import-linter sees the arrow."""
    if name == "data":
        from benchmarks import bench_data as module
    elif name == "train":
        from benchmarks import bench_train as module
    elif name == "infer":
        from benchmarks import bench_infer as module
    elif name == "serve":
        from benchmarks import bench_serve as module
    elif name == "slide":
        from benchmarks import bench_slide as module
    elif name == "int8":
        from benchmarks import bench_int8 as module
    elif name == "dask":
        from benchmarks import bench_dask as module
    elif name == "stain":
        from benchmarks import bench_stain as module
    elif name == "peer":
        from benchmarks import bench_peer as module
    elif name == "features":
        from benchmarks import bench_features as module
    else:
        raise KeyError(name)
    return module


def main(args: argparse.Namespace) -> int:
    from benchmarks.common import resolve_out, set_smoke, update_results
    from benchmarks.errors import BenchOutError
    from benchmarks.peer_wsinfer import default_cache
    from benchmarks.real_slides import default_real_svs

    cfg = from_args(BenchConfig, args)
    set_smoke(cfg.smoke)
    try:
        out = resolve_out(cfg.out)
    except BenchOutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if cfg.stage == "report":
        try:
            stages = update_results(out)
        except BenchOutError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"RESULTS.md and README table regenerated from {out}: {', '.join(stages)}")
        return 0
    stages = cfg.stages
    failed = []
    for stage in stages:
        module = _stage(stage)
        command = f"patchserve bench {stage}{' --quick' if cfg.quick else ''}{' --smoke' if cfg.smoke else ''}"
        if stage == "features" and cfg.real_slide is not None:
            command += f" --real-slide {Path(cfg.real_slide).name}"
        print(f"==> bench {stage} (results in {out})", flush=True)
        try:
            extra = {"interpolation": cfg.interpolation} if stage in ("data", "train") else {}
            if stage == "peer":
                extra = {"cache": cfg.cache or default_cache(dict(os.environ))}
            elif stage == "features":
                extra = {"real_slide": cfg.real_slide or default_real_svs()}
            module.run(quick=cfg.quick, command=command, out=out, **extra)
        except Exception as exc:  # noqa: BLE001 - one stage failing must not hide the others' figures
            print(f"bench {stage} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            failed.append(stage)
    if cfg.update_results and len(failed) < len(stages):
        print(f"RESULTS.md and README table regenerated: {', '.join(update_results(out))}")
    if failed:
        print(f"stages that failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
