"""Find (or install) another CPython for the install tests; fail loudly, never skip, when none can be had."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


def _version_of(python: Path) -> str | None:
    try:
        out = subprocess.run([str(python), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _candidates(version: str) -> list[Path]:
    found = [Path(p) for p in (shutil.which(f"python{version}"),) if p]
    roots = [Path(os.environ["PYENV_ROOT"])] if os.environ.get("PYENV_ROOT") else []
    roots.append(Path.home() / ".pyenv")
    for root in roots:
        found += sorted((root / "versions").glob(f"{version}.*/bin/python{version}"), reverse=True)
    found += [Path(f"/usr/bin/python{version}"), Path(f"/usr/local/bin/python{version}")]
    return found


def find_python(version: str) -> Path:
    """A working ``python{version}`` with venv: from PATH, pyenv, /usr; else apt-get installs it (as root)."""
    tried = []
    for python in _candidates(version):
        if python.exists():
            got = _version_of(python)
            if got == version:
                return python
            tried.append(f"{python} (runs {got or 'nothing'})")
    apt = ""
    if shutil.which("apt-get") and os.geteuid() == 0:
        proc = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", f"python{version}",
                               f"python{version}-venv"], capture_output=True, text=True, timeout=900)
        if proc.returncode == 0 and _version_of(Path(f"/usr/bin/python{version}")) == version:
            return Path(f"/usr/bin/python{version}")
        apt = f"; apt-get install python{version} failed: {(proc.stderr or proc.stdout).strip()[-300:]}"
    pytest.fail(f"no Python {version} on this machine: looked in PATH, $PYENV_ROOT/versions, ~/.pyenv/versions, "
                f"/usr/bin and /usr/local/bin{' (' + ', '.join(tried) + ')' if tried else ''}{apt}. Install it "
                f"(pyenv install {version}, or the distribution's python{version} package) and run the tests again.",
                pytrace=False)
