"""``patchserve bench features`` end to end in its smallest mode: both arms on both slides, their ratio, the memory
by slide count, and the RESULTS.md block ``bench report`` would write from it. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_features_writes_both_arms_on_both_slides_their_ratio_and_memory_by_slide_count(real_svs, tmp_path):
    from benchmarks.common import update_results

    out = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-m", "patchserve", "bench", "features", "--quick", "--smoke",
                           "--out", str(out), "--real-slide", str(real_svs)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["features.json", "features.png"]
    doc = json.loads((out / "features.json").read_text())
    assert doc["stage"] == "features" and doc["smoke"] is True and doc["quick"] is True
    assert doc["command"] == f"patchserve bench features --quick --smoke --real-slide {real_svs.name}"
    slides = ["demo (synthetic)", "real SVS"]
    arms = {(r["slide"], r["name"]) for r in doc["results"]}
    assert arms == {(s, a) for s in slides for a in ("served", "in-process")}
    assert all(len(r["seconds"]) == 1 and r["unit"] == "features/s" for r in doc["results"])  # --smoke: one repeat
    for s in slides:
        ratio = doc["ratios"][s]
        assert set(ratio) == {"ratio", "low", "high"} and ratio["ratio"] > 0
        assert doc["tiles"][s] > 50
        assert doc["agreement"][s] <= 1e-4  # the same tiles, the same vectors (the stage fails otherwise)
        assert {r["items"] for r in doc["results"] if r["slide"] == s} == {doc["tiles"][s]}
    assert [m["slides"] for m in doc["memory"]] == [1, 2, 4]
    assert [m["tiles"] for m in doc["memory"]] == [k * doc["tiles"]["demo (synthetic)"] for k in (1, 2, 4)]
    assert all(m["peak_mb"] > 0 for m in doc["memory"])
    (target,) = doc["targets"]
    assert target["name"].startswith("peak RSS, 4 slides / 2 in one job") and target["comparison"] == "<="
    assert [s["what"] for s in doc["summary"]][:2] == [
        f"score --features served / CLAM-style in-process PyTorch, features/s, {s}" for s in slides]

    # What `bench report` (or --update-results) writes from a run that was not --smoke: the features block.
    measured = tmp_path / "measured"
    measured.mkdir()
    (measured / "features.json").write_text(json.dumps({**doc, "smoke": False}))
    (measured / "features.png").write_bytes((out / "features.png").read_bytes())
    results_md, readme = tmp_path / "RESULTS.md", tmp_path / "README.md"
    results_md.write_text("# Benchmark results\n\n<!-- bench:features -->\nnot measured yet\n<!-- /bench:features -->\n")
    readme.write_text("<!-- bench:summary -->\n<!-- /bench:summary -->\n")
    assert update_results(measured, results_md=results_md, results_dir=tmp_path / "kept", readme=readme) == \
        ["features"]
    block = results_md.read_text()
    assert "not measured yet" not in block and block.count("<!-- bench:features -->") == 1
    assert "| slide | arm | tiles | features/s | min | max | peak MB |" in block
    assert f"| real SVS | {doc['ratios']['real SVS']['ratio']:.2f} |" in block
    assert "![features](results/features.png)" in block
    assert "| features | score --features served / CLAM-style in-process PyTorch, features/s, real SVS |" \
        in readme.read_text()
