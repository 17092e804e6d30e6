"""Result rows streamed to Parquet or CSV in parts, resumable, merged at the end.

``FILE.parts/`` holds ``part-00000.parquet`` (or ``.csv``) files and a
``manifest.json``; the manifest is rewritten atomically after each part and is
the commit point: it lists the parts, how many items of every work unit they
cover, and the errors met so far. A resumed job reads it, drops any part it
does not list, and skips the items already covered, so no row is lost or
repeated.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any, Iterator, Sequence

from serving.atomic import atomic_path, atomic_write_text
from serving.errors import InputError

OUTPUT_SUFFIXES = (".parquet", ".csv")
MANIFEST = "manifest.json"


class JobStopped(Exception):
    """Raised after ``stop_after_parts`` parts: the job stops as if interrupted."""


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


def result_columns(class_names: tuple[str, ...]) -> list[str]:
    return ["source", "x", "y", "col", "row", *[f"prob_{c}" for c in class_names], "predicted", "label",
            "tta", "model", "version"]


def _schema(columns: list[str]):
    import pyarrow as pa

    types = {"source": pa.string(), "x": pa.int64(), "y": pa.int64(), "col": pa.int64(), "row": pa.int64(),
             "predicted": pa.string(), "label": pa.string(), "tta": pa.string(), "model": pa.string(),
             "version": pa.int64()}
    return pa.schema([(c, types.get(c, pa.float64())) for c in columns])


class PartWriter:
    """Buffer rows, write them as atomic parts, remember progress per work unit."""

    def __init__(self, out: str | Path, columns: list[str], *, fingerprint: dict, resume: bool = False,
                 part_rows: int = 4096, stop_after_parts: int | None = None):
        self.out = check_output(out)
        self.fmt = self.out.suffix.lower().lstrip(".")
        self.columns = columns
        self.parts_dir = self.out.with_name(self.out.name + ".parts")
        self.part_rows = max(1, part_rows)
        self.stop_after_parts = stop_after_parts
        self.fingerprint = fingerprint
        self._rows: list[dict] = []
        self._pending: dict[str, int] = {}
        self._pending_errors: list[list[str]] = []
        self._written_now = 0
        manifest_file = self.parts_dir / MANIFEST
        if resume and manifest_file.is_file():
            self.manifest = json.loads(manifest_file.read_text())
            if self.manifest.get("fingerprint") != fingerprint:
                diff = sorted(k for k in set(fingerprint) | set(self.manifest.get("fingerprint", {}))
                              if fingerprint.get(k) != self.manifest.get("fingerprint", {}).get(k))
                raise InputError(f"--resume: {self.parts_dir} was written with different settings ({', '.join(diff)}); "
                                 "run again with the same options, or without --resume to start over")
            listed = set(self.manifest["parts"])
            for f in self.parts_dir.iterdir():  # parts written after the last commit point
                if f.name != MANIFEST and f.name not in listed:
                    f.unlink()
        else:
            if self.parts_dir.exists():
                shutil.rmtree(self.parts_dir)
            self.parts_dir.mkdir(parents=True)
            self.manifest = {"fingerprint": fingerprint, "parts": [], "progress": {}, "errors": []}
            self._save_manifest()

    def done(self, unit: str) -> int:
        """How many items of ``unit`` earlier runs committed."""
        return int(self.manifest["progress"].get(unit, 0))

    @property
    def rows_committed(self) -> int:
        return int(self.manifest.get("rows", 0))

    def add(self, unit: str, row: dict | None = None, error: tuple[str, str] | None = None) -> None:
        """Record one item of ``unit``: a result row or an error (source, reason)."""
        if row is not None:
            self._rows.append(row)
        if error is not None:
            self._pending_errors.append(list(error))
        self._pending[unit] = self._pending.get(unit, self.done(unit)) + 1
        if len(self._rows) >= self.part_rows:
            self.commit()

    def commit(self) -> None:
        """Write buffered rows as one part, then move the commit point past them."""
        if not self._rows and not self._pending:
            return
        if self._rows:
            name = f"part-{len(self.manifest['parts']):05d}.{self.fmt}"
            self._write(self.parts_dir / name, self._rows)
            self.manifest["parts"].append(name)
            self.manifest["rows"] = self.rows_committed + len(self._rows)
        self.manifest["progress"].update(self._pending)
        self.manifest["errors"].extend(self._pending_errors)
        self._save_manifest()
        wrote = bool(self._rows)
        self._rows, self._pending, self._pending_errors = [], {}, []
        if wrote:
            self._written_now += 1
            if self.stop_after_parts is not None and self._written_now >= self.stop_after_parts:
                raise JobStopped(f"stopped after {self._written_now} parts")

    def _save_manifest(self) -> None:
        atomic_write_text(self.parts_dir / MANIFEST, json.dumps(self.manifest))

    def _write(self, path: Path, rows: list[dict]) -> None:
        with atomic_path(path) as tmp:
            if self.fmt == "parquet":
                import pyarrow as pa
                import pyarrow.parquet as pq

                pq.write_table(pa.Table.from_pylist(rows, schema=_schema(self.columns)), tmp)
            else:
                with open(tmp, "w", newline="") as fh:
                    w = csv.DictWriter(fh, self.columns)
                    w.writeheader()
                    w.writerows(rows)

    def errors(self) -> list[list[str]]:
        return list(self.manifest["errors"])

    def finish(self) -> Path:
        """Merge every part into the output file (atomically), write the errors file, drop the parts."""
        self.commit()
        parts = [self.parts_dir / p for p in self.manifest["parts"]]
        with atomic_path(self.out) as tmp:
            if self.fmt == "parquet":
                import pyarrow.parquet as pq

                with pq.ParquetWriter(tmp, _schema(self.columns)) as w:
                    for p in parts:
                        w.write_table(pq.read_table(p, schema=_schema(self.columns)))
            else:
                with open(tmp, "w", newline="") as fh:
                    fh.write(",".join(self.columns) + "\n")
                    for p in parts:
                        with open(p, newline="") as src:
                            next(src)
                            shutil.copyfileobj(src, fh)
        with atomic_path(errors_path(self.out)) as tmp:
            with open(tmp, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["source", "reason"])
                w.writerows(self.manifest["errors"])
        shutil.rmtree(self.parts_dir)
        return self.out


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
                if k in ("x", "y", "col", "row", "version"):
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
