"""The benchmark framework: medians after warm-up, targets, and RESULTS.md blocks replaced in place."""

from __future__ import annotations

import json

import benchmarks.common as common
from benchmarks.common import Target, measure


def test_measure_warms_up_then_reports_medians():
    calls = []
    t = measure("x", lambda: calls.append(1) or 10, items=5, warmup=2, repeats=3)
    assert len(calls) == 5  # two untimed, three timed
    assert t.items == 10  # the function's own count wins
    assert len(t.seconds) == 3
    assert t.rate_min <= t.rate <= t.rate_max


def test_targets_compare_in_the_stated_direction():
    assert Target("up", 2.6, 2.5).met and not Target("up", 2.4, 2.5).met
    assert Target("down", 1.1, 1.2, higher_is_better=False).met
    assert not Target("down", 1.3, 1.2, higher_is_better=False).met


def test_each_stage_replaces_only_its_own_block(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(common, "RESULTS_MD", tmp_path / "RESULTS.md")

    def write(stage, value):
        common.write_results(stage, command=f"bench {stage}", rows=[{"a": value}], columns=["a"],
                             targets=[Target("t", value, 1.0)], notes=["n"], payload={}, quick=True)

    write("one", 1.5)
    write("two", 2.5)
    write("one", 0.5)
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.count("<!-- bench:one -->") == 1 and text.count("<!-- bench:two -->") == 1
    assert "| 0.5 |" in text and "| 1.5 |" not in text and "| 2.5 |" in text
    assert text.index("bench:one") < text.index("bench:two")  # a re-run keeps its place
    assert "| t | 0.50 | >= 1.0 | **no** |" in text
    doc = json.loads((tmp_path / "results" / "one.json").read_text())
    assert doc["targets"] == [{"name": "t", "ratio": 0.5, "target": 1.0, "comparison": ">=", "met": False}]
