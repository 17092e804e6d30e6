"""Faults of the scoring job's own world, each a one-line error or a line in the errors file, never a traceback:
unreadable inputs of every kind, a full disk, a read-only output folder, a lost Dask scheduler, unusable ROIs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from patchserve.cli import main as cli
from serving.jobs.output import errors_path, read_results
from tests.fixtures_serve import N_MANY
from tests.parts_helpers import committed_parts

WAIT_S = 300.0
# Root reads every file whatever its mode: the scorer runs without the capabilities that let it, as a user would.
AS_A_USER = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]


def _cmd(server, inputs, out, *extra) -> list[str]:
    return [sys.executable, "-m", "patchserve", "score", *map(str, inputs), "--url", server.grpc, "--model",
            server.spec.name, "--out", str(out), "--no-progress", *map(str, extra)]


def _one_line_error(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("patchserve score: error:")]
    assert lines and "Traceback" not in err, err[-3000:]
    return lines[-1]


def test_unreadable_inputs_of_every_kind_are_recorded_and_the_rest_scored(triton_server, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"good_{i}.png")
    (folder / "loop_a.png").symlink_to(folder / "loop_b.png")
    (folder / "loop_b.png").symlink_to(folder / "loop_a.png")
    (folder / "dangling.png").symlink_to(tmp_path / "gone.png")
    os.mkfifo(folder / "pipe.png")
    (folder / "secret.png").write_bytes((folder / "good_0.png").read_bytes())
    (folder / "secret.png").chmod(0)
    (folder / "sub").mkdir()
    (folder / "sub" / "deep.png").write_bytes((folder / "good_1.png").read_bytes())
    (folder / "sub").chmod(0)  # a folder that cannot be listed
    out = tmp_path / "r.parquet"
    try:
        done = subprocess.run(AS_A_USER + _cmd(triton_server, [folder], out), capture_output=True, text=True,
                              timeout=WAIT_S)
    finally:
        (folder / "sub").chmod(0o755)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(Path(r["source"]).name for r in read_results(out)) == ["good_0.png", "good_1.png", "good_2.png"]
    errors = dict(line.split(",", 1) for line in errors_path(out).read_text().splitlines()[1:])
    want = {"loop_a.png": "a symlink loop", "loop_b.png": "a symlink loop", "dangling.png": "a dangling symlink",
            "pipe.png": "a FIFO (named pipe), not a file", "secret.png": "permission denied",
            "sub": "cannot list this folder (Permission denied)"}
    for name, why in want.items():
        (reason,) = [r for s, r in errors.items() if Path(s).name == name]
        assert why in reason, (name, reason)
    assert done.stdout.strip().splitlines()[-1].startswith(f"{len(want)} inputs recorded as errors")


def test_a_read_only_output_folder_is_refused_before_any_request(triton_server, synth_data, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        done = subprocess.run(AS_A_USER + _cmd(triton_server, [synth_data / "test"], ro / "r.parquet"),
                              capture_output=True, text=True, timeout=WAIT_S)
    finally:
        ro.chmod(0o755)
    assert done.returncode == 2
    assert _one_line_error(done.stderr) == f"patchserve score: error: --out {ro / 'r.parquet'}: its folder {ro} is " \
                                           "not writable"
    assert list(ro.iterdir()) == []


def test_out_naming_a_folder_is_refused_with_overwrite_too_before_any_request(triton_server, synth_data, tmp_path):
    out = tmp_path / "results.parquet"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    done = subprocess.run(_cmd(triton_server, [synth_data / "test"], out, "--overwrite"), capture_output=True,
                          text=True, timeout=WAIT_S)
    assert done.returncode == 2
    line = _one_line_error(done.stderr)
    assert line.startswith(f"patchserve score: error: --out {out}: is a folder") and "give a file name" in line
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not list(tmp_path.glob("results.parquet.*"))  # no lock, record or parts: refused before the job began


def test_the_summary_counts_refused_images_apart_from_scored_patches(triton_server, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"good_{i}.png")
    whole = (folder / "good_0.png").read_bytes()
    (folder / "cut.png").write_bytes(whole[: len(whole) // 2])
    (folder / "text.png").write_text("not an image")
    out = tmp_path / "r.parquet"
    done = subprocess.run(_cmd(triton_server, [folder], out), capture_output=True, text=True, timeout=WAIT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(read_results(out)) == 3
    md = out.with_name(out.name + ".summary.md").read_text()
    assert "3 patches scored, 2 inputs refused or unreadable" in md, md


def test_a_full_disk_while_writing_the_results_is_one_line_and_resume_finishes(triton_server, many_patches,
                                                                               tmp_path):
    """The file-size limit stands in for a full disk: the parts (small) fit, the merged output does not."""
    import resource

    out = tmp_path / "r.csv"
    args = _cmd(triton_server, [many_patches], out, "--unit-patches", "100", "--part-rows", "25")

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (48_000, 48_000))

    done = subprocess.run(args, capture_output=True, text=True, timeout=WAIT_S, preexec_fn=small_files)
    assert done.returncode == 2
    line = _one_line_error(done.stderr)
    assert f"--out {out}: cannot write the job's outputs (File too large" in line
    assert f"the committed parts are kept in {out}.parts" in line and "--resume" in line
    assert len(committed_parts(out)) == N_MANY // 25
    assert cli(args[3:] + ["--resume"]) == 0
    assert [r["source"] for r in read_results(out)] == [f"{many_patches}#{i}" for i in range(N_MANY)]


def test_an_unusable_roi_is_recorded_for_its_slide_and_the_other_slides_score(triton_server, synth_slide, tmp_path):
    slide = synth_slide / "slides" / "slide_0.tiff"
    (tmp_path / "broken.geojson").write_text("{not json")
    (tmp_path / "empty.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    (tmp_path / "point.geojson").write_text(json.dumps({"type": "Feature", "geometry": {"type": "Point",
                                                                                         "coordinates": [1, 2]}}))
    manifest = tmp_path / "slides.csv"
    manifest.write_text(f"slide,roi\n{slide},broken.geojson\n{slide},empty.geojson\n{slide},point.geojson\n{slide},\n")
    out = tmp_path / "r.parquet"
    assert cli(_cmd(triton_server, [manifest], out, "--stride", "96")[3:]) == 0
    errors = errors_path(out).read_text()
    assert "broken.geojson: not valid JSON" in errors
    assert errors.count("no Polygon or MultiPolygon geometry") == 2
    assert {r["slide"] for r in read_results(out)} == {"slide_0"}


def test_the_dask_scheduler_killed_mid_job_is_one_line_and_resume_in_this_process_is_exact(triton_server,
                                                                                          many_patches, tmp_path):
    from tests.integration.test_dask_score import DaskCommandCluster, _parts

    folder = tmp_path / "cluster"
    folder.mkdir()
    cluster = DaskCommandCluster(folder, workers=1)
    out = tmp_path / "r.parquet"
    opts = ["--unit-patches", "50", "--part-rows", "10", "--batch-size", "2"]
    try:
        job = subprocess.Popen(_cmd(triton_server, [many_patches], out, *opts, "--scheduler", cluster.address),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + WAIT_S
        while _parts(out) < 3:
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()
            time.sleep(0.05)
        cluster.procs[0].send_signal(signal.SIGKILL)  # the scheduler
        _, err = job.communicate(timeout=WAIT_S)
    finally:
        cluster.close()
    assert job.returncode == 2
    assert "failed mid-job" in _one_line_error(err) and "run the same command with --resume" in err
    assert cli(_cmd(triton_server, [many_patches], out, *opts, "--resume")[3:]) == 0
    assert [r["source"] for r in read_results(out)] == [f"{many_patches}#{i}" for i in range(N_MANY)]


def test_a_committed_part_damaged_afterwards_is_rescored_alone_on_resume(triton_server, synth_data, tmp_path,
                                                                        capsys):
    out = tmp_path / "r.parquet"
    args = _cmd(triton_server, [synth_data / "test"], out, "--unit-patches", "4", "--part-rows", "2",
                "--units-in-flight", "1")[3:]
    assert cli([*args, "--stop-after-parts", "4"]) == 3
    parts = committed_parts(out)
    assert len(parts) == 4
    data = parts[1].read_bytes()
    parts[1].write_bytes(data[: len(data) // 2])  # truncated after its commit: resume must not trust it
    capsys.readouterr()
    assert cli([*args, "--resume"]) == 0
    said = capsys.readouterr().out
    assert f"--resume: part {parts[1].name} of unit {int(parts[1].parent.name.split('-')[1])}: unreadable " \
           "(truncated or not a Parquet part); its items were scored again" in said
    assert "scored 10 patches in" in said  # the damaged part's 2 items and the 8 never committed, no more
    rows = read_results(out)
    assert sorted(r["source"] for r in rows) == sorted(str(p) for p in (synth_data / "test").rglob("*.png"))
    assert len(rows) == len({r["source"] for r in rows})
