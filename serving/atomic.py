"""Atomic file writes: a reader sees the old file or the new one, never half."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
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
