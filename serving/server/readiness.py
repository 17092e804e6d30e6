"""Why a starting Triton is not ready: the models it could not load, each with Triton's reason.

With ``--model-control-mode none`` Triton loads every model before it opens
its endpoints, so once the server answers "live" but not "ready", loading is
over and the models that failed will not come back. The repository index
says which: a model that reached loading has a state (``UNAVAILABLE``) and
Triton's reason; a model whose config Triton rejected while reading it
(a parse or validation error), or an ensemble whose steps did not load, is
listed without either, and its reason is only in the server's log.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

READY = "READY"
STILL_CHANGING = ("LOADING", "UNLOADING")
# One error line of Triton's log: E1201 22:36:02.868843 1501 model_lifecycle.cc:642] "message"
_ERROR_LINE = re.compile(r'^E\d{4} [\d:.]+\s+\d+ \S+\] "(?P<message>.*)"\s*$')
_CONFIG_REJECTED = re.compile(r"^Poll failed for model directory '(?P<name>[^']+)': (?P<reason>.*)$")


@dataclass(frozen=True)
class ModelLoadFailure:
    """A model that did not load. ``state`` is None when Triton never got to loading it."""

    name: str
    version: str | None
    state: str | None
    reason: str

    def describe(self) -> str:
        version = f" (version {self.version})" if self.version else ""
        state = self.state or "not loaded (config rejected, or an ensemble whose steps did not load)"
        return f"{self.name}{version}: {state}: {self.reason}"


def _error_messages(log_text: str) -> list[str]:
    out = []
    for line in log_text.splitlines():
        m = _ERROR_LINE.match(line)
        if m:
            out.append(m.group("message").replace('\\"', '"'))
    return out


def _reason_in_log(name: str, messages: list[str]) -> str:
    """The log's reason for a model the index lists without one."""
    for message in messages:
        m = _CONFIG_REJECTED.match(message)
        if m and m.group("name") == name:
            return m.group("reason")
    mention = re.compile(rf"(?<![\w]){re.escape(name)}(?![\w])")
    for message in messages:
        if re.search(rf"\bensemble '?{re.escape(name)}'? ", message):
            return message
    for message in messages:
        if mention.search(message):
            return message
    return "no reason in the server's log"


def load_failures(index: list[dict], log_text: str) -> list[ModelLoadFailure] | None:
    """The models of a repository index that did not load, with reasons; None while any model still loads.

    ``index``: the server's repository index (tritonclient's HTTP ``get_model_repository_index``).
    """
    if any(m.get("state") in STILL_CHANGING for m in index):
        return None
    messages = _error_messages(log_text)
    failures = []
    for m in index:
        if m.get("state") == READY:
            continue
        reason = m.get("reason") or _reason_in_log(m["name"], messages)
        failures.append(ModelLoadFailure(m["name"], m.get("version"), m.get("state"), reason))
    return failures
