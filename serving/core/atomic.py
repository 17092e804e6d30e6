"""Atomic file writes: a reader sees the old file or the new one, never half."""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _new_temporary(path: Path) -> Path:
    """An empty, new file beside ``path``, mode 0666 less the umask."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp_path = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.part"
        try:
            fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    os.close(fd)
    return tmp_path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` on success.

    The file is created with mode 0666 less the user's umask, like any other
    file the user writes (``tempfile.mkstemp`` would make it 0600 and the
    rename would keep that, so colleagues could not read a shared run).
    """
    tmp_path = _new_temporary(Path(path))
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def publish_once(path: str | Path) -> Iterator[tuple[Path, list[bool]]]:
    """Yield a temporary path beside ``path``; hard-link it to ``path`` unless ``path`` exists.

    The link is the commit: of two writers racing to publish the same file
    (a unit computed twice), exactly one wins and the file is never replaced.
    ``won[0]`` says, after the block, whether this writer's file was published.
    """
    path = Path(path)
    tmp_path = _new_temporary(path)  # umask-respecting like atomic_path: parts are shared with colleagues
    won = [False]
    try:
        yield tmp_path, won
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        try:
            os.link(tmp_path, path)
            won[0] = True
        except FileExistsError:
            pass
    finally:
        tmp_path.unlink(missing_ok=True)
