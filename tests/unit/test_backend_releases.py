"""The backend-file policy: every Python-backend file export copies is a registered release (the gate's list)."""

from __future__ import annotations

import hashlib
import re

from export.repository import BACKENDS
from export.check import _BACKEND_SOURCE
from serving.server.backends.released import RELEASED, WITHDRAWN


def test_every_backend_file_export_copies_is_registered_under_a_release():
    for name in sorted(set(_BACKEND_SOURCE.values())):
        digest = hashlib.sha256((BACKENDS / name).read_bytes()).hexdigest()
        assert digest in RELEASED[name], (
            f"serving/server/backends/{name} changed: add its sha256 {digest} to released.py under the version "
            "that ships it (and keep the older ones, so repositories exported before still pass the gate)")
        assert digest not in WITHDRAWN


def test_releases_are_version_numbers_and_withdrawn_files_were_released():
    every = {d: v for files in RELEASED.values() for d, v in files.items()}
    assert all(re.fullmatch(r"\d+\.\d+\.\d+", v) for v in every.values())
    assert all(re.fullmatch(r"[0-9a-f]{64}", d) for d in every)
    assert set(WITHDRAWN) <= set(every) and all(WITHDRAWN.values())
