"""The Dask executor keeps the job's guarantees: fingerprint, checked servers, one job per output.

Real Dask (a ``LocalCluster`` started by ``--workers``) against the real
server; ``other_weights_server`` serves the same model name, version and spec
with other weights (tests/fixtures_serve.py).
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
import pyarrow.parquet as pq
import pytest
from PIL import Image

from patchserve.cli import main as cli
from tests.fixtures_serve import N_MANY
from tests.parts_helpers import committed_parts

WAIT_S = 300.0


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"p{i:02d}.png")
    return folder


def _score(urls, spec, *args, dask: bool = True) -> int:
    return cli(["score", *map(str, args), *[a for u in urls for a in ("--url", u)], "--model", spec.name,
                "--no-progress", *(["--workers", "1"] if dask else []), "--unit-patches", "4"])


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of the job (dataset, record, errors file), by path: the images folder apart."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.parts[len(folder.parts)] != "images"}


def test_dask_resume_against_other_weights_or_changed_inputs_is_refused_and_leaves_the_output_untouched(
        triton_server, other_weights_server, images, tmp_path, capsys):
    spec = triton_server.spec
    out = tmp_path / "results.parquet"
    # Started in this process and stopped after 4 of its 6 units, as a killed job leaves it.
    assert _score([triton_server.grpc], spec, images, "--out", out, "--stop-after-parts", "4", "--units-in-flight",
                  "1", dask=False) == 3
    assert (tmp_path / "results.parquet.job.json").is_file() and len(committed_parts(out)) == 4
    before = _snapshot(tmp_path)
    capsys.readouterr()

    assert _score([other_weights_server.urls.grpc], spec, images, "--out", out, "--resume") == 2
    err = capsys.readouterr().err
    assert "--resume: " in err and "weights_sha256: " in err and "Nothing was changed" in err
    assert _snapshot(tmp_path) == before
    # Every --url server is checked before any work, a resumed job's too.
    assert _score([triton_server.grpc, other_weights_server.urls.grpc], spec, images, "--out", out, "--resume") == 2
    assert f"{other_weights_server.urls.grpc} differs from {triton_server.grpc}: weights_sha256" in \
        capsys.readouterr().err
    assert _snapshot(tmp_path) == before
    # The unit size decides the parts: another one is another job.
    assert cli(["score", str(images), "--url", triton_server.grpc, "--model", spec.name, "--no-progress",
                "--workers", "1", "--unit-patches", "3", "--out", str(out), "--resume"]) == 2
    assert "option unit_patches: 4 then, 3 now" in capsys.readouterr().err
    assert _snapshot(tmp_path) == before

    # The right server finishes it: one row per image, in listing order.
    assert _score([triton_server.grpc], spec, images, "--out", out, "--resume") == 0
    assert "--resume: 16 items of 6 units already committed" in capsys.readouterr().out
    assert [Path(s).name for s in pq.read_table(out).column("source").to_pylist()] == \
        [f"p{i:02d}.png" for i in range(24)]
    done = _snapshot(tmp_path)

    (images / "p00.png").unlink()
    shutil.copy(images / "p01.png", images / "new_a.png")
    os.utime(images / "p02.png", ns=(1, 1))  # same bytes, another modification time
    assert _score([triton_server.grpc], spec, images, "--out", out, "--resume") == 2
    err = capsys.readouterr().err
    assert "inputs: 1 new, 1 missing, 1 changed (size or modification time) since the job started" in err
    assert _snapshot(tmp_path) == done


def test_dask_resume_of_an_output_without_a_job_record_is_refused(triton_server, images, tmp_path, capsys):
    spec = triton_server.spec
    out = tmp_path / "results.parquet"
    assert _score([triton_server.grpc], spec, images, "--out", out) == 0
    (tmp_path / "results.parquet.job.json").unlink()
    before = _snapshot(tmp_path)
    capsys.readouterr()
    assert _score([triton_server.grpc], spec, images, "--out", out, "--resume") == 2
    assert f"--resume: {out} has no job record ({out}.job.json)" in capsys.readouterr().err
    assert _snapshot(tmp_path) == before


def _parts(out: Path) -> int:
    return len(committed_parts(out))


def test_second_dask_job_on_one_output_exits_at_once_naming_the_first(triton_server, many_patches, tmp_path, capsys):
    spec = triton_server.spec
    out = tmp_path / "results.parquet"
    cmd = [sys.executable, "-m", "patchserve", "score", str(many_patches), "--url", triton_server.grpc, "--model",
           spec.name, "--out", str(out), "--no-progress", "--workers", "1", "--unit-patches", "50"]
    # Its own session: the LocalCluster's processes go with it if the test fails.
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + WAIT_S
        while _parts(out) < 1:
            assert first.poll() is None, f"the first job exited early:\n{first.communicate()[1]}"
            assert time.monotonic() < deadline, "timed out waiting for the first job's first part"
            time.sleep(0.02)
        capsys.readouterr()
        # --overwrite must not delete the running job's parts: refused before touching anything.
        assert cli(["score", str(many_patches), "--url", triton_server.grpc, "--model", spec.name, "--out", str(out),
                    "--overwrite", "--no-progress", "--workers", "1"]) == 2
        err = capsys.readouterr().err
        assert f"another job is writing it (process {first.pid} holds {out}.lock)" in err
        _, ferr = first.communicate(timeout=WAIT_S)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert first.returncode == 0, ferr
    assert pq.read_table(out).column("source").to_pylist() == [f"{many_patches}#{i}" for i in range(N_MANY)]
    assert not Path(f"{out}.lock").exists()
