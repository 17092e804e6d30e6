"""The benchmark framework: medians after warm-up, targets, and RESULTS.md blocks replaced in place."""

from __future__ import annotations

import json

import benchmarks.common as common
import pytest

from benchmarks.common import Target, Timing, interleave, measure, ratio_target
from benchmarks.errors import BenchOutError


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


def test_interleave_runs_the_arms_in_turn_and_reports_min_median_max():
    order = []
    got = interleave({"a": lambda: order.append("a"), "b": lambda: order.append("b") or 20}, items=10,
                     warmup=1, repeats=3)
    assert order == ["a", "b"] * 4  # one warm-up round, then A, B, A, B, A, B
    assert got["a"].items == 10 and got["b"].items == 20 and len(got["a"].seconds) == 3
    a = Timing("a", 10, (1.0, 2.0, 4.0))
    b = Timing("b", 10, (2.0, 2.0, 2.0))
    t = ratio_target("a / b", a, b, 1.0)
    assert t.ratio == 1.0  # ratio of medians: 10/2 over 10/2
    assert (t.low, t.high) == (0.5, 2.0)  # spread of the paired a_i / b_i
    assert t.to_dict() == {"name": "a / b", "ratio": 1.0, "target": 1.0, "comparison": ">=", "met": True,
                           "low": 0.5, "high": 2.0}


def test_results_go_only_to_out_and_report_regenerates_only_their_blocks(tmp_path):
    out = tmp_path / "out"
    md, readme, pngs = tmp_path / "RESULTS.md", tmp_path / "README.md", tmp_path / "results"
    readme.write_text("# x\n\n<!-- bench:summary -->\nold\n<!-- /bench:summary -->\n\nafter\n")

    def write(stage, value):
        common.write_results(stage, out=out, command=f"bench {stage}", rows=[{"a": value}], columns=["a"],
                             targets=[Target("t", value, 1.0)], notes=["n"], payload={}, quick=True,
                             summary=[{"what": f"{stage} ratio", "ratio": f"{value:.2f}", "target": ">= 1.0"}])

    write("one", 1.5)
    write("two", 2.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "out"]  # nothing written beside out
    assert sorted(p.name for p in out.iterdir()) == ["one.json", "two.json"]
    assert common.update_results(out, results_md=md, results_dir=pngs, readme=readme) == ["one", "two"]
    (out / "two.json").unlink()  # a later run of one stage keeps the other's figures in the README
    write("one", 0.5)
    assert common.update_results(out, results_md=md, results_dir=pngs, readme=readme) == ["one"]
    text = md.read_text()
    assert text.count("<!-- bench:one -->") == 1 and text.count("<!-- bench:two -->") == 1
    assert "| 0.5 |" in text and "| 1.5 |" not in text and "| 2.5 |" in text
    assert text.index("bench:one") < text.index("bench:two")  # a re-run keeps its place
    assert "| t | 0.50 | >= 1.0 | **no** |" in text
    assert readme.read_text() == ("# x\n\n<!-- bench:summary -->\n| stage | what was measured | ratio | target |\n"
                                  "|---|---|---|---|\n| one | one ratio | 0.50 | >= 1.0 |\n"
                                  "| two | two ratio | 2.50 | >= 1.0 |\n<!-- /bench:summary -->\n\nafter\n")
    doc = json.loads((pngs / "one.json").read_text())
    assert doc["targets"] == [{"name": "t", "ratio": 0.5, "target": 1.0, "comparison": ">=", "met": False}]


def test_out_inside_the_project_packages_is_refused(tmp_path):
    with pytest.raises(BenchOutError, match=r"--out .*inside the project's package benchmarks/"):
        common.resolve_out(common.BENCH_DIR / "results")
    assert common.resolve_out(tmp_path / "r") == (tmp_path / "r").resolve()


