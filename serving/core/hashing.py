"""Canonical JSON, hashes, and the listing lines that fingerprint a job's inputs."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


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
