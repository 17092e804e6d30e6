"""Background readers for every input kind, in order, with bounded memory.

A work unit (a data set or a slide) yields small read tasks in a fixed order;
:class:`OrderedReader` runs them on a thread pool while the caller talks to
the server, holding at most ``depth`` finished or running tasks, and hands the
items back in the order the tasks were made. One bad item becomes an item
with an ``error``; the job goes on.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from serving.errors import ImageReadError, PatchserveError
from serving.imageio import load_rgb_u8, resize_u8
from serving.slide_reader import read_tiles
from serving.slides import SlideGrid, SlideHandles
from serving.sources import Dataset, parse_hdf5_source, read_hdf5_rows

Task = Callable[[], list["Item"]]
_END = object()
ENCODED_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")  # what the ensemble's decoder takes: PNG, JPEG


@dataclass
class Item:
    """One patch, or the reason it could not be read."""

    unit: str
    index: int  # position in its unit: resume skips the first ``done`` of them
    source: str
    label: str | None = None
    x: int | None = None
    y: int | None = None
    col: int | None = None
    row: int | None = None
    image: np.ndarray | None = None  # uint8 HWC
    data: bytes | None = None  # encoded file bytes (--send encoded)
    error: str | None = None


class DatasetUnit:
    """Patches of a folder tree, image folder, manifest or HDF5 file."""

    def __init__(self, key: str, dataset: Dataset, patch_hw: tuple[int, int], encoded: bool = False,
                 chunk: int = 16):
        self.key, self.dataset, self.patch_hw, self.encoded, self.chunk = key, dataset, patch_hw, encoded, chunk

    def __len__(self) -> int:
        return len(self.dataset.samples)

    def _label(self, i: int) -> str | None:
        s = self.dataset.samples[i]
        return None if s.label is None or self.dataset.classes is None else self.dataset.classes[s.label]

    def _read_files(self, lo: int, hi: int) -> list[Item]:
        out = []
        for i in range(lo, hi):
            src = self.dataset.samples[i].source
            item = Item(self.key, i, src, self._label(i))
            try:
                img = load_rgb_u8(src)  # decodes fully: corrupt files fail here, not on the server
                if self.encoded:
                    data = Path(src).read_bytes()
                    if not data.startswith(ENCODED_MAGIC):
                        raise ImageReadError(f"{src}: --send encoded takes PNG or JPEG files only")
                    item.data = data
                else:
                    item.image = resize_u8(img, self.patch_hw)
            except (PatchserveError, OSError) as exc:
                item.error = str(exc)
            out.append(item)
        return out

    def _read_hdf5(self, lo: int, hi: int) -> list[Item]:
        parsed = [parse_hdf5_source(self.dataset.samples[i].source) for i in range(lo, hi)]
        xpath = parsed[0][0]
        try:
            rows = read_hdf5_rows(xpath, np.array([p[1] for p in parsed]))
        except (OSError, KeyError, ValueError) as exc:
            return [Item(self.key, i, self.dataset.samples[i].source, self._label(i), error=f"{xpath}: {exc}")
                    for i in range(lo, hi)]
        return [Item(self.key, i, self.dataset.samples[i].source, self._label(i),
                     image=resize_u8(rows[j], self.patch_hw)) for j, i in enumerate(range(lo, hi))]

    def tasks(self, start: int) -> Iterator[Task]:
        read = self._read_hdf5 if self.dataset.kind == "hdf5" else self._read_files
        n = len(self)
        for lo in range(start, n, self.chunk):
            yield lambda lo=lo: read(lo, min(lo + self.chunk, n))


class SlideUnit:
    """The tissue tiles of one slide, read with a per-thread OpenSlide handle."""

    def __init__(self, key: str, grid: SlideGrid, handles: SlideHandles, chunk: int = 32):
        self.key, self.grid, self.handles, self.chunk = key, grid, handles, chunk

    def __len__(self) -> int:
        return len(self.grid.tiles)

    def _read(self, lo: int, hi: int) -> list[Item]:
        tiles = self.grid.tiles[lo:hi]
        try:
            # One read_region per run of adjacent tiles (serving/slide_reader.py).
            got = read_tiles(self.handles.get(self.grid.path), self.grid, tiles)
        except Exception as exc:  # noqa: BLE001 - the slide cannot be opened in this thread: every tile fails
            got = [exc] * len(tiles)
        out = []
        for i, t, image in zip(range(lo, hi), tiles, got):
            item = Item(self.key, i, self.grid.path, None, t.x, t.y, t.col, t.row)
            if isinstance(image, Exception):  # OpenSlideError on a damaged tile: record, go on
                item.error = f"{self.grid.path}: tile ({t.x}, {t.y}): {image}"
            else:
                item.image = image
            out.append(item)
        return out

    def tasks(self, start: int) -> Iterator[Task]:
        n = len(self)
        for lo in range(start, n, self.chunk):
            yield lambda lo=lo: self._read(lo, min(lo + self.chunk, n))


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
