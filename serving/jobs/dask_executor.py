"""The Dask executor: one task per unit on a Dask cluster, each committing its own parts.

The submitting process plans the job, holds its lock and records its
fingerprint (serving/jobs/engine.py), then submits every unit with
``client.map`` and consumes them with ``distributed.as_completed``, holding
counts only. Workers run the same unit scorer as the local executor
(serving/jobs/scorer.py): they read their units' inputs, keep their own
connections (one set per worker thread, reused across the job's tasks) and
commit parts into ``OUT.parts/``; a lost worker's task is rerun by the
scheduler and its parts land once.
"""

from __future__ import annotations

import logging
import threading
import uuid
from contextlib import ExitStack
from typing import Sequence

from serving.core.errors import JobError
from serving.inputs.units import Unit
from serving.jobs.local import UnitFailures
from serving.jobs.scorer import ClientPool, RunControl, UnitJob, UnitReport, score_unit
from serving.jobs.tracker import Tracker

_pools: dict[tuple, ClientPool] = {}  # per worker process: the job's connections, by what they connect to
_pools_lock = threading.Lock()


def score_unit_task(job: UnitJob, unit: Unit) -> UnitReport:
    """A Dask task: the unit scorer with this worker's connections for the job."""
    c = job.cfg
    key = (job.served, c.urls, c.model, c.protocol, c.timeout_s, c.retries, c.backoff_s, c.concurrency,
           c.batch_size, c.shared_memory, c.wait, c.wait_timeout_s, c.features)
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            for old in _pools.values():  # another job's connections: this worker moved on
                old.close()
            _pools.clear()
            pool = _pools[key] = ClientPool(c, job.served)
    return score_unit(job, unit, RunControl(clients=pool.get))


class DaskExecutor:
    """Units as tasks of a local cluster (``--workers N``) or an existing one (``--scheduler``)."""

    bar_unit = "unit"

    def __init__(self, dask_cfg, units_in_flight: int, log=print):
        self.dask, self.threads, self.log = dask_cfg, units_in_flight, log

    def _client(self, stack: ExitStack):
        from distributed import Client, LocalCluster

        if self.dask.scheduler is not None:
            client = stack.enter_context(Client(self.dask.scheduler))
        else:
            # Processes, not threads: reading and cutting tiles is Python and PIL work that wants its own cores.
            cluster = stack.enter_context(LocalCluster(
                n_workers=self.dask.workers, threads_per_worker=self.threads, processes=True, host="127.0.0.1",
                dashboard_address=":0", silence_logs=logging.ERROR))
            client = stack.enter_context(Client(cluster))
        if "dashboard" in client.scheduler_info().get("services", {}):
            self.log(f"Dask dashboard: {client.dashboard_link}")
        return client

    def run(self, job: UnitJob, units: Sequence[Unit], tracker: Tracker, stops: tuple[type, ...]) -> UnitFailures:
        failures = UnitFailures()
        if not units:
            return failures
        try:
            return self._run(job, units, tracker, stops, failures)
        except stops:
            raise
        except Exception as exc:  # noqa: BLE001 - the cluster itself failed (a scheduler gone, a refused connection)
            where = self.dask.scheduler or "the local cluster"
            raise JobError(f"--scheduler/--workers: {where} failed mid-job ({type(exc).__name__}: {exc}); what was "
                           f"committed is kept in {job.parts_dir}; run the same command with --resume, on Dask or "
                           "in this process") from exc

    def _run(self, job, units, tracker, stops, failures) -> UnitFailures:
        from distributed import as_completed

        with ExitStack() as stack:
            client = self._client(stack)
            tracker.start_clock()  # patches/s measures scoring, not the cluster's start
            run = uuid.uuid4().hex[:8]
            futures = client.map(score_unit_task, [job] * len(units), list(units), pure=False,
                                 key=[f"score-unit-{u.index:06d}-{run}" for u in units])
            by_key = {f.key: u for f, u in zip(futures, units)}
            try:
                for fut in as_completed(futures):
                    if fut.status == "error":
                        exc = fut.exception()
                        fut.release()
                        if isinstance(exc, stops):
                            client.cancel(futures)
                            raise exc
                        failures.append((by_key[fut.key], exc))
                        continue
                    report = fut.result()
                    fut.release()  # the client keeps counts, never rows or futures
                    tracker.unit(report, bar_counts_units=True)
            finally:
                del futures
        return failures
