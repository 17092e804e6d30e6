"""Atomic repository updates: build beside, check, swap in with renames.

Export writes the new model folders into a work folder that is a sibling of
the repository (same filesystem, so renames are atomic; outside it, so
neither Triton nor the gate ever loads a half-written model)::

    PARENT/.REPO.export-<pid>/staging/NAME   the new model folder (other versions hard-linked)
    PARENT/.REPO.export-<pid>/trash/NAME     the old one, after the swap

Each model folder is swapped with ``renameat2(RENAME_EXCHANGE)``: at every
instant ``REPO/NAME`` is the old folder or the new one, complete. Where the
filesystem cannot exchange, two renames are used (the old folder stays whole
in ``trash`` for the instant between them). SIGINT and SIGTERM are held while
the family is swapped, so Ctrl-C cannot leave a classifier of the new run next
to a TTA model of the old one. The next export removes the work folders of
exports that are no longer running.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import signal
import threading
from pathlib import Path

from export.errors import ExportError

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def work_folder(repo: Path) -> Path:
    repo = repo.resolve()
    return repo.parent / f".{repo.name}.export-{os.getpid()}"


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (PID 1 may not reap orphans)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def clean_leftovers(repo: Path) -> list[Path]:
    """Remove the work folders of interrupted exports of ``repo`` (their process is gone)."""
    repo = repo.resolve()
    removed = []
    for folder in repo.parent.glob(f".{repo.name}.export-*"):
        pid = folder.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue  # another export of this repository is running
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def carry_other_versions(old: Path, staged: Path, version: int) -> None:
    """Hard-link the old model folder's other numeric versions into the staged folder."""
    if not old.is_dir():
        return
    for sub in old.iterdir():
        if sub.is_dir() and sub.name.isdigit() and sub.name != str(version) and not (staged / sub.name).exists():
            shutil.copytree(sub, staged / sub.name, copy_function=_link_or_copy, symlinks=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths; False where the kernel or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def signals_held():
    """Defer SIGINT/SIGTERM until the block ends (then they are delivered).

    Blocking the signals with ``pthread_sigmask`` is not enough: it blocks
    them for the calling thread only, the kernel hands a process-directed
    signal to any other thread (torch's, ONNX Runtime's, tqdm's), and Python
    then runs the handler in the main thread anyway. So in the main thread
    the handlers themselves are swapped for one that only records the signal.
    """
    held = (signal.SIGINT, signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread():
        # Python handlers run only in the main thread; here blocking is what can be done.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, held)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        return
    pending: list[int] = []
    old = {s: signal.getsignal(s) for s in held}
    for s in held:
        signal.signal(s, lambda signum, _frame: pending.append(signum))
    try:
        yield
    finally:
        for s in held:
            signal.signal(s, old[s])
        for s in dict.fromkeys(pending):
            # Delivered here, in this frame, by calling the handler that was there before: re-raising
            # the signal would leave its KeyboardInterrupt to the next check for signals, wherever that is.
            if callable(old[s]):
                old[s](s, None)
            elif old[s] == signal.SIG_DFL:
                signal.raise_signal(s)  # the default action: the process ends


def swap_in(repo: Path, work: Path, names: list[str]) -> None:
    """Move every staged model folder into ``repo``, the old ones into ``work/trash``."""
    repo = repo.resolve()
    if os.stat(repo).st_dev != os.stat(work).st_dev:
        raise ExportError(f"{work}: not on the filesystem of {repo}; cannot swap the new models in atomically")
    staging, trash = work / "staging", work / "trash"
    trash.mkdir(exist_ok=True)
    with signals_held():
        for name in names:
            new, final = staging / name, repo / name
            if not final.exists():
                os.rename(new, final)
            elif _exchange(new, final):
                os.rename(new, trash / name)  # ``new`` now names the old folder
            else:
                os.rename(final, trash / name)
                os.rename(new, final)
        _fsync_dir(repo)
    shutil.rmtree(work, ignore_errors=True)
