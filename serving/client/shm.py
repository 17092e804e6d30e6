"""System shared memory for tensors the client passes to a local server.

Regions hold patients' pixels: they are created new (never an existing region
of the same name), with owner-only permissions, under an unguessable name
that carries the creating PID, so a region a SIGKILLed client left behind can
be told apart and removed by the next client of this host.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from pathlib import Path

from serving.core.procs import SHM_DIR, process_gone

PREFIX = "patchserve_"
_NAME = re.compile(r"patchserve_(\d+)_[0-9a-f]+_\d+_(?:in|out)\Z")


def create_private_region(kind: str, index: int, size: int):
    """A new region readable by this user only; returns (name, tritonclient handle)."""
    import tritonclient.utils.shared_memory as shm

    name = f"{PREFIX}{os.getpid()}_{secrets.token_hex(8)}_{index}_{kind}"
    handle = shm.create_shared_memory_region(name, "/" + name, size, create_only=True)
    path = SHM_DIR / name
    if path.exists() and stat.S_IMODE(path.stat().st_mode) & 0o077:
        path.chmod(0o600)  # a permissive umask is no reason to share pixels
    return name, handle


def remove_stale_regions(shm_dir: Path = SHM_DIR) -> list[Path]:
    """Unlink this user's patchserve regions whose creating process is gone; return what was removed."""
    removed = []
    if not shm_dir.is_dir():
        return removed
    uid = os.getuid()
    for p in shm_dir.glob(PREFIX + "*"):
        m = _NAME.match(p.name)
        try:
            if m and p.stat().st_uid == uid and process_gone(int(m.group(1))):
                p.unlink()
                removed.append(p)
        except OSError:
            continue
    return removed
