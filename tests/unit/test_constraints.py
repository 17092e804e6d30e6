"""The pinned sets: one for the full install (numpy 1, Python 3.11), one for a client install (numpy 2,
Python 3.11 to 3.13), sharing every other pin through constraints/shared.txt so they cannot drift."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _pins(path: Path) -> tuple[dict[str, str], list[str]]:
    pins, includes = {}, []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-c "):
            includes.append(line[3:].strip())
        elif line:
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins, includes


def test_the_full_and_the_client_pins_share_everything_but_numpy_and_the_reference_runtime():
    full, full_inc = _pins(ROOT / "constraints.txt")
    client, client_inc = _pins(ROOT / "constraints" / "client.txt")
    shared, shared_inc = _pins(ROOT / "constraints" / "shared.txt")
    assert (full_inc, client_inc, shared_inc) == (["constraints/shared.txt"], ["shared.txt"], [])
    assert full["numpy"] == "1.26.4" and client["numpy"].startswith("2.")
    assert set(client) == {"numpy", "onnxruntime"}  # everything else comes from shared.txt
    assert "numpy" not in shared and not set(full) & set(shared)  # each package pinned once per install
    assert {"tritonclient", "pyarrow", "openslide-python", "h5py", "distributed", "pytest"} <= set(shared)
    assert {"torch", "nvidia-pytriton", "onnxruntime-gpu", "nvidia-dali-cuda130", "onnx"} <= set(full)


def test_only_the_embedded_server_s_extra_holds_numpy_below_2_and_python_up_to_3_13_is_accepted():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11,<3.14"
    assert "numpy<2" not in project["dependencies"] and "numpy>=1.26" in project["dependencies"]
    extras = project["optional-dependencies"]
    assert "numpy<2" in extras["serve"] and not any("numpy<2" in d for d in extras["client"])


def test_the_install_stamp_is_rebuilt_when_any_dependency_file_changes():
    proc = subprocess.run(["make", "-pn", "-f", "Makefile", "install"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    (rule,) = [line for line in proc.stdout.splitlines() if line.startswith(".venv/.installed: ") and ":=" not in line]
    assert set(rule.split(":", 1)[1].split()) == {"pyproject.toml", "constraints.txt", "constraints/shared.txt",
                                                  "constraints/client.txt"}
