"""``patchserve serve`` as a user runs it: a subprocess, ready, queried, Ctrl-C."""

from __future__ import annotations

import os
import re
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

    def while_ready(text: str) -> None:
        assert f"gRPC     127.0.0.1:{grpc}" in text and f"HTTP     127.0.0.1:{http}" in text
        assert f"  {spec.name} (version 1): READY" in text
        assert f"-v {repo.resolve()}:/models nvcr.io/nvidia/tritonserver" in text
        # The repository has no plan: the GPU container loads the onnxruntime flavour, not config.pbtxt's python.
        assert "--model-control-mode=none --model-config-name=onnxruntime\n" in text + "\n"
        # The default export uses the cores the server sees: more than one core's worth where there are more.
        cores = len(os.sched_getaffinity(0))
        chosen = _chosen(text)
        assert set(chosen) == {spec.name, spec.tta_model_name}, text
        assert all(w == cores for w in chosen.values()), text
        with PatchClient(f"127.0.0.1:{grpc}", spec.name) as client:
            probs = client.predict(np.zeros((3, *spec.input_hw, 3), np.uint8))
        assert probs.shape == (3, spec.num_classes)

    text = _serve_until_ready(cmd, while_ready)
    assert "stopping tritonserver" in text
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
    text = _serve_until_ready(cmd, cwd=tmp_path)
    assert f"  {spec.name} (version 1): READY" in text.splitlines(), text
    assert f"Triton is ready (log: {tmp_path / 'work' / 'tritonserver.log'})" in text.splitlines()


def _chosen(text: str) -> dict[str, int]:
    """Model -> workers, from the "cores" lines that serve prints."""
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^  (\S+) instance \S+: (\d+) worker\(s\) x 1 ONNX",
                                                              text, re.M)}


def _serve_until_ready(cmd: list[str], while_ready=None, **popen) -> str:
    """Run ``serve`` until it is ready, call ``while_ready`` with what it printed, Ctrl-C it; all it printed."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip())
            if line.startswith("Press Ctrl-C"):
                break
        if while_ready is not None:
            while_ready("\n".join(lines))
        proc.send_signal(signal.SIGINT)
        lines.append(proc.communicate(timeout=60)[0])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "\n".join(lines)
    return "\n".join(lines)


def test_serve_counts_the_cores_it_may_use_not_the_host_and_workers_overrides(exported_repo, tmp_path):
    """One core of affinity: one worker, whatever OMP_NUM_THREADS says; --workers N: N, in the docker line too."""
    repo, spec = exported_repo
    base = [sys.executable, "-m", "patchserve", "serve", "--repo", str(repo), "--workdir", str(tmp_path / "work")]
    ports = lambda: ["--http-port", str(free_port()), "--grpc-port", str(free_port()),  # noqa: E731
                     "--metrics-port", str(free_port())]
    one_core = min(os.sched_getaffinity(0))
    env = {**os.environ, "OMP_NUM_THREADS": "4"}
    env.pop("PATCHSERVE_SERVER_WORKERS", None)
    text = _serve_until_ready(base + ports(), env=env, preexec_fn=lambda: os.sched_setaffinity(0, {one_core}))
    assert _chosen(text) == {spec.name: 1, spec.tta_model_name: 1}, text
    assert "auto: 1 core(s) seen (affinity 1" in text
    text = _serve_until_ready(base + ports() + ["--workers", "3"], env=env)
    assert _chosen(text) == {spec.name: 3, spec.tta_model_name: 3}, text
    assert "PATCHSERVE_SERVER_WORKERS=3)" in text
    assert "docker run --gpus all --rm -e PATCHSERVE_SERVER_WORKERS=3 -p " in text
