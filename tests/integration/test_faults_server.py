"""Faults during a bulk score, with the real server: it dies, it comes back, the scorer dies, the model refuses.

The job is ``patchserve score`` in a subprocess on an HDF5 file of distinct
random patches at the source size, written in parts of PART_ROWS rows. Faults
are injected once the first part is committed (the manifest shows progress),
so they land mid-job: the rest of the job is tens of parts away.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from patchserve.cli import main as cli
from serving.jobs.parts import read_meta
from tests.parts_helpers import committed_errors, committed_parts, committed_rows
from serving.jobs.output import read_results
from serving.core.views import view_boxes
from tests.fixtures_export import link_copy
from tests.fixtures_serve import OrtReference, find_onnx

N_PATCHES = 600
PART_ROWS = 10
ATOL = 1e-5
MARK = (1, 2, 3)  # a patch of exactly this colour is refused by the faulty model
POLL_TIMEOUT_S = 120.0

# Appended to the Python-backend model: requests holding a marked patch get an
# error response from Triton; the others are answered by the real model (through their response senders).
FAULTY_PATCH = f'''

MARK = np.array({list(MARK)}, np.uint8)
_answer = TritonPythonModel.execute


def _execute_refusing_marked(self, requests):
    out, good = {{}}, []
    for i, request in enumerate(requests):
        x = pb_utils.get_input_tensor_by_name(request, self.input_names[0]).as_numpy()
        if (x == MARK).all(axis=(1, 2, 3)).any():
            out[i] = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError("marked patch refused"))
        else:
            good.append(i)
    # The real model answers the others through their response senders: None in their place.
    if good:
        assert _answer(self, [requests[i] for i in good]) is None
    return [out.get(i) for i in range(len(requests))]


TritonPythonModel.execute = _execute_refusing_marked
'''


def faulty_name(spec) -> str:
    return f"{spec.name}_faulty"


@pytest.fixture(scope="module")
def fault_repo(exported_repo, tmp_path_factory):
    """The classifier alone (fast restarts), plus a copy that refuses marked patches."""
    import re

    src, spec = exported_repo
    repo = tmp_path_factory.mktemp("fault_repo")
    link_copy(Path(src) / spec.name, repo / spec.name)
    faulty = link_copy(Path(src) / spec.name, repo / faulty_name(spec))
    config = (faulty / "config.pbtxt").read_text()
    (faulty / "config.pbtxt").write_text(re.sub(r'^name: ".*"$', f'name: "{faulty_name(spec)}"', config, count=1,
                                                flags=re.M))
    model_py = faulty / "1" / "model.py"
    model_py.write_text(model_py.read_text() + FAULTY_PATCH)
    return repo, spec


@pytest.fixture(scope="module")
def fault_server(fault_repo):
    """A server of this module alone: its tests kill it and start it again on the same ports."""
    from serving.server.embedded import EmbeddedTriton

    repo, _ = fault_repo
    with EmbeddedTriton(repo) as server:
        yield server


@pytest.fixture
def server(fault_server):
    if not fault_server.alive():
        fault_server.restart()
    yield fault_server
    if not fault_server.alive():
        fault_server.restart()


@pytest.fixture(scope="module")
def patches_h5(fault_repo, tmp_path_factory):
    """N_PATCHES distinct random patches at the source size, and what ONNX Runtime says of each."""
    repo, spec = fault_repo
    x = np.random.default_rng(7).integers(0, 256, (N_PATCHES, *spec.source_hw, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("fault_data") / "patches_x.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=x)
    (top, left, _), = view_boxes("none", spec.source_hw, spec.input_hw)
    h, w = spec.input_hw
    expected = OrtReference(find_onnx(repo, spec), spec).probs(np.ascontiguousarray(x[:, top:top + h, left:left + w]))
    return path, expected


def _score_cmd(server, spec, inputs, out, *extra) -> list[str]:
    return [sys.executable, "-m", "patchserve", "score", *map(str, inputs), "--url", server.urls.grpc,
            "--model", spec.name, "--out", str(out), "--part-rows", str(PART_ROWS), "--batch-size", "2",
            "--concurrency", "2", "--retries", "2", "--backoff-s", "0.2", "--no-progress", *map(str, extra)]


def _wait_for_rows(out: Path, proc: subprocess.Popen, rows: int) -> int:
    deadline = time.monotonic() + POLL_TIMEOUT_S
    while time.monotonic() < deadline:
        got = committed_rows(out)
        if got >= rows:
            return got
        assert proc.poll() is None, f"score exited early:\n{proc.communicate()[1]}"
        time.sleep(0.02)
    raise AssertionError(f"no part of {out} committed within {POLL_TIMEOUT_S} s")


def _start(cmd) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _assert_one_row_per_patch(out: Path, h5: Path, expected: np.ndarray, spec) -> None:
    rows = read_results(out)
    assert [r["source"] for r in rows] == [f"{h5}#{i}" for i in range(N_PATCHES)]  # none lost, none repeated
    probs = np.array([[r[f"prob_{c}"] for c in spec.class_names] for r in rows])
    np.testing.assert_allclose(probs, expected, atol=ATOL)


def test_server_killed_mid_job_stops_cleanly_keeps_parts_and_resume_completes(server, fault_repo, patches_h5,
                                                                             tmp_path):
    _, spec = fault_repo
    h5, expected = patches_h5
    out = tmp_path / "results.parquet"
    proc = _start(_score_cmd(server, spec, [h5], out))
    try:
        _wait_for_rows(out, proc, PART_ROWS)
        server.kill()
        _, err = proc.communicate(timeout=POLL_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2
    assert "no answer from model" in err and "run the same command with --resume" in err
    assert not out.exists()
    kept = committed_rows(out)
    assert PART_ROWS <= kept < N_PATCHES and committed_errors(out) == []
    # What is kept is whole parts of rows, each once; the rest is left for --resume.
    import pyarrow.parquet as pq

    sources = [s for p in committed_parts(out) for s in pq.read_table(p).column("source").to_pylist()]
    assert len(sources) == len(set(sources)) == kept and set(sources) <= {f"{h5}#{i}" for i in range(N_PATCHES)}
    server.restart()
    args = _score_cmd(server, spec, [h5], out, "--resume")[3:]
    assert cli(args) == 0
    _assert_one_row_per_patch(out, h5, expected, spec)


def test_server_killed_and_restarted_during_a_waiting_job_gives_one_row_per_patch(server, fault_repo, patches_h5,
                                                                                 tmp_path):
    _, spec = fault_repo
    h5, expected = patches_h5
    out = tmp_path / "results.csv"
    proc = _start(_score_cmd(server, spec, [h5], out, "--wait", "--wait-timeout-s", "120"))
    try:
        _wait_for_rows(out, proc, PART_ROWS)
        server.kill()
        assert committed_rows(out) < N_PATCHES  # the kill landed mid-job
        server.restart()
        _, err = proc.communicate(timeout=POLL_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    _assert_one_row_per_patch(out, h5, expected, spec)
    assert (tmp_path / "results.csv.errors.csv").read_text() == "source,reason\n"


def test_scorer_killed_leaves_only_committed_parts_and_resume_completes(server, fault_repo, patches_h5, tmp_path):
    _, spec = fault_repo
    h5, expected = patches_h5
    out = tmp_path / "results.parquet"
    proc = _start(_score_cmd(server, spec, [h5], out))
    try:
        _wait_for_rows(out, proc, 2 * PART_ROWS)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()  # the final file is written only by the atomic merge at the end
    import pyarrow.parquet as pq

    parts_dir = out.with_name(out.name + ".parts")
    parts = committed_parts(out)
    for part in parts:  # every committed part is whole: PART_ROWS rows, or a unit's last ones
        assert pq.read_table(part).num_rows == read_meta(part).rows == read_meta(part).stop - read_meta(part).start
    assert 0 < committed_rows(out) < N_PATCHES
    # Anything else is a hidden temporary file of a writer that was killed: never a part.
    others = [p.name for p in parts_dir.rglob("*") if p.is_file() and p not in parts]
    assert all(n.startswith(".") for n in others), others
    assert cli(_score_cmd(server, spec, [h5], out, "--resume")[3:]) == 0
    assert not parts_dir.exists()
    _assert_one_row_per_patch(out, h5, expected, spec)


def test_patches_the_server_refuses_are_listed_as_errors_never_dropped(server, fault_repo, tmp_path):
    from PIL import Image

    _, spec = fault_repo
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (*spec.source_hw, 3), dtype=np.uint8)).save(folder / f"p{i:02d}.png")
    Image.fromarray(np.full((*spec.source_hw, 3), MARK, np.uint8)).save(folder / "p05_marked.png")
    out = tmp_path / "results.csv"
    code = cli(["score", str(folder), "--url", server.urls.grpc, "--model", faulty_name(spec), "--out", str(out),
                "--batch-size", "4", "--concurrency", "2", "--no-progress"])
    assert code == 0
    names = sorted(p.name for p in folder.iterdir())  # p00..p05, p05_marked, p06..p09
    refused = names[4:8]  # the request of four that holds the marked patch
    assert [Path(r["source"]).name for r in read_results(out)] == [n for n in names if n not in refused]
    errors = (tmp_path / "results.csv.errors.csv").read_text().splitlines()[1:]
    assert [Path(e.split(",")[0]).name for e in errors] == refused
    assert all("server error: " in e and "marked patch refused" in e for e in errors)
