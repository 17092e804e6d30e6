"""``pip install -c constraints/client.txt "patchserve[client]"`` on Python 3.12 with numpy 2, and the
client's own tests (``-m client``) passing there against a server started from this environment.

The main environment is Python 3.11 with numpy 1.26.4 (nvidia-pytriton, the
embedded server's package, needs numpy 1). A scoring machine needs neither:
this test builds a fresh Python 3.12 virtual environment with the client and
test extras only (plus ONNX Runtime, the tests' in-process reference), checks
that it holds numpy 2 and no torch, onnx, DALI, TensorRT or Triton server,
and runs every ``client`` test there. No Python 3.12 on the machine is a
failure naming what was tried, never a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.pythons import find_python

ROOT = Path(__file__).resolve().parents[2]
CLIENT_TESTS = ["tests/integration/test_client_server.py", "tests/integration/test_score_cli.py"]
HEAVY = ("torch", "onnx", "pytriton", "nvidia.dali", "tensorrt")
# A fresh machine downloads every wheel of the client extra: more than the 900 s every test gets.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]
PROBE = f"""
import importlib.util, json, sys, numpy

def found(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False

print(json.dumps({{"python": list(sys.version_info[:2]), "numpy": numpy.__version__,
                  "heavy": [m for m in {HEAVY!r} if found(m)]}}))
"""


def _run(cmd, timeout_s: float, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout_s, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _source_copy(dst: Path) -> Path:
    """The checkout without its environments and build outputs: what a user installs from."""
    ignore = shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache",
                                    ".hypothesis", "demo", "runs", "bench-results", "*.onnx", "*.plan", "*.dali")
    return Path(shutil.copytree(ROOT, dst, ignore=ignore))


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _client_test_ids() -> list[str]:
    proc = _run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "client",
                 "-p", "no:cacheprovider", *CLIENT_TESTS], 300, cwd=ROOT)
    return [line for line in proc.stdout.splitlines() if "::" in line]


def test_the_client_extra_installs_on_python_312_with_numpy_2_and_its_tests_pass_there(triton_server,
                                                                                         tmp_path_factory):
    python = find_python("3.12")
    work = tmp_path_factory.mktemp("py312")
    src = _source_copy(work / "src")
    venv = work / "venv"
    env = _clean_env()
    _run([python, "-m", "venv", venv], 300, env=env)
    py = venv / "bin" / "python"
    _run([py, "-m", "pip", "install", "--quiet", "--upgrade", "pip>=24"], 600, env=env)
    _run([py, "-m", "pip", "install", "--quiet", "-c", src / "constraints" / "client.txt",
          f"{src}[client,test]", "onnxruntime"], 900, env=env)
    probe = _run([py, "-c", PROBE], 120, env=env, cwd=work).stdout
    got = json.loads(probe)
    assert got["python"] == [3, 12] and got["numpy"].startswith("2."), got
    assert got["heavy"] == [], f"the client extra pulled in {got['heavy']}"
    expected = _client_test_ids()
    assert len(expected) >= 15
    junit = work / "junit.xml"
    model = triton_server.spec.name
    proc = subprocess.run([py, "-m", "pytest", "-m", "client", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                           "--basetemp", work / "pytest", "--triton-grpc", triton_server.grpc, "--triton-http",
                           triton_server.http, "--triton-repo", triton_server.repo, "--triton-model", model,
                           *CLIENT_TESTS], capture_output=True, text=True, timeout=900, cwd=src, env=env)
    cases = list(ET.parse(junit).getroot().iter("testcase")) if junit.is_file() else []
    bad = [c.get("name") for c in cases if c.find("failure") is not None or c.find("error") is not None]
    skipped = [c.get("name") for c in cases if c.find("skipped") is not None]
    assert proc.returncode == 0 and not bad, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert skipped == [] and len(cases) == len(expected), (len(cases), len(expected), skipped)
