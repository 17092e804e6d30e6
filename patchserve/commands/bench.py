"""``patchserve bench STAGE [--quick]``: throughput benchmarks of every stage.

Each stage lives in its own script (``benchmarks/bench_STAGE.py``, also
runnable as ``python -m benchmarks.bench_STAGE``), warms up, repeats, reports
medians with min and max, writes ``benchmarks/results/STAGE.json`` and a PNG
plot, and refreshes its table in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

STAGES = ("data", "train", "infer", "serve", "slide", "dask")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=(*STAGES, "all"), help="which stage to measure ('all' runs each in turn)")
    p.add_argument("--quick", action="store_true",
                   help="smaller sizes and fewer repeats: a few minutes on a 2-core machine")
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
    elif name == "dask":
        from benchmarks import bench_dask as module
    else:
        raise KeyError(name)
    return module


def main(args: argparse.Namespace) -> int:
    stages = STAGES if args.stage == "all" else (args.stage,)
    failed = []
    for stage in stages:
        module = _stage(stage)
        command = f"patchserve bench {stage}{' --quick' if args.quick else ''}"
        print(f"==> bench {stage}", flush=True)
        try:
            module.run(quick=args.quick, command=command)
        except Exception as exc:  # noqa: BLE001 - one stage failing must not hide the others' figures
            print(f"bench {stage} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            failed.append(stage)
    if failed:
        print(f"stages that failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
