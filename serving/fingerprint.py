"""The fingerprint of a scoring job: what was served, how, and to which inputs.

Written when a job starts (``OUT.job.json``, named from the whole output
path) and compared field by field on ``--resume``, so a resumed job never
mixes rows of other weights, other options or another input listing with the
rows already written. The served model's identity (name, version, weights'
hash from the server's config, spec hash) is also what every ``--url``
server, and a server that comes back mid-job, is checked against.

Reusable by any driver of a job (in-process or distributed): build the
listing, make a :class:`JobFingerprint`, :func:`write_job_record` before the
first part, and :func:`check_resume` on a resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from serving.atomic import atomic_write_text
from serving.errors import FingerprintMismatchError, ServerMismatchError
from serving.spec import ModelSpec

JOB_SUFFIX = ".job.json"
RECORD_FORMAT = 1


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def spec_sha256(spec: ModelSpec) -> str:
    """Hash of the spec's canonical JSON: equal specs hash equal whatever their key order."""
    return sha256_text(canonical_json(spec.to_dict()))


def file_entry(path: str | Path, *extra: object) -> str:
    """One listing line: ``path<TAB>size<TAB>mtime_ns[<TAB>extra...]`` (a missing file lists as -1 -1)."""
    try:
        st = os.stat(path)
        size, mtime = st.st_size, st.st_mtime_ns
    except OSError:
        size = mtime = -1
    return "\t".join(str(v) for v in (path, size, mtime, *extra))


def listing_digest(entries: list[str]) -> str:
    """Order matters: progress is recorded by position in the listing."""
    return sha256_text("\n".join(entries))


@dataclass(frozen=True)
class ServedIdentity:
    """What one server serves under the job's model name."""

    model: str
    version: int
    weights_sha256: str  # from the config's parameters; "" for a repository exported without it
    spec_sha256: str

    def differences(self, other: "ServedIdentity") -> list[str]:
        return [f"{f.name} {getattr(self, f.name)!r} vs {getattr(other, f.name)!r}"
                for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def check_servers(identities: dict[str, ServedIdentity]) -> ServedIdentity:
    """The identity all servers share; ServerMismatchError naming each disagreeing server and field."""
    urls = list(identities)
    first = identities[urls[0]]
    bad = [f"{u} differs from {urls[0]}: {'; '.join(identities[u].differences(first))}"
           for u in urls[1:] if identities[u] != first]
    if bad:
        raise ServerMismatchError("--url: the servers do not serve the same model, so their rows cannot be mixed: "
                                  + " / ".join(bad) + ". Nothing was written")
    return first


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


def write_job_record(out: str | Path, fp: JobFingerprint, listing: list[str]) -> Path:
    record = {"format": RECORD_FORMAT, "fingerprint": fp.to_dict(), "digest": fp.digest(), "listing": listing}
    return atomic_write_text(job_path(out), json.dumps(record) + "\n")


def read_job_record(out: str | Path) -> tuple[JobFingerprint, list[str]] | None:
    """The fingerprint and listing a job wrote, or None when there is no record."""
    p = job_path(out)
    if not p.is_file():
        return None
    try:
        record = json.loads(p.read_text())
        return JobFingerprint.from_dict(record["fingerprint"]), list(record["listing"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FingerprintMismatchError(f"--resume: {p} is not a readable job record ({exc}); start over with "
                                       "--overwrite") from exc


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
