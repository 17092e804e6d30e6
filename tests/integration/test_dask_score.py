"""``patchserve score --workers/--scheduler``: real Dask processes against the real server.

The distributed result must equal the in-process one row for row, even when
a worker process is SIGKILLed mid-job or the submitting client is killed and
the job is resumed, on the same executor or on the other one.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from patchserve.cli import main as cli
from serving.jobs.fingerprint import read_job_record
from serving.jobs.output import parts_path, read_results

ATOL = 1e-5
POLL_S = 0.05
WAIT_S = 300.0


def _args(server, inputs, out, *extra):
    return ["score", *map(str, inputs), "--url", server.grpc, "--model", server.spec.name, "--out", str(out),
            "--no-progress", "--stride", "96", *map(str, extra)]


@pytest.fixture(scope="module")
def job_inputs(synth_data, synth_slide):
    return [synth_data / "test", synth_data / "pcam" / "val_x.h5", synth_slide / "slides" / "slide_0.tiff"]


@pytest.fixture(scope="module")
def in_process(triton_server, job_inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("inproc") / "results.parquet"
    assert cli(_args(triton_server, job_inputs, out)) == 0
    return out, read_results(out)


def _assert_same_rows(got_table, want_rows, class_names):
    got = got_table.to_pylist()
    key = ("source", "x", "y", "col", "row", "label", "predicted", "tta", "model", "version")
    assert [tuple(r[k] for k in key) for r in got] == [tuple(r[k] for k in key) for r in want_rows]
    for c in class_names:
        np.testing.assert_allclose([r[f"prob_{c}"] for r in got], [r[f"prob_{c}"] for r in want_rows], atol=ATOL)


def test_local_cluster_of_two_workers_equals_in_process_result(triton_server, job_inputs, in_process, tmp_path):
    want_file, want = in_process
    out = tmp_path / "results.parquet"
    assert cli(_args(triton_server, job_inputs, out, "--workers", "2", "--unit-patches", "5")) == 0
    assert out.is_file() and not parts_path(out).exists()  # one output file, as in-process; the parts merged
    _assert_same_rows(pq.read_table(out), want, triton_server.spec.class_names)
    import pandas  # in the test extra, not a dependency of patchserve: users read OUT with it

    assert pandas.read_parquet(out)["source"].tolist() == [r["source"] for r in want]
    fp, listing = read_job_record(out)
    assert json.loads(fp.options)["unit_patches"] == 5 and fp.inputs_count == len(listing) == 16 + 1 + 1
    assert read_job_record(want_file)[1] == listing  # both executors list the inputs alike
    metrics = json.loads((tmp_path / "results.metrics.json").read_text())
    want_metrics = json.loads(want_file.with_name("results.metrics.json").read_text())
    assert metrics["num_samples"] == want_metrics["num_samples"] == 16 + 16
    assert metrics["confusion_matrix"] == want_metrics["confusion_matrix"]
    assert (tmp_path / "results.parquet.errors.csv").read_text() == "source,reason\n"
    for name in ("slide_0.heatmap.png", "slide_0.geojson", "slide_0.tissue_mask.png"):
        assert (tmp_path / f"results.{name}").stat().st_size > 0
    features = json.loads((tmp_path / "results.slide_0.geojson").read_text())["features"]
    assert len(features) == sum(r["x"] is not None for r in want)


# -- a cluster started with the `dask scheduler` and `dask worker` commands -----------------------------


def _gone(proc: subprocess.Popen) -> bool:
    return proc.poll() is not None


class DaskCommandCluster:
    """``dask scheduler`` and ``dask worker`` subprocesses on 127.0.0.1, one task thread per worker."""

    def __init__(self, folder: Path, workers: int):
        self.folder = folder
        sched_file = folder / "scheduler.json"
        self.procs: list[subprocess.Popen] = []
        self.logs = []
        self.procs.append(self._start("scheduler", ["scheduler", "--host", "127.0.0.1", "--port", "0",
                                                    "--no-dashboard", "--scheduler-file", str(sched_file)]))
        deadline = time.monotonic() + WAIT_S
        while not sched_file.is_file():
            assert not _gone(self.procs[0]) and time.monotonic() < deadline, self.log("scheduler")
            time.sleep(POLL_S)
        self.address = json.loads(sched_file.read_text())["address"]
        self.workers = {f"w{i}": self._start(f"w{i}", ["worker", self.address, "--name", f"w{i}", "--nthreads", "1",
                                                        "--no-nanny", "--host", "127.0.0.1", "--no-dashboard"])
                        for i in range(workers)}
        from distributed import Client

        self.client = Client(self.address, timeout=WAIT_S)
        self.client.wait_for_workers(workers, timeout=WAIT_S)

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "w")
        self.logs.append(log)
        return subprocess.Popen([sys.executable, "-m", "dask", *args], stdout=log, stderr=subprocess.STDOUT)

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text()

    def processing(self) -> dict[str, int]:
        """Tasks running or queued, by worker name."""
        names = {a: w["name"] for a, w in self.client.scheduler_info()["workers"].items()}
        return {names.get(a, a): len(keys) for a, keys in self.client.processing().items()}

    def close(self) -> None:
        self.client.close()
        for p in reversed(self.procs + list(self.workers.values())):
            if not _gone(p):
                p.terminate()
        for p in self.procs + list(self.workers.values()):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in self.logs:
            log.close()


@pytest.fixture
def dask_cluster(tmp_path):
    folder = tmp_path / "cluster"
    folder.mkdir()
    cluster = DaskCommandCluster(folder, workers=2)
    try:
        yield cluster
    finally:
        cluster.close()


def _submit(server, inputs, out, scheduler, *extra) -> subprocess.Popen:
    args = _args(server, inputs, out, "--scheduler", scheduler, *extra)
    log = open(out.with_name(out.name + ".client.log"), "w")
    return subprocess.Popen([sys.executable, "-m", "patchserve", *args], stdout=log, stderr=subprocess.STDOUT)


def _wait_for(cond, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        assert proc is None or proc.poll() is None, f"the client exited ({proc.returncode}) before {what}"
        time.sleep(POLL_S)


def _parts(out: Path) -> int:
    return len(list(parts_path(out).glob("unit-*/part-*.parquet")))


def test_sigkilled_worker_leaves_an_exact_result(triton_server, job_inputs, in_process, dask_cluster, tmp_path):
    _, want = in_process
    out = tmp_path / "results.parquet"
    n_units = 16 + 16 + 1  # --unit-patches 1: one unit per patch, one slide
    client = _submit(triton_server, job_inputs, out, dask_cluster.address, "--unit-patches", "1")
    try:
        # Kill w1 while it holds work and the job is under way: its units must be rerun by w0, once each.
        _wait_for(lambda: _parts(out) >= 1 and dask_cluster.processing().get("w1", 0) > 0, "w1 to hold work",
                  client)
        victim = dask_cluster.workers["w1"]
        committed_at_kill = _parts(out)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        assert client.wait(timeout=WAIT_S) == 0, out.with_name(out.name + ".client.log").read_text()
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert committed_at_kill < n_units
    assert victim.returncode == -signal.SIGKILL
    _assert_same_rows(pq.read_table(out), want, triton_server.spec.class_names)


def test_resume_after_the_client_is_killed_is_exact(triton_server, job_inputs, in_process, dask_cluster, tmp_path,
                                                    capsys):
    _, want = in_process
    out = tmp_path / "results.parquet"
    opts = ("--unit-patches", "1")
    client = _submit(triton_server, job_inputs, out, dask_cluster.address, *opts)
    try:
        _wait_for(lambda: _parts(out) >= 2, "two committed units", client)
        client.send_signal(signal.SIGKILL)
        client.wait()
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert client.returncode == -signal.SIGKILL
    assert 2 <= _parts(out) < 16 + 16 + 1
    assert cli(_args(triton_server, job_inputs, out, "--scheduler", dask_cluster.address, *opts)) == 2
    assert re.search(r"--out: .*results.parquet.parts exists; pass --resume", capsys.readouterr().err)
    assert cli(_args(triton_server, job_inputs, out, "--scheduler", dask_cluster.address, "--unit-patches", "2",
                     "--resume")) == 2
    assert re.search(r"--resume: .*results.parquet was started with something else, so its rows cannot be "
                     r"continued: option unit_patches: 1 then, 2 now\. Nothing was changed", capsys.readouterr().err)
    assert cli(_args(triton_server, job_inputs, out, "--scheduler", dask_cluster.address, *opts, "--resume")) == 0
    _assert_same_rows(pq.read_table(out), want, triton_server.spec.class_names)


def test_slide_manifest_with_roi_scores_only_tiles_inside_in_process_and_on_dask(triton_server, synth_slide,
                                                                                 tmp_path):
    slide = synth_slide / "slides" / "slide_0.tiff"
    roi = tmp_path / "left.geojson"
    left = {"type": "Polygon", "coordinates": [[[0, 0], [1024, 0], [1024, 1536], [0, 1536], [0, 0]]]}
    roi.write_text(json.dumps({"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": left}]}))
    manifest = tmp_path / "slides.csv"
    manifest.write_text(f"slide,roi,mpp\n{slide},left.geojson,\n{tmp_path / 'gone.tiff'},,\n")
    full, inproc, dask = (tmp_path / f"{n}.parquet" for n in ("full", "inproc", "dask"))
    assert cli(_args(triton_server, [slide], full)) == 0
    assert cli(_args(triton_server, [manifest], inproc)) == 0
    assert cli(_args(triton_server, [manifest], dask, "--workers", "1")) == 0
    half = triton_server.spec.input_width // 2
    want = [r for r in read_results(full) if r["x"] + half < 1024]
    assert 0 < len(want) < len(read_results(full))
    _assert_same_rows(pq.read_table(inproc), want, triton_server.spec.class_names)
    _assert_same_rows(pq.read_table(dask), want, triton_server.spec.class_names)
    missing = f"{tmp_path / 'gone.tiff'},{manifest}:3: no such slide {tmp_path / 'gone.tiff'}\n"
    errors = [(tmp_path / f"{name}.parquet.errors.csv").read_text() for name in ("inproc", "dask")]
    assert errors == ["source,reason\n" + missing] * 2


def _served(server):
    from serving.client.patch_client import PatchClient

    with PatchClient(server.grpc, server.spec.name) as c:
        return c.served_identity()


def test_a_unit_scored_again_keeps_its_committed_part(triton_server, synth_data, tmp_path):
    from serving.inputs.registry import plan_inputs
    from serving.jobs.config import ScoreConfig
    from serving.jobs.scorer import ClientPool, RunControl, UnitJob, score_unit

    out = tmp_path / "results.parquet"
    cfg = ScoreConfig(inputs=(str(synth_data / "test"),), urls=(triton_server.grpc,), model=triton_server.spec.name,
                      out=str(out), unit_patches=6)
    unit = plan_inputs(cfg.inputs, unit_patches=6, classes=triton_server.spec.class_names).units[1]
    served = _served(triton_server)
    job = UnitJob(cfg, triton_server.spec, "a-job", served, "tumour", verify=True)
    pool = ClientPool(cfg, served)
    try:
        first = score_unit(job, unit, RunControl(clients=pool.get))
        (part,) = parts_path(out).glob("unit-000001/part-*.parquet")
        inode = part.stat().st_ino
        again = score_unit(job, unit, RunControl(clients=pool.get))
    finally:
        pool.close()
    assert (first.rows, first.scored, first.parts, first.complete) == (6, 6, 1, True)
    assert (again.rows, again.scored, again.parts, again.complete) == (6, 0, 0, True)
    assert part.stat().st_ino == inode and [p.name for p in part.parent.iterdir()] == [part.name]
    assert pq.read_table(part).column("source").to_pylist() == [s.source for s in unit.samples]


def _kill_after_parts(args: list[str], out: Path, parts: int, log: Path) -> None:
    """Run ``patchserve ARGS`` in a process of its own; SIGKILL it once ``parts`` parts are committed."""
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "patchserve", *args], stdout=fh, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: _parts(out) >= parts, f"{parts} committed parts", proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, log.read_text()


@pytest.fixture(scope="module")
def long_job(triton_server, many_patches, tmp_path_factory):
    """Rows of an uninterrupted in-process job over ``many_patches``: what every resumed job must give."""
    out = tmp_path_factory.mktemp("long_job") / "whole.parquet"
    base = ["score", str(many_patches), "--url", triton_server.grpc, "--model", triton_server.spec.name]
    assert cli([*base, "--out", str(out), "--no-progress", "--unit-patches", "100", "--batch-size", "4"]) == 0
    return base, read_results(out)


def test_a_job_killed_in_process_resumes_on_dask_and_the_reverse_each_patch_once(triton_server, long_job,
                                                                               dask_cluster, tmp_path, capsys):
    base, want = long_job
    opts = ["--unit-patches", "100", "--part-rows", "20", "--batch-size", "4", "--no-progress"]
    # In this process, killed, then resumed on a local Dask cluster.
    out = tmp_path / "first.parquet"
    _kill_after_parts([*base, "--out", str(out), *opts], out, 3, tmp_path / "first.log")
    record = read_job_record(out)
    committed = _parts(out)
    assert 3 <= committed < 1500 // 20
    assert cli([*base, "--out", str(out), *opts, "--resume", "--workers", "1"]) == 0
    assert "items of 15 units already committed" in capsys.readouterr().out
    _assert_same_rows(pq.read_table(out), want, triton_server.spec.class_names)
    assert read_job_record(out) == record  # the fingerprint and listing the first run recorded
    # On an existing Dask cluster, its client killed, then resumed in this process.
    out = tmp_path / "second.parquet"
    _kill_after_parts([*base, "--out", str(out), *opts, "--scheduler", dask_cluster.address], out, 3,
                      tmp_path / "second.log")
    record = read_job_record(out)
    assert cli([*base, "--out", str(out), *opts, "--resume"]) == 0
    _assert_same_rows(pq.read_table(out), want, triton_server.spec.class_names)
    assert read_job_record(out) == record


def test_a_slide_without_tissue_is_an_error_with_its_mask_as_in_process(triton_server, tmp_path, capsys):
    from PIL import Image

    from serving.synth.slide import write_pyramid_tiff

    blank = tmp_path / "blank.tiff"
    write_pyramid_tiff(blank, [np.full((512, 512, 3), 240, np.uint8), np.full((128, 128, 3), 240, np.uint8)], 0.5)
    reasons = {}
    for name, extra in (("inproc", ()), ("dask", ("--workers", "1"))):
        out = tmp_path / f"{name}.parquet"
        capsys.readouterr()
        assert cli(_args(triton_server, [blank], out, *extra)) == 0
        errors_file = tmp_path / f"{name}.parquet.errors.csv"
        assert capsys.readouterr().out.strip().splitlines()[-1] == \
            f"1 inputs recorded as errors, listed in {errors_file}"
        assert pq.read_table(out).num_rows == 0
        mask_png = tmp_path / f"{name}.blank.tissue_mask.png"
        assert not np.asarray(Image.open(mask_png)).any()
        (line,) = errors_file.read_text().splitlines()[1:]
        reasons[name] = line.replace(str(mask_png), "MASK")
    assert reasons["dask"] == reasons["inproc"]
    assert reasons["dask"].startswith(f"{blank},no tissue found: no tile of the ")
    assert reasons["dask"].endswith("nothing scored; see the mask MASK")


def test_a_worker_refuses_a_server_whose_weights_changed_after_planning(triton_server, synth_data, tmp_path):
    """The job recorded one set of weights; a worker whose server now serves others commits nothing."""
    import dataclasses

    from serving.core.errors import ServerMismatchError
    from serving.inputs.registry import plan_inputs
    from serving.jobs.config import ScoreConfig
    from serving.jobs.dask_executor import score_unit_task
    from serving.jobs.scorer import UnitJob

    out = tmp_path / "results.parquet"
    cfg = ScoreConfig(inputs=(str(synth_data / "test"),), urls=(triton_server.grpc,), model=triton_server.spec.name,
                      out=str(out))
    (unit, *_) = plan_inputs(cfg.inputs, unit_patches=8, classes=triton_server.spec.class_names).units
    planned = dataclasses.replace(_served(triton_server), weights_sha256="0" * 64)
    job = UnitJob(cfg, triton_server.spec, "a-job", planned, "tumour")
    with pytest.raises(ServerMismatchError, match=rf"{triton_server.grpc} differs from the job's fingerprint: "
                                                  "weights_sha256"):
        score_unit_task(job, unit)
    assert not parts_path(out).exists()
