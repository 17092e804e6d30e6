"""Reading ahead of the requests: read tasks on a thread pool, their items back in order, memory bounded.

:class:`OrderedReader` runs a unit's read tasks (serving/inputs/units.py) on
threads while the caller talks to the server, holding at most ``depth``
finished or running tasks, and hands the items back in the order the tasks
were made.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

from serving.inputs.items import Item, Task

_END = object()


class OrderedReader:
    """Run read tasks on ``threads`` threads; iterate their items in task order."""

    def __init__(self, tasks: Iterator[Task], threads: int = 2, depth: int = 8):
        self._tasks = tasks
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="patchserve-read")
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._feeder = threading.Thread(target=self._feed, name="patchserve-feed", daemon=True)
        self._feeder.start()

    def _put(self, obj) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(obj, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _feed(self) -> None:
        try:
            for task in self._tasks:
                if not self._put(self._pool.submit(task)):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._error = exc
        self._put(_END)

    def __iter__(self) -> Iterator[Item]:
        while True:
            got = self._queue.get()
            if got is _END:
                if self._error is not None:
                    raise self._error
                return
            yield from got.result()

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._feeder.join(timeout=5)

    def __enter__(self) -> "OrderedReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
