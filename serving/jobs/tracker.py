"""What a running job watches: its progress bar, the parts committed in this run, the units' reports."""

from __future__ import annotations

import threading
import time

from serving.core.progress import bar_disable
from serving.jobs.parts import PartMeta
from serving.jobs.scorer import UnitReport


class Tracker:
    """Thread-safe: units report from several threads (local executor) or as Dask futures complete.

    The bar counts patches when the executor reports them as they are scored
    (this process), else units; its total grows as slides are tiled.
    """

    def __init__(self, *, total: int, done: int, unit: str, progress: bool, stop_after_parts: int | None = None):
        from tqdm import tqdm

        self._lock = threading.Lock()
        self.unit_name, self.initial, self.shown = unit, done, done
        self.bar = tqdm(total=total, initial=done, unit=unit, disable=bar_disable(progress), dynamic_ncols=True)
        self.stop_after_parts = stop_after_parts
        self.stop = threading.Event()
        self.parts = 0
        self.patches = 0
        self.refused = 0
        self.errors = 0
        self.reports: list[UnitReport] = []
        self.start = time.perf_counter()

    def start_clock(self) -> None:
        self.start = time.perf_counter()

    @property
    def stopped_by_parts(self) -> bool:
        return self.stop_after_parts is not None and self.parts >= self.stop_after_parts

    def add_total(self, n: int) -> None:
        with self._lock:
            self.bar.total = (self.bar.total or 0) + n
            if not self.bar.disable:
                self.bar.refresh()

    def scored(self, n: int) -> None:
        """``n`` patches came back (the bar counts patches)."""
        with self._lock:
            self.bar.update(n)
            self.shown += n
            self._postfix()

    def part(self, meta: PartMeta) -> None:
        with self._lock:
            self.parts += 1
            if self.stopped_by_parts:
                self.stop.set()

    def unit(self, report: UnitReport, *, bar_counts_units: bool = False) -> None:
        with self._lock:
            self.reports.append(report)
            self.patches += report.scored
            self.refused += report.refused
            self.errors += len(report.errors)
            if bar_counts_units:
                self.bar.update(1)
            self._postfix()

    def _postfix(self) -> None:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        patches = self.patches if self.unit_name == "unit" else self.shown - self.initial
        self.bar.set_postfix_str(f"{patches / seconds:.1f} patches/s, {self.errors} errors", refresh=False)

    def close(self) -> None:
        self.bar.close()
