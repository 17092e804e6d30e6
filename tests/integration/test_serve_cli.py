"""``patchserve serve`` as a user runs it: a subprocess, ready, queried, Ctrl-C."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import numpy as np

from serving.client.patch_client import PatchClient
from serving.server.embedded import free_port


def test_serve_prints_urls_answers_and_stops_cleanly_on_sigint(exported_repo, tmp_path):
    repo, spec = exported_repo
    http, grpc, metrics = free_port(), free_port(), free_port()
    cmd = [sys.executable, "-m", "patchserve", "serve", "--repo", str(repo), "--http-port", str(http),
           "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--workdir", str(tmp_path / "work")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip())
            if line.startswith("Press Ctrl-C"):
                break
        text = "\n".join(lines)
        assert f"gRPC     127.0.0.1:{grpc}" in text and f"HTTP     127.0.0.1:{http}" in text
        assert f"  {spec.name} (version 1): READY" in text
        assert f"-v {repo.resolve()}:/models nvcr.io/nvidia/tritonserver" in text
        # The repository has no plan: the GPU container loads the onnxruntime flavour, not config.pbtxt's python.
        assert "--model-control-mode=none --model-config-name=onnxruntime\n" in text + "\n"
        with PatchClient(f"127.0.0.1:{grpc}", spec.name) as client:
            probs = client.predict(np.zeros((3, *spec.input_hw, 3), np.uint8))
        assert probs.shape == (3, spec.num_classes)
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, rest
    assert "stopping tritonserver" in rest
    with socket.socket() as s:  # the server let go of its port
        s.bind(("127.0.0.1", grpc))


def test_serve_on_a_run_folder_or_a_missing_folder_is_refused_in_one_line_naming_the_flag(export_run_dir, tmp_path,
                                                                                            capsys):
    from patchserve.cli import main as cli

    for repo, why in ((export_run_dir, "holds no model folder (NAME/config.pbtxt or NAME/VERSION/), so the server "
                                       "would serve nothing; it looks like a run folder: export it first"),
                      (tmp_path / "missing", "no such model repository folder")):
        assert cli(["serve", "--repo", str(repo), "--workdir", str(tmp_path / "work")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"patchserve serve: error: --repo {repo}: {why}") and err.count("\n") == 1, err
    assert not (tmp_path / "work").exists()  # refused before any server was prepared


def test_serve_with_a_relative_workdir_starts_and_stops(exported_repo, tmp_path):
    repo, spec = exported_repo
    http, grpc, metrics = free_port(), free_port(), free_port()
    cmd = [sys.executable, "-m", "patchserve", "serve", "--repo", str(repo), "--http-port", str(http),
           "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--workdir", "work"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip())
            if line.startswith("Press Ctrl-C"):
                break
        assert f"  {spec.name} (version 1): READY" in lines, "\n".join(lines)
        assert f"Triton is ready (log: {tmp_path / 'work' / 'tritonserver.log'})" in lines
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
