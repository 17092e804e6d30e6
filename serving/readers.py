"""Background readers for every input kind, in order, with bounded memory.

A work unit (a data set or a slide) yields small read tasks in a fixed order;
:class:`OrderedReader` runs them on a thread pool while the caller talks to
the server, holding at most ``depth`` finished or running tasks, and hands the
items back in the order the tasks were made. One bad item becomes an item
with an ``error``; the job goes on.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from serving.errors import ImageReadError, PatchserveError
from serving.fingerprint import file_entry
from serving.imageio import DALI_SAFE_MODES, DEFAULT_MAX_IMAGE_PIXELS, load_rgb_u8, read_header
from serving.preprocess import prepare_u8
from serving.slide_reader import read_tiles
from serving.slides import SlideGrid, SlideHandles
from serving.sources import Dataset, parse_hdf5_source, read_hdf5_rows
from serving.spec import ModelSpec

Task = Callable[[], list["Item"]]
_END = object()
ENCODED_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")  # what the ensemble's decoder takes: PNG, JPEG
ENCODED_MODES = DALI_SAFE_MODES  # modes DALI decodes as the reference does


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
    image: np.ndarray | None = None  # uint8 HWC, prepared (serving/preprocess.py): input or source size
    data: bytes | None = None  # encoded file bytes (--send encoded)
    error: str | None = None


class DatasetUnit:
    """Patches of a folder tree, image folder, manifest or HDF5 file, through the reference preprocessing.

    Pixels: decoded (header limits first), equalised for grey-scale models,
    then the spec's geometry. Encoded: only the header is read (format and
    pixel limit), the bytes go to the server undecoded.
    """

    def __init__(self, key: str, dataset: Dataset, spec: ModelSpec, encoded: bool = False, chunk: int = 16,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self.key, self.dataset, self.spec, self.encoded, self.chunk = key, dataset, spec, encoded, chunk
        self.max_pixels = max_pixels

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
                if self.encoded:
                    # The header only: the server decodes the pixels, the client must not do it twice.
                    header = read_header(src, max_pixels=self.max_pixels)
                    if header.format not in ("PNG", "JPEG"):
                        raise ImageReadError(f"{src}: --send encoded takes PNG or JPEG files only, got "
                                             f"{header.format}")
                    if header.mode not in ENCODED_MODES:
                        # The server's DALI decoder would not apply the decode rule (alpha over white,
                        # palette, 16-bit, CMYK) the way serving/imageio.py does: refuse, never drift.
                        raise ImageReadError(f"{src}: --send encoded takes RGB or grey images; this one is "
                                             f"{header.mode} (use --send pixels)")
                    data = Path(src).read_bytes()
                    if not data.startswith(ENCODED_MAGIC):
                        raise ImageReadError(f"{src}: --send encoded takes PNG or JPEG files only")
                    item.data = data
                else:
                    item.image = prepare_u8(load_rgb_u8(src, max_pixels=self.max_pixels), self.spec)
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
                     image=prepare_u8(rows[j], self.spec)) for j, i in enumerate(range(lo, hi))]

    def listing(self) -> list[str]:
        """Fingerprint lines: each file with size, mtime and label; an HDF5 file once, with its row count."""
        if self.dataset.kind == "hdf5":
            n = len(self)
            files = dict.fromkeys(parse_hdf5_source(s.source)[0] for s in self.dataset.samples)
            labels = hashlib.sha256(self.dataset.labels().tobytes()).hexdigest() if self.dataset.labelled else "-"
            return [file_entry(f, n, labels) for f in files] if files else [f"{self.key}\tempty"]
        return [file_entry(s.source, "-" if s.label is None else s.label) for s in self.dataset.samples]

    def tasks(self, start: int) -> Iterator[Task]:
        read = self._read_hdf5 if self.dataset.kind == "hdf5" else self._read_files
        n = len(self)
        for lo in range(start, n, self.chunk):
            yield lambda lo=lo: read(lo, min(lo + self.chunk, n))


class SlideUnit:
    """The tissue tiles of one slide, read with a per-thread OpenSlide handle.

    Tiles come at the grid's patch size (the input size, or the source size
    for TTA), where the geometry is the identity; grey-scale models get the
    equalisation at the read resolution, before the resize, as every path.
    """

    def __init__(self, key: str, grid: SlideGrid, handles: SlideHandles, chunk: int = 32, equalize: bool = False):
        self.key, self.grid, self.handles, self.chunk, self.equalize = key, grid, handles, chunk, equalize

    def __len__(self) -> int:
        return len(self.grid.tiles)

    def listing(self) -> list[str]:
        """Fingerprint line: the slide file and its tile grid (geometry and the kept tiles)."""
        g = self.grid
        tiles = hashlib.sha256(np.array([(t.x, t.y) for t in g.tiles], np.int64).tobytes()).hexdigest()
        return [file_entry(g.path, f"{g.cols}x{g.rows}", len(g.tiles), f"{g.target_mpp:.6g}", g.read_level,
                           f"{g.patch_hw[0]}x{g.patch_hw[1]}", tiles)]

    def _reopen(self):
        # After a failed tile OpenSlide's handle keeps failing: a fresh one for the rest.
        self.handles.reopen(self.grid.path)
        return self.handles.get(self.grid.path)

    def _read(self, lo: int, hi: int) -> list[Item]:
        tiles = self.grid.tiles[lo:hi]
        try:
            # One read_region per run of adjacent tiles (serving/slide_reader.py).
            got = read_tiles(self.handles.get(self.grid.path), self.grid, tiles, equalize=self.equalize,
                             reopen=self._reopen)
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
