"""The commit protocol: every unit commits its rows as Parquet parts, whole or not at all, each item once.

Layout, the same for both executors::

    OUT.parts/unit-000042/part-000004096.parquet    items [4096, stop) of unit 42

A part is published with a hard link (:func:`serving.core.atomic.publish_once`):
it appears whole or not at all, and of two writers of one name (a unit
computed twice by Dask, a straggler of a killed run) the first wins and the
part is never replaced. Its Parquet metadata says what it holds: the job's
fingerprint digest, the unit, the item range ``[start, stop)`` of the unit's
``n`` items, the unit's ``digest`` (what decided its items: a slide's tile
grid), the rows, the errors of the range's unreadable items, and a sha256 of
the rows' content. So a part is its own commit record: a resume lists a
unit's parts, verifies each (readable, its row count, its checksum, this
job's digest), drops what fails, and scores only the items no good part
covers. The finish merges the parts unit by unit into ``OUT``.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from serving.core.atomic import publish_once

PART_KEY = b"patchserve.part"
PART_FORMAT = 1
_PART = re.compile(r"part-(\d{9})\.parquet\Z")


@dataclass(frozen=True)
class PartMeta:
    """What one committed part holds (stored in its Parquet metadata)."""

    job: str  # the job fingerprint's digest
    unit: int
    start: int
    stop: int
    n: int  # items of the whole unit
    unit_digest: str
    rows: int
    errors: tuple[tuple[str, str], ...]
    sha256: str  # of the rows' content (serving/jobs/parts.py table_sha256)
    info: dict = field(default_factory=dict)  # what the unit records about itself (a slide's grid)
    format: int = PART_FORMAT

    def to_json(self) -> str:
        d = asdict(self)
        d["errors"] = [list(e) for e in self.errors]
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: bytes | str) -> "PartMeta":
        d = json.loads(text)
        d["errors"] = tuple(tuple(e) for e in d.get("errors", ()))
        return cls(**d)


def unit_dir(parts_dir: Path, unit: int) -> Path:
    return Path(parts_dir) / f"unit-{unit:06d}"


def part_path(parts_dir: Path, unit: int, start: int) -> Path:
    return unit_dir(parts_dir, unit) / f"part-{start:09d}.parquet"


def _column_bytes(arr) -> bytes:
    """A canonical byte string of one Arrow array's values and nulls (independent of its chunking)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    nulls = np.packbits(arr.is_null().to_numpy(zero_copy_only=False)).tobytes()
    t = arr.type
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        return nulls + lengths.tobytes() + _column_bytes(arr.flatten())
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        values = [v.encode() for v in pc.fill_null(arr, "").to_pylist()]
        return nulls + np.array([len(v) for v in values], np.int64).tobytes() + b"".join(values)
    return nulls + pc.fill_null(arr, 0).to_numpy(zero_copy_only=False).tobytes()


def table_sha256(table) -> str:
    """sha256 of a table's content, column by column (the same for a table and its Parquet round trip)."""
    h = hashlib.sha256()
    for name, col in zip(table.column_names, table.columns):
        h.update(name.encode() + b"\0")
        h.update(_column_bytes(col.combine_chunks()) if col.num_chunks else b"")
    return h.hexdigest()


def write_part(parts_dir: Path, meta: PartMeta, table) -> bool:
    """Publish a part; False when a part of that name was committed first (its rows stand)."""
    import pyarrow.parquet as pq

    path = part_path(parts_dir, meta.unit, meta.start)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = table.replace_schema_metadata({PART_KEY: meta.to_json()})
    with publish_once(path) as (tmp, won):
        pq.write_table(table, tmp)
    return won[0]


def read_meta(path: Path) -> PartMeta | None:
    """A part's metadata from its footer (no rows read); None when the file is not a readable part."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(path).metadata or {}
        return PartMeta.from_json(meta[PART_KEY])
    except (OSError, ValueError, KeyError, TypeError):  # ArrowInvalid is a ValueError
        return None


def verify_part(path: Path, meta: PartMeta, columns: Sequence[str]):
    """The part's rows if they are whole (row count, checksum, the job's columns), else None."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError):
        return None
    if table.num_rows != meta.rows or table.column_names != list(columns) or table_sha256(table) != meta.sha256:
        return None
    return table


@dataclass
class UnitParts:
    """A unit's committed parts, as found on disk: the good ones by start, and what was wrong with others."""

    unit: int
    good: list[tuple[Path, PartMeta]] = field(default_factory=list)
    bad: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def n(self) -> int | None:
        return self.good[0][1].n if self.good else None


def list_unit(parts_dir: Path, unit: int, job: str, columns: Sequence[str], *, verify: bool) -> UnitParts:
    """The parts of ``unit``: each of this job and readable (with ``verify``, its rows checked too), else bad."""
    found = UnitParts(unit)
    folder = unit_dir(parts_dir, unit)
    if not folder.is_dir():
        return found
    for path in sorted(folder.iterdir()):
        m = _PART.match(path.name)
        if m is None:
            continue  # a writer's temporary file, or something that is not ours: never merged
        meta = read_meta(path)
        if meta is None:
            found.bad.append((path, "unreadable (truncated or not a Parquet part)"))
        elif meta.job != job or meta.unit != unit or meta.start != int(m.group(1)):
            found.bad.append((path, "written by another job"))
        elif verify and verify_part(path, meta, columns) is None:
            found.bad.append((path, f"damaged (its {meta.rows} rows do not match their count or checksum)"))
        else:
            found.good.append((path, meta))
    return found


def cover(parts: Sequence[tuple[Path, PartMeta]], n: int, digest: str | None = None
          ) -> tuple[list[tuple[Path, PartMeta]], list[tuple[int, int]]]:
    """Parts that cover items of ``[0, n)`` without overlap (by start), and the ranges no part covers.

    Parts of another unit digest (``digest`` given) or another size are left out: they are stale.
    """
    chosen: list[tuple[Path, PartMeta]] = []
    todo: list[tuple[int, int]] = []
    at = 0
    for path, meta in sorted(parts, key=lambda pm: (pm[1].start, -pm[1].stop)):
        if meta.n != n or (digest is not None and meta.unit_digest != digest) or meta.start < at:
            continue
        if meta.start > at:
            todo.append((at, meta.start))
        chosen.append((path, meta))
        at = meta.stop
    if at < n:
        todo.append((at, n))
    return chosen, todo


def remove(paths: Sequence[Path]) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


def remove_parts(parts_dir: Path) -> None:
    shutil.rmtree(parts_dir, ignore_errors=True)
