"""When progress bars show: asked for, and only on a terminal."""

from __future__ import annotations


def bar_disable(progress: bool) -> bool | None:
    """tqdm's ``disable``: ``None`` lets tqdm hide the bar when the stream is not a TTY.

    Redirected to a file or a CI log, a bar is a stream of carriage returns;
    the per-epoch and final summary lines are printed apart and stay.
    """
    return None if progress else True
