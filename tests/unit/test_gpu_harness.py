"""How tests/gpu runs, checked without a GPU: one TensorRT build per session, a time limit per test."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# A plugin that prints, after collection, each GPU test's time limit and whether it is skipped.
PLUGIN = '''
import json

def pytest_collection_finish(session):
    for item in session.items:
        mark = item.get_closest_marker("timeout")
        print("ITEM " + json.dumps({"id": item.nodeid, "timeout": mark.args[0] if mark else None,
                                     "skip": item.get_closest_marker("skip") is not None}))
'''


def _pytest(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    return subprocess.run([sys.executable, "-m", "pytest", *args, "-p", "no:cacheprovider"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_tensorrt_repository_of_the_gpu_tests_is_one_session_fixture(tmp_path):
    proc = _pytest("--fixtures", "-v", "tests/gpu", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    found = re.findall(r"^trt_repo( \[\w+ scope\])? -- (\S+?):\d+$", proc.stdout, re.M)
    assert found == [(" [session scope]", "tests/gpu/conftest.py")]


def test_every_gpu_test_gets_its_own_time_limit(tmp_path):
    import torch

    (tmp_path / "print_limits.py").write_text(PLUGIN)
    proc = _pytest("--collect-only", "-q", "-p", "print_limits", "tests/gpu", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    items = [json.loads(line[5:]) for line in proc.stdout.splitlines() if line.startswith("ITEM ")]
    assert len(items) >= 10
    assert {i["timeout"] for i in items} == {300}
    assert {i["skip"] for i in items} == {not torch.cuda.is_available()}
