"""What a user installs: the wheel carries every package and the backend files export copies."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_holds_every_subpackage_and_the_backend_files(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(tmp_path), str(ROOT)], check=True, timeout=300, capture_output=True)
    (wheel,) = tmp_path.glob("patchserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {str(p.parent.relative_to(ROOT)) for p in ROOT.glob("*/**/__init__.py")
                if p.parts[len(ROOT.parts)] in ("patchserve", "benchmarks", "export", "training", "serving")}
    assert packages and {f"{p}/__init__.py" for p in packages} <= names
    for name in ("onnx_model.py", "dali_model.py", "released.py"):
        assert f"serving/server/backends/{name}" in names
