"""A scoring job's output file: its name, its columns, and reading its rows back.

``OUT`` is one Parquet or CSV file (by its suffix), merged by the job's
finish from the parts the units committed (serving/jobs/parts.py), with
``OUT.errors.csv`` beside it.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterator, Sequence

from serving.core.errors import InputError

OUTPUT_SUFFIXES = (".parquet", ".csv")
INT_COLUMNS = ("x", "y", "col", "row", "version")


def check_output(path: str | Path) -> Path:
    p = Path(path)
    if p.suffix.lower() not in OUTPUT_SUFFIXES:
        raise InputError(f"--out: {p} must end in .parquet or .csv")
    return p


def errors_path(out: Path) -> Path:
    """``results.parquet.errors.csv`` beside ``results.parquet``: named from the whole output path, so
    ``results.parquet`` and ``results.csv`` in one folder never share (and overwrite) one errors file."""
    out = Path(out)
    return out.with_name(out.name + ".errors.csv")


def parts_path(out: Path) -> Path:
    """``results.parquet.parts/`` beside the output: where units commit their parts until the finish merges them."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


FEATURES_COLUMN = "features"


def result_columns(class_names: tuple[str, ...], features: bool = False) -> list[str]:
    """One row per patch: its source (and slide name, for slide tiles), where in the slide, the class
    probabilities, the predicted and the true class, what scored it, and with ``features`` its features."""
    return ["source", "slide", "x", "y", "col", "row", *[f"prob_{c}" for c in class_names], "predicted", "label",
            "tta", "model", "version", *([FEATURES_COLUMN] if features else [])]


def result_schema(columns: list[str], feature_size: int = 0):
    """The Arrow schema of the rows (probabilities float64; positions int64, null for patches; the features a
    fixed-size list of ``feature_size`` float32)."""
    import pyarrow as pa

    strings = ("source", "slide", "predicted", "label", "tta", "model")

    def kind(c):
        if c == FEATURES_COLUMN:
            return pa.list_(pa.float32(), feature_size)
        return pa.string() if c in strings else pa.int64() if c in INT_COLUMNS else pa.float64()

    return pa.schema([(c, kind(c)) for c in columns])


def iter_results(path: str | Path, columns: Sequence[str] | None = None,
                 batch_rows: int = 65536) -> Iterator[dict[str, Any]]:
    """The rows of a finished output file, streamed as dicts (numbers parsed for CSV).

    Memory stays bounded by ``batch_rows`` whatever the file's size.
    """
    p = Path(path)
    if p.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(p).iter_batches(batch_size=batch_rows, columns=columns):
            yield from batch.to_pylist()
        return
    keep = set(columns) if columns is not None else None
    with open(p, newline="") as fh:
        for r in csv.DictReader(fh):
            out: dict[str, Any] = {}
            for k, v in r.items():
                if keep is not None and k not in keep:
                    continue
                if k in INT_COLUMNS:
                    out[k] = int(v) if v != "" else None
                elif k.startswith("prob_"):
                    out[k] = float(v)
                else:
                    out[k] = v if v != "" else None
            yield out


def count_results(path: str | Path) -> int:
    """Rows in a finished output file, without reading them (Parquet metadata)."""
    p = Path(path)
    if p.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(p).metadata.num_rows
    with open(p, newline="") as fh:
        return sum(1 for _ in csv.reader(fh)) - 1


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a finished output file, as dicts (for small files and tests)."""
    return list(iter_results(path))
