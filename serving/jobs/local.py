"""The local executor: the job's units on ``--units-in-flight`` threads of this process.

Each thread keeps its own connections (serving/jobs/scorer.py ``ClientPool``)
and runs the unit scorer, so this executor and the Dask one commit the same
parts. Ctrl-C, SIGTERM and ``--stop-after-parts`` set a stop flag: the units
in flight commit what came back and return, and no new unit starts.
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Sequence

from serving.inputs.units import Unit
from serving.jobs.scorer import ClientPool, RunControl, UnitJob, score_unit
from serving.jobs.tracker import Tracker


class UnitFailures(list):
    """(unit, exception) of units that failed on their own; the others were scored."""


class LocalExecutor:
    """Units on threads of this process, at most ``units_in_flight`` at once, submitted in plan order."""

    bar_unit = "patch"

    def __init__(self, units_in_flight: int):
        self.threads = units_in_flight

    def run(self, job: UnitJob, units: Sequence[Unit], tracker: Tracker, stops: tuple[type, ...]) -> UnitFailures:
        """Score ``units``; an exception of a ``stops`` type stops the job (raised once the units in flight
        have committed what they scored); any other failure of a unit is returned, the rest goes on."""
        pool = ClientPool(job.cfg, job.served)
        control = RunControl(clients=pool.get, progress=tracker.scored, stop=tracker.stop, on_part=tracker.part,
                             grew=tracker.add_total)
        failures = UnitFailures()
        stopping: BaseException | None = None
        todo = iter(units)
        running: dict[Future, Unit] = {}
        executor = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="patchserve-unit")

        def submit_next() -> None:
            unit = next(todo, None)
            if unit is not None:
                running[executor.submit(score_unit, job, unit, control)] = unit

        try:
            for _ in range(self.threads):
                submit_next()
            while running:
                # A timeout, so Ctrl-C reaches this thread while it waits.
                done, _ = wait(list(running), timeout=0.5, return_when=FIRST_COMPLETED)
                for fut in done:
                    unit = running.pop(fut)
                    try:
                        tracker.unit(fut.result())
                    except stops as exc:
                        stopping = stopping or exc
                        control.stop.set()
                    except Exception as exc:  # noqa: BLE001 - one unit's failure (a bug, a full disk) is reported
                        failures.append((unit, exc))
                    if not control.stop.is_set():
                        submit_next()
        except BaseException:
            control.stop.set()  # Ctrl-C, SIGTERM: the units in flight commit what came back
            raise
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
            pool.close()
        if stopping is not None:
            raise stopping
        return failures
