"""Reading what a job has committed so far (OUT.parts/unit-*/part-*.parquet), as the tests watch it."""

from __future__ import annotations

from pathlib import Path

from serving.jobs.output import parts_path
from serving.jobs.parts import read_meta


def committed_parts(out: Path) -> list[Path]:
    """The published parts of the job on ``out``, in unit and item order (temporary files left out)."""
    return sorted(parts_path(out).glob("unit-*/part-*.parquet"))


def committed_rows(out: Path) -> int:
    """Rows committed so far (0 while nothing is, or once the finish merged and removed the parts)."""
    total = 0
    for p in committed_parts(out):
        meta = read_meta(p)
        total += meta.rows if meta is not None else 0
    return total


def committed_errors(out: Path) -> list[tuple[str, str]]:
    return [e for p in committed_parts(out) if (m := read_meta(p)) is not None for e in m.errors]
