"""``patchserve score``: score folders, manifests, HDF5 files and whole slides against Triton.

Every flag is a field of :class:`serving.jobs.config.ScoreConfig` (slide flags:
of its :class:`serving.slides.tiling.TilingConfig`, Dask flags: of its
:class:`serving.jobs.dask_config.DaskConfig`); the parser is generated from
them. With ``--scheduler`` or ``--workers`` the units run on Dask, else in
this process; the job is the same.
"""

from __future__ import annotations

import argparse

from serving.core.options import add_options, from_args
from serving.jobs.config import ScoreConfig


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Score patches against a Triton server and stream the rows to Parquet or CSV.")
    add_options(p, ScoreConfig)
    return p


def main(args: argparse.Namespace) -> int:
    import logging

    from serving.jobs.engine import run_score

    cfg = from_args(ScoreConfig, args)
    if cfg.dask.enabled:
        import distributed  # noqa: F401 - its import sets its loggers up; quieten them after that

        # Dask logs its own tracebacks when a cluster goes away; the job says what happened in one line.
        for name in ("distributed", "distributed.client", "distributed.core", "distributed.comm"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    result = run_score(cfg)
    return 3 if result.stopped else 0
