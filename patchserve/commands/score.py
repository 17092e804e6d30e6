"""``patchserve score``: score folders, manifests, HDF5 files and whole slides against Triton.

Every flag is a field of :class:`serving.score.ScoreConfig` (slide flags: of
its :class:`serving.slides.TilingConfig`); the parser is generated from them.
"""

from __future__ import annotations

import argparse

from serving.options import add_options, from_args
from serving.score import ScoreConfig


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Score patches against a Triton server and stream the rows to Parquet or CSV.")
    add_options(p, ScoreConfig)
    return p


def main(args: argparse.Namespace) -> int:
    from serving.score import run_score

    result = run_score(from_args(ScoreConfig, args))
    if result.stopped:
        return 3
    for path in (*result.heatmaps, *result.geojsons):
        print(f"wrote {path}")
    return 0
