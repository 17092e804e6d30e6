"""One job per output: an OS-level lock held for the whole life of a job.

``fcntl.flock`` on ``OUT.lock`` (named from the whole output path, so
``out.parquet`` and ``out.csv`` never share one). The kernel drops the lock
when the holding process dies, SIGKILL included, so a crashed job never leaves
a stale lock; the file itself only carries the holder's PID for the message a
second job prints. A distributed job (many writers of one output) takes the
lock once, in the process that plans and commits the parts.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from serving.core.errors import JobLockedError

LOCK_SUFFIX = ".lock"


def lock_path(out: str | Path) -> Path:
    """``out.parquet`` -> ``out.parquet.lock`` beside it."""
    out = Path(out)
    return out.with_name(out.name + LOCK_SUFFIX)


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        return "another process"
    return f"process {pid}" if pid.isdigit() else "another process"


class JobLock:
    """Exclusive, non-blocking lock on an output; use as a context manager.

    ``acquire`` raises :class:`JobLockedError` at once, naming the PID that
    holds the lock, when another job runs on the same output.
    """

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.path = lock_path(self.out)
        self._fd: int | None = None

    def acquire(self) -> "JobLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise JobLockedError(f"--out {self.out}: another job is writing it ({_holder(self.path)} holds "
                                     f"{self.path}); wait for it to finish or stop it first") from None
            # The previous holder may have unlinked the file between our open and
            # our lock: then we hold a lock nobody else can see. Start again.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file (still holding the lock, so no one can take a stale one), then unlock."""
        if self._fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "JobLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
