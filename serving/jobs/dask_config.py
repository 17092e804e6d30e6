"""Where a scoring job's units run: this process, a local Dask cluster, or an existing one.

Standard library only, so ``ScoreConfig`` (and ``--help``) carry these flags
without importing Dask; ``serving.jobs.dask_executor`` runs the units when
either ``--scheduler`` or ``--workers`` is given.
"""

from __future__ import annotations

from dataclasses import dataclass

from serving.core.errors import InputError
from serving.core.options import option

SCHEDULER_SCHEMES = ("tcp://", "tls://", "inproc://", "ucx://", "ws://", "wss://")


@dataclass(frozen=True)
class DaskConfig:
    """Dask: past one client machine (without --scheduler or --workers the job runs in this process)."""

    scheduler: str | None = option(None, "run the job on this existing Dask cluster (dask-jobqueue, "
                                         "dask-kubernetes, dask scheduler); every worker must see the inputs and "
                                         "OUT at the same paths", metavar="tcp://HOST:PORT", default_text="none")
    workers: int | None = option(None, "start a local Dask cluster of N worker processes on this machine",
                                 metavar="N", default_text="none")

    def __post_init__(self) -> None:
        if self.scheduler is not None and self.workers is not None:
            raise InputError("--scheduler and --workers: give one of them, not both")
        if self.scheduler is not None and not self.scheduler.startswith(SCHEDULER_SCHEMES):
            raise InputError(f"--scheduler: expected an address like tcp://HOST:PORT, got {self.scheduler!r}")
        if self.workers is not None and (isinstance(self.workers, bool) or self.workers < 1):
            raise InputError(f"--workers: expected a positive number of worker processes, got {self.workers}")

    @property
    def enabled(self) -> bool:
        return self.scheduler is not None or self.workers is not None
