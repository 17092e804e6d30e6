"""The fingerprint of a scoring job: what was served, how, and to which inputs.

Written when a job starts (``OUT.job.json``, named from the whole output
path) and compared field by field on ``--resume``, so a resumed job never
mixes rows of other weights, other options or another input listing with the
rows already written. The served model's identity (name, version, weights'
hash from the server's config, spec hash) is also what every ``--url``
server, and a server that comes back mid-job, is checked against.

The job's preamble (serving/jobs/engine.py) builds the listing, makes a
:class:`JobFingerprint`, writes the record before the first part, and calls
:func:`check_resume` on a resume, whichever executor runs the units. The
finish adds what each slide was read at (``slides``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from serving.client.identity import ServedIdentity
from serving.core.atomic import atomic_write_text
from serving.core.errors import FingerprintMismatchError
from serving.core.hashing import canonical_json, listing_digest, sha256_text

JOB_SUFFIX = ".job.json"
# 2: parts committed per unit (serving/jobs/parts.py) by both executors. A format-1 record belongs to an
# older patchserve's layouts (one merged parts folder, or a Parquet dataset folder), which this one cannot continue.
RECORD_FORMAT = 2


@dataclass(frozen=True)
class JobFingerprint:
    """Everything that decides a job's rows; hashed from canonical JSON."""

    model: str
    model_version: int
    weights_sha256: str
    spec_sha256: str
    options: str  # canonical JSON of the scoring options (TTA, sending, split, tiling ...)
    inputs_sha256: str
    inputs_count: int

    @classmethod
    def build(cls, served: ServedIdentity, options: dict, listing: list[str]) -> "JobFingerprint":
        return cls(served.model, served.version, served.weights_sha256, served.spec_sha256, canonical_json(options),
                   listing_digest(listing), len(listing))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "JobFingerprint":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def digest(self) -> str:
        return sha256_text(canonical_json(self.to_dict()))

    def differences(self, other: "JobFingerprint") -> list[str]:
        """What differs from ``other`` (the job asked for now), field by field; inputs are left to the caller."""
        out = []
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a == b or f.name in ("inputs_sha256", "inputs_count"):
                continue
            if f.name == "options":
                a, b = json.loads(a), json.loads(b)
                keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                out += [f"option {k}: {a.get(k)!r} then, {b.get(k)!r} now" for k in keys]
            else:
                out.append(f"{f.name}: {a!r} then, {b!r} now")
        return out


def job_path(out: str | Path) -> Path:
    """``out.parquet`` -> ``out.parquet.job.json``."""
    out = Path(out)
    return out.with_name(out.name + JOB_SUFFIX)


def write_job_record(out: str | Path, fp: JobFingerprint, listing: list[str], **extra) -> Path:
    """The record a job keeps beside its output (``extra``: what the finish adds, such as ``slides``)."""
    record = {"format": RECORD_FORMAT, "fingerprint": fp.to_dict(), "digest": fp.digest(), "listing": list(listing),
              **extra}
    return atomic_write_text(job_path(out), json.dumps(record) + "\n")


def read_job_record(out: str | Path) -> tuple[JobFingerprint, list[str]] | None:
    """The fingerprint and listing a job wrote, or None when there is no record."""
    p = job_path(out)
    if not p.is_file():
        return None
    try:
        record = json.loads(p.read_text())
        fmt = record.get("format")
        fp, listing = JobFingerprint.from_dict(record["fingerprint"]), list(record["listing"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FingerprintMismatchError(f"--resume: {p} is not a readable job record ({exc}); start over with "
                                       "--overwrite") from exc
    if fmt != RECORD_FORMAT:
        raise FingerprintMismatchError(f"--resume: {p} is a job record of format {fmt!r}, written by an older "
                                       f"patchserve whose parts this one cannot continue (format {RECORD_FORMAT}); "
                                       "finish the job with that version, or start over with --overwrite")
    return fp, listing


def _by_path(listing: list[str]) -> dict[str, str]:
    return {e.split("\t", 1)[0]: e for e in listing}


def listing_changes(then: list[str], now: list[str]) -> tuple[int, int, int]:
    """(new, missing, changed) inputs between two listings, by path."""
    a, b = _by_path(then), _by_path(now)
    new = sum(1 for k in b if k not in a)
    missing = sum(1 for k in a if k not in b)
    changed = sum(1 for k in a if k in b and a[k] != b[k])
    return new, missing, changed


def check_resume(out: str | Path, stored: JobFingerprint, stored_listing: list[str], current: JobFingerprint,
                 current_listing: list[str]) -> None:
    """FingerprintMismatchError saying what differs between the job on disk and the one asked for."""
    if stored == current:
        return
    why = stored.differences(current)
    if stored.inputs_sha256 != current.inputs_sha256:
        new, missing, changed = listing_changes(stored_listing, current_listing)
        if new or missing or changed:
            why.append(f"inputs: {new} new, {missing} missing, {changed} changed (size or modification time) "
                       "since the job started")
        else:
            why.append("inputs: the same inputs in another order")
    raise FingerprintMismatchError(
        f"--resume: {out} was started with something else, so its rows cannot be continued: " + "; ".join(why)
        + ". Nothing was changed; score into another --out, or start over with --overwrite")
