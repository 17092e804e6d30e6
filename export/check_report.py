"""The gate's options and its result: one row per check and model, shown as a table."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from serving.core.options import option

OK, FAIL, SKIP = "ok", "FAIL", "skip"


@dataclass(frozen=True)
class CheckRow:
    check: str
    model: str
    status: str
    detail: str = ""


@dataclass(frozen=True)
class CheckReport:
    rows: tuple[CheckRow, ...]

    @property
    def passed(self) -> bool:
        return all(r.status != FAIL for r in self.rows)

    def failed(self, check: str | None = None) -> list[CheckRow]:
        return [r for r in self.rows if r.status == FAIL and (check is None or r.check == check)]

    def table(self) -> str:
        w = max([len(r.model) for r in self.rows] + [5])
        head = f"{'check':<14} {'model':<{w}} {'status':<6} detail"
        return "\n".join([head, "-" * len(head)] + [f"{r.check:<14} {r.model:<{w}} {r.status:<6} {r.detail}"
                                                    for r in self.rows])

    def to_json(self) -> str:
        """For CI systems: ``{"passed": bool, "failed": n, "rows": [{check, model, status, detail}, ...]}``."""
        return json.dumps({"passed": self.passed, "failed": len(self.failed()),
                           "rows": [asdict(r) for r in self.rows]}, indent=2)


@dataclass(frozen=True)
class CheckConfig:
    """Options of ``patchserve check-export``."""

    repo: str = option(help="model repository folder", positional=True, metavar="REPO")
    models: tuple[str, ...] = option((), "model names to check, comma-separated", default_text="every model folder")
    serve: bool = option(True, "load the python flavours into the embedded Triton server and infer")
    run: str | None = option(None, "run folder or checkpoint: recompute the fixtures' logits with PyTorch from its "
                                   "weights and require the repository to answer them (proof it serves this run)",
                             metavar="RUN")
    json: bool = option(False, "print the result as JSON (rows of check/model/status/detail) instead of a table")