def test_queue_delay_variants_differ_from_the_model_only_in_name_and_delay(tmp_path, tiny_spec):
    from benchmarks.queue_delay import add_delay_variants, choose
    from export import triton_config as tc
    from export.repository import render_repository, write_generated

    write_generated(tmp_path, render_repository(tiny_spec, tc.ExportOptions(with_dali=False)))
    version = tmp_path / tiny_spec.name / "1"
    version.mkdir()
    (version / "model.onnx").write_bytes(b"weights")
    original = (tmp_path / tiny_spec.name / "config.pbtxt").read_text()
    names = add_delay_variants(tmp_path, tiny_spec.name, delays=(0, 500))
    assert names == {0: f"{tiny_spec.name}_d0", 500: f"{tiny_spec.name}_d500"}
    for delay, name in names.items():
        cfg = tc.read_config(tmp_path / name / "config.pbtxt")
        assert cfg.name == name and cfg.dynamic_batching.max_queue_delay_microseconds == delay
        assert (tmp_path / name / "1" / "model.onnx").read_bytes() == b"weights"
    assert (tmp_path / tiny_spec.name / "config.pbtxt").read_text() == original  # hard links never written through
    rows = [{"delay_us": 0, "p50 / p50 at 0 us": 1.0}, {"delay_us": 200, "p50 / p50 at 0 us": 1.04},
            {"delay_us": 500, "p50 / p50 at 0 us": 1.08}]
    assert choose(rows)["delay_us"] == 200  # the largest delay within +5% of the p50


def test_no_stage_rebinds_its_results_folder():
    """`out` is the --out folder in every stage's run(): rebinding it once sent slide.json into a temp folder."""
    import ast
    from pathlib import Path

    from patchserve.commands.bench import _stage
    from benchmarks.common import PEER_STAGES, STAGES

    for stage in (*STAGES, *PEER_STAGES):
        path = Path(_stage(stage).__file__)
        run = next(n for n in ast.walk(ast.parse(path.read_text()))
                   if isinstance(n, ast.FunctionDef) and n.name == "run")
        assert "out" in [a.arg for a in run.args.args + run.args.kwonlyargs], path.name
        stores = [n.lineno for n in ast.walk(run) if isinstance(n, ast.Name) and n.id == "out"
                  and isinstance(n.ctx, ast.Store)]
        assert not stores, f"{path.name}: `out` assigned at line(s) {stores}"


def test_interleave_records_the_machines_busy_cpu_per_repeat():
    import os
    import time

    from benchmarks.common import busy_cpu_seconds, interleave

    assert busy_cpu_seconds() is not None  # Linux: /proc/stat

    def spin() -> int:
        t0 = time.process_time()
        while time.process_time() - t0 < 0.3:  # 0.3 s of this process's CPU, whatever else runs
            pass
        return 10

    t = interleave({"spin": spin}, items=10, warmup=0, repeats=2)["spin"]
    # /proc/stat counts in clock ticks (10 ms here): allow a few ticks of rounding at each end.
    slack = 3 / os.sysconf("SC_CLK_TCK")
    assert len(t.cpu_seconds) == 2 and min(t.cpu_seconds) >= 0.3 - slack
    assert t.cpu_per_item >= (0.3 - slack) / 10
    assert t.to_dict()["cpu_per_item"] == t.cpu_per_item


def test_server_layouts_change_only_instances_workers_and_threads(tmp_path, tiny_spec):
    from benchmarks.server_layouts import layouts, write_layout
    from export import triton_config as tc
    from export.repository import render_repository, write_generated

    repo = tmp_path / "repo"
    write_generated(repo, render_repository(tiny_spec, tc.ExportOptions(with_dali=False)))
    original = tc.read_config(repo / tiny_spec.name / "config.pbtxt")
    assert layouts(1)[0].workers == "auto" and len(layouts(1)) == 2 and len(layouts(2)) == 4
    for i, layout in enumerate(layouts(4)):
        cfg = tc.read_config(write_layout(repo, tiny_spec.name, layout, tmp_path / f"l{i}") / tiny_spec.name
                             / "config.pbtxt")
        assert cfg.instance_group[0].count == layout.instances
        assert cfg.parameters["workers"].string_value == layout.workers
        assert cfg.parameters["intra_op_threads"].string_value == str(layout.threads)
        for field in ("instance_group", "parameters"):
            cfg.ClearField(field)
        plain = type(original)()
        plain.CopyFrom(original)
        for field in ("instance_group", "parameters"):
            plain.ClearField(field)
        assert cfg == plain
    assert tc.read_config(repo / tiny_spec.name / "config.pbtxt") == original
