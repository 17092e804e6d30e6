"""Exactly-once scoring across runs and servers: the job's fingerprint, resume, mixed servers, one job per output.

``other_weights_server`` (tests/fixtures_serve.py) serves another random run
exported under the same model name and version (other weights, same spec):
what a user gets when a model is re-exported in place. Jobs run as ``patchserve score`` in-process or as real
subprocesses.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchserve.cli import main as cli
from serving.jobs.output import read_results
from tests.fixtures_serve import N_MANY
from tests.parts_helpers import committed_errors, committed_parts, committed_rows

POLL_TIMEOUT_S = 120.0


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"p{i:02d}.png")
    return folder


def _score(url, spec, *args) -> int:
    return cli(["score", *map(str, args), "--url", url, "--model", spec.name, "--no-progress", "--part-rows", "4",
                "--batch-size", "4"])


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_served_configs_carry_the_weights_hash_and_differ_between_runs(triton_server, other_weights_server):
    from serving.client.patch_client import PatchClient

    spec = triton_server.spec
    with PatchClient(triton_server.grpc, spec.name) as a, PatchClient(other_weights_server.urls.grpc, spec.name) as b:
        ia, ib = a.served_identity(), b.served_identity()
    assert len(ia.weights_sha256) == 64 and len(ib.weights_sha256) == 64
    assert ia.weights_sha256 != ib.weights_sha256
    assert (ia.model, ia.version, ia.spec_sha256) == (ib.model, ib.version, ib.spec_sha256)


def test_resume_against_other_weights_is_refused_and_leaves_the_output_untouched(
        triton_server, other_weights_server, images, tmp_path, capsys):
    spec = triton_server.spec
    out = tmp_path / "results.parquet"
    assert _score(triton_server.grpc, spec, images, "--out", out, "--stop-after-parts", "2") == 3
    before = _snapshot(tmp_path / "results.parquet.parts") | {"job": (tmp_path / "results.parquet.job.json").read_bytes()}
    capsys.readouterr()
    assert _score(other_weights_server.urls.grpc, spec, images, "--out", out, "--resume") == 2
    err = capsys.readouterr().err
    assert "--resume: " in err and "weights_sha256: " in err and "Nothing was changed" in err
    after = _snapshot(tmp_path / "results.parquet.parts") | {"job": (tmp_path / "results.parquet.job.json").read_bytes()}
    assert after == before
    # Options are part of the fingerprint too, named one by one.
    assert _score(triton_server.grpc, spec, images, "--out", out, "--resume", "--tta", "flip") == 2
    assert "option tta: 'none' then, 'flip' now" in capsys.readouterr().err
    # The right server finishes it: one row per image.
    assert _score(triton_server.grpc, spec, images, "--out", out, "--resume") == 0
    assert [Path(r["source"]).name for r in read_results(out)] == [f"p{i:02d}.png" for i in range(24)]
    done = out.read_bytes()
    capsys.readouterr()
    # Finished: the same job says it is complete; another server or other inputs are refused.
    assert _score(triton_server.grpc, spec, images, "--out", out, "--resume") == 0
    assert "is already complete (same model, weights, options and inputs)" in capsys.readouterr().out
    assert _score(other_weights_server.urls.grpc, spec, images, "--out", out, "--resume") == 2
    assert "weights_sha256" in capsys.readouterr().err
    assert out.read_bytes() == done


def test_resume_with_changed_inputs_says_how_many_are_new_and_missing(triton_server, images, tmp_path, capsys):
    spec = triton_server.spec
    out = tmp_path / "results.csv"
    assert _score(triton_server.grpc, spec, images, "--out", out, "--stop-after-parts", "1") == 3
    (images / "p00.png").unlink()
    for name in ("new_a.png", "new_b.png"):
        shutil.copy(images / "p01.png", images / name)
    os.utime(images / "p02.png", ns=(1, 1))  # same bytes, another modification time
    capsys.readouterr()
    assert _score(triton_server.grpc, spec, images, "--out", out, "--resume") == 2
    err = capsys.readouterr().err
    assert "inputs: 2 new, 1 missing, 1 changed (size or modification time) since the job started" in err
    assert not out.exists()


def test_two_servers_with_different_weights_are_refused_before_a_row_is_written(
        triton_server, other_weights_server, images, tmp_path, capsys):
    spec = triton_server.spec
    out = tmp_path / "results.parquet"
    code = cli(["score", str(images), "--url", triton_server.grpc, "--url", other_weights_server.urls.grpc,
                "--model", spec.name, "--out", str(out), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--url: the servers do not serve the same model" in err
    assert f"{other_weights_server.urls.grpc} differs from {triton_server.grpc}: weights_sha256" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]  # no output, parts, record or lock


def _terminal_child():
    """As a terminal starts a foreground job: SIGINT handled (a background job of a script ignores it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_score(url, spec, inputs, out, *extra) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "patchserve", "score", *map(str, inputs), "--url", url, "--model", spec.name,
           "--out", str(out), "--part-rows", "10", "--batch-size", "2", "--concurrency", "1", "--no-progress",
           *map(str, extra)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_terminal_child)


