"""The README's statements about defaults are the parsers' defaults."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
# "`--flag` ... is on by default" / "... off by default", within one sentence.
CLAIM = re.compile(r"`--([a-z][a-z0-9-]*)`[^.`]*?\b(on|off) by default")


def _claims() -> list[tuple[str, bool]]:
    text = " ".join(README.read_text().split())
    return [(flag, state == "on") for flag, state in CLAIM.findall(text)]


def test_readme_states_some_defaults():
    assert ("channels-last", True) in _claims() and ("amp", False) in _claims()


@pytest.mark.parametrize("flag, on", _claims())
def test_each_on_or_off_by_default_in_the_readme_is_the_train_default(flag, on):
    from patchserve.commands.train import get_args_parser

    dest = flag.replace("-", "_")
    assert get_args_parser().get_default(dest) is on, f"README says --{flag} is {'on' if on else 'off'} by default"
