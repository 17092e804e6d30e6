"""patchserve bench writes its results into --out and nowhere else: not the source tree, not the cwd."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """Every file of the source tree (bytecode caches and .git aside) with its size and mtime."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in (".git", "__pycache__", ".pytest_cache")]
        for f in filenames:
            p = Path(dirpath) / f
            st = p.stat()
            state[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return state


def test_bench_writes_json_and_png_only_into_out_and_leaves_the_source_tree_untouched(tmp_path):
    before = _tree_state(ROOT)
    work = tmp_path / "cwd"
    work.mkdir()
    out = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    # --smoke: one repeat per arm, the same stage code and files; its figures are refused by report.
    proc = subprocess.run([sys.executable, "-m", "patchserve", "bench", "infer", "--quick", "--smoke",
                           "--out", str(out)], cwd=work, env=env, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["infer.json", "infer.png"]
    assert list(work.iterdir()) == []  # nothing in the current directory either
    assert _tree_state(ROOT) == before  # RESULTS.md, benchmarks/results/ and the rest untouched
    doc = json.loads((out / "infer.json").read_text())
    assert doc["stage"] == "infer" and doc["plot"] == "infer.png" and doc["summary"] and doc["smoke"] is True
    assert all(len(t["seconds"]) == 1 for t in doc["results"])  # one repeat, as --smoke says
    assert (out / "infer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Smoke figures never reach RESULTS.md or the README.
    report = subprocess.run([sys.executable, "-m", "patchserve", "bench", "report", "--out", str(out)],
                            cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert report.returncode == 2 and "infer ran with --smoke" in report.stderr, report.stderr
    assert _tree_state(ROOT) == before


def test_bench_refuses_an_out_folder_inside_the_project_packages(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-m", "patchserve", "bench", "infer", "--out",
                           str(ROOT / "benchmarks" / "results")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert "inside the project's package benchmarks/" in proc.stderr