def _wait_for(predicate, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + POLL_TIMEOUT_S
    while time.monotonic() < deadline:
        if predicate():
            return
        assert proc.poll() is None, f"score exited early:\n{proc.communicate()[1]}"
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _committed(out: Path) -> int:
    return committed_rows(out)


def test_second_job_on_one_output_exits_at_once_naming_the_first_and_never_deletes_its_parts(
        triton_server, many_patches, tmp_path, capsys):
    spec = triton_server.spec
    out = tmp_path / "results.parquet"
    first = _start_score(triton_server.grpc, spec, [many_patches], out)
    try:
        _wait_for(lambda: _committed(out) >= 10, first, "the first job's first part")
        capsys.readouterr()
        # --overwrite must not delete the running job's parts: refused before touching anything.
        assert cli(["score", str(many_patches), "--url", triton_server.grpc, "--model", spec.name,
                    "--out", str(out), "--overwrite", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"another job is writing it (process {first.pid} holds {out}.lock)" in err
        _, ferr = first.communicate(timeout=POLL_TIMEOUT_S)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, ferr
    assert [r["source"] for r in read_results(out)] == [f"{many_patches}#{i}" for i in range(N_MANY)]
    assert not Path(f"{out}.lock").exists()


def test_sigkilled_job_leaves_no_lock_and_sigint_leaves_no_shared_memory(triton_server, many_patches, tmp_path):
    spec = triton_server.spec
    out = tmp_path / "results.parquet"
    job = _start_score(triton_server.grpc, spec, [many_patches], out)
    try:
        _wait_for(lambda: _committed(out) >= 10, job, "a committed part")
        os.kill(job.pid, signal.SIGKILL)
        job.wait(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    # Ctrl-C as a terminal sends it (to the process group) during a --shared-memory resume.
    job = _start_score(triton_server.grpc, spec, [many_patches], out, "--resume", "--shared-memory")
    try:
        pid = job.pid
        regions = lambda: sorted(Path("/dev/shm").glob(f"patchserve_{pid}_*"))  # noqa: E731
        _wait_for(lambda: _committed(out) >= 30 and regions(), job, "a part of the resumed job")
        assert {oct(p.stat().st_mode & 0o777) for p in regions()} == {"0o600"}
        os.killpg(job.pid, signal.SIGINT)
        _, err = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode == 130, err
    assert "patchserve score: interrupted" in err
    assert regions() == [] and not Path(f"{out}.lock").exists()
    assert cli(["score", str(many_patches), "--url", triton_server.grpc, "--model", spec.name, "--out", str(out),
                "--resume", "--no-progress", "--part-rows", "10"]) == 0
    assert [r["source"] for r in read_results(out)] == [f"{many_patches}#{i}" for i in range(N_MANY)]


def test_a_server_that_comes_back_with_other_weights_gets_no_more_work(exported_repo, other_weights_server,
                                                                        many_patches, tmp_path):
    """Killed mid-job and replaced, on the same ports, by a server of other weights: --wait must not mix them."""
    from serving.server.embedded import EmbeddedTriton
    from tests.fixtures_export import link_copy

    src, spec = exported_repo
    repo_a = link_copy(Path(src) / spec.name, tmp_path / "repo_a" / spec.name).parent
    repo_b = Path(other_weights_server.repo)
    out = tmp_path / "results.parquet"
    server = EmbeddedTriton(repo_a, workdir=tmp_path / "work_a").start()
    replacement = None
    job = None
    try:
        job = _start_score(server.urls.grpc, spec, [many_patches], out, "--wait", "--wait-timeout-s", "120")
        _wait_for(lambda: _committed(out) >= 10, job, "a committed part")
        server.kill()
        server.stop()
        replacement = EmbeddedTriton(repo_b, http_port=server.urls.http_port, grpc_port=server.urls.grpc_port,
                                     metrics_port=server.urls.metrics_port, workdir=tmp_path / "work_b").start()
        _, err = job.communicate(timeout=POLL_TIMEOUT_S)
    finally:
        if job is not None and job.poll() is None:
            job.kill()
            job.wait()
        server.close()
        if replacement is not None:
            replacement.close()
    assert job.returncode == 2, err
    assert f"--url {server.urls.grpc}: the server came back serving model {spec.name!r} with other weights" in err
    kept = committed_rows(out)
    assert 10 <= kept < N_MANY and committed_errors(out) == []
    # Every kept row came from the first server (its weights): equal to ONNX Runtime on its model.
    import h5py
    import pyarrow.parquet as pq

    from serving.core.views import view_boxes
    from tests.fixtures_serve import OrtReference, find_onnx

    tables = [pq.read_table(p) for p in committed_parts(out)]
    rows = [int(s.rpartition("#")[2]) for t in tables for s in t.column("source").to_pylist()]
    assert len(rows) == len(set(rows)) == kept
    with h5py.File(many_patches) as f:
        x = f["x"][sorted(rows)]
    x = x[np.argsort(np.argsort(rows))]  # in the parts' order
    (top, left, _), = view_boxes("none", spec.source_hw, spec.input_hw)
    h, w = spec.input_hw
    want = OrtReference(find_onnx(Path(src), spec), spec).probs(np.ascontiguousarray(x[:, top:top + h, left:left + w]))
    got = np.array([[v for t in tables for v in t.column(f"prob_{c}").to_pylist()] for c in spec.class_names]).T
    np.testing.assert_allclose(got, want, atol=1e-5)
