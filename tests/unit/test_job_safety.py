"""Units of exactly-once scoring: lock, fingerprint, names, manifests, file names, private files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from serving.core.errors import (FingerprintMismatchError, InputError, JobLockedError, ServerMismatchError,
                                 SlideError, SpecError)
from serving.jobs.fingerprint import JobFingerprint, check_resume, job_path, read_job_record, write_job_record
from serving.client.identity import ServedIdentity, check_servers
from serving.core.hashing import file_entry
from serving.jobs.lock import JobLock, lock_path
from serving.jobs.output import errors_path

SERVED = ServedIdentity("m", 1, "a" * 64, "s" * 64)


def test_second_lock_on_one_output_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "out.parquet"
    with JobLock(out):
        assert lock_path(out).read_text() == f"{os.getpid()}\n"
        with pytest.raises(JobLockedError, match=rf"--out {out}: another job is writing it \(process {os.getpid()} "
                                                 rf"holds {out}.lock\)"):
            JobLock(out).acquire()
        with JobLock(tmp_path / "out.csv"):  # another output, another lock
            pass
    assert not lock_path(out).exists()
    JobLock(out).acquire().release()


def test_a_sigkilled_holder_leaves_no_lock(tmp_path):
    out = tmp_path / "out.parquet"
    code = (f"import sys, time; sys.path.insert(0, {os.getcwd()!r}); from serving.jobs.lock import JobLock; "
            f"JobLock({str(out)!r}).acquire(); print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(JobLockedError, match=f"process {holder.pid} holds"):
            JobLock(out).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    with JobLock(out) as lock:  # the file is still there; the kernel dropped the lock with the process
        assert lock.held


def test_errors_and_job_files_are_named_from_the_whole_output_path(tmp_path):
    assert errors_path(tmp_path / "out.parquet") != errors_path(tmp_path / "out.csv")
    assert errors_path(tmp_path / "out.parquet").name == "out.parquet.errors.csv"
    assert job_path(tmp_path / "out.csv").name == "out.csv.job.json"
    assert lock_path(tmp_path / "out.csv").name == "out.csv.lock"


def test_fingerprint_differences_name_each_field_and_count_changed_inputs(tmp_path):
    files = []
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(b"x")
        files.append(file_entry(tmp_path / name))
    then = JobFingerprint.build(SERVED, {"tta": "none", "split": None}, files)
    out = tmp_path / "out.parquet"
    write_job_record(out, then, files)
    stored, listing = read_job_record(out)
    assert stored == then and stored.digest() == then.digest() and listing == files
    (tmp_path / "a.png").unlink()
    (tmp_path / "d.png").write_bytes(b"y")
    (tmp_path / "b.png").write_bytes(b"longer")
    now_files = [file_entry(tmp_path / n) for n in ("b.png", "c.png", "d.png")]
    other = ServedIdentity("m", 1, "b" * 64, "s" * 64)
    now = JobFingerprint.build(other, {"tta": "five", "split": None}, now_files)
    with pytest.raises(FingerprintMismatchError) as err:
        check_resume(out, stored, listing, now, now_files)
    msg = str(err.value)
    assert f"weights_sha256: {'a' * 64!r} then, {'b' * 64!r} now" in msg
    assert "option tta: 'none' then, 'five' now" in msg
    assert "inputs: 1 new, 1 missing, 1 changed (size or modification time) since the job started" in msg
    check_resume(out, stored, listing, then, files)  # the same job passes


def test_servers_that_disagree_are_named_with_the_field(tmp_path):
    other = ServedIdentity("m", 1, "b" * 64, "s" * 64)
    assert check_servers({"h:1": SERVED, "h:2": SERVED}) == SERVED
    with pytest.raises(ServerMismatchError, match=r"h:2 differs from h:1: weights_sha256 'bbbb"):
        check_servers({"h:1": SERVED, "h:2": other})


@pytest.mark.parametrize("name", ["name\n", "name\nother", "", "../x", "a b"])
def test_model_names_are_checked_as_whole_strings(name):
    from serving.core.spec import check_model_name

    with pytest.raises(SpecError, match="is not a safe Triton model name"):
        check_model_name(name)


def test_manifest_with_duplicate_paths_is_refused_listing_them(tmp_path):
    from serving.inputs.datasets import read_manifest

    for n in ("a.png", "b.png"):
        (tmp_path / n).write_bytes(b"")
    m = tmp_path / "m.csv"
    m.write_text(f"path,label\na.png,normal\nb.png,tumour\n./a.png,normal\n{tmp_path / 'b.png'},normal\n")
    with pytest.raises(InputError, match=rf"{m}: 2 paths are listed more than once: {tmp_path / 'a.png'} "
                                         rf"\(lines 2, 4\); {tmp_path / 'b.png'} \(lines 3, 5\)"):
        read_manifest(m, strict=False)


def test_manifest_whose_labels_are_none_of_the_models_classes_is_refused(tmp_path):
    from serving.inputs.datasets import read_manifest

    (tmp_path / "a.png").write_bytes(b"")
    m = tmp_path / "m.csv"
    m.write_text("path,label\na.png,B\n")
    with pytest.raises(InputError, match=r"no label of the manifest is one of the model's classes \['normal', "
                                         r"'tumour'\]; it has \['B'\]"):
        read_manifest(m, classes=("normal", "tumour"), strict=False)


def test_mpp_target_outside_what_the_pyramid_serves_is_refused():
    from serving.slides.tiling import check_mpp_target

    check_mpp_target("s.tiff", 0.5, 0.5, (1024, 768), (32, 32))
    check_mpp_target("s.tiff", 16.0, 0.5, (1024, 768), (32, 32))
    with pytest.raises(SlideError, match=r"--mpp-target 0.1: s.tiff can serve 0.4762 to 16 um/px"):
        check_mpp_target("s.tiff", 0.1, 0.5, (1024, 768), (32, 32))
    with pytest.raises(SlideError, match=r"--mpp-target 17: s.tiff can serve"):
        check_mpp_target("s.tiff", 17.0, 0.5, (1024, 768), (32, 32))


def test_key_file_is_private_and_stale_client_regions_of_dead_processes_go(tmp_path):
    from serving.server.state import write_key_file
    from serving.client.shm import remove_stale_regions

    key = write_key_file(tmp_path / "api_key", "secret")
    assert oct(key.stat().st_mode & 0o777) == "0o600" and key.read_text() == "secret\n"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"patchserve_{int(dead.stdout)}_ab_0_in"
    live = tmp_path / f"patchserve_{os.getpid()}_ab_0_out"
    other = tmp_path / "patchserve_notours"
    for p in (stale, live, other):
        p.write_bytes(b"")
    assert remove_stale_regions(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["api_key", live.name, other.name])
    assert isinstance(Path(tmp_path), Path)


# -- fast guards: what only tests with a server or a trained model caught before ---------------------------


def _cfg(tmp_path, inputs, **kw):
    from serving.jobs.config import ScoreConfig

    return ScoreConfig(inputs=tuple(map(str, inputs)), urls=("127.0.0.1:1",), model="m",
                       out=str(tmp_path / "out.parquet"), progress=False, retries=0, **kw)


def test_a_job_takes_its_outputs_lock_before_it_asks_any_server(tmp_path):
    from serving.jobs.engine import run_score

    cfg = _cfg(tmp_path, [tmp_path])
    with JobLock(cfg.out):  # no server listens on port 1: the lock must be what stops the job
        with pytest.raises(JobLockedError, match="another job is writing it"):
            run_score(cfg, log=lambda _m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_resume_checks_the_fingerprint_before_touching_anything(synth_data, tmp_path):
    from serving.inputs.registry import plan_inputs
    from serving.jobs.engine import prepare_output

    plan = plan_inputs((str(synth_data / "test"),), unit_patches=8)
    cfg = _cfg(tmp_path, [synth_data / "test"])
    fp = JobFingerprint.build(SERVED, cfg.options(), list(plan.listing))
    assert prepare_output(cfg, Path(cfg.out), fp, plan) == "new"
    record = job_path(cfg.out).read_bytes()
    other = JobFingerprint.build(ServedIdentity("m", 1, "b" * 64, "s" * 64), cfg.options(), list(plan.listing))
    resume = _cfg(tmp_path, [synth_data / "test"], resume=True)
    with pytest.raises(FingerprintMismatchError, match=r"weights_sha256: 'a{64}' then, 'b{64}' now\. Nothing was "
                                                       "changed"):
        prepare_output(resume, Path(cfg.out), other, plan)
    assert job_path(cfg.out).read_bytes() == record
    assert prepare_output(resume, Path(cfg.out), fp, plan) == "resume"
    (Path(cfg.out + ".parts") / "manifest.json").write_text("{}")  # an older patchserve's layout
    with pytest.raises(FingerprintMismatchError, match=r"written by an older patchserve \(one parts manifest\)"):
        prepare_output(resume, Path(cfg.out), fp, plan)


def test_a_changed_modification_time_changes_the_listing_and_the_fingerprint(synth_data, tmp_path):
    import shutil

    from serving.inputs.registry import plan_inputs

    folder = tmp_path / "images"
    shutil.copytree(synth_data / "test" / "normal", folder)
    before = plan_inputs((str(folder),), unit_patches=8).listing
    first = sorted(folder.iterdir())[0]
    os.utime(first, ns=(1, 1))
    after = plan_inputs((str(folder),), unit_patches=8).listing
    assert [a != b for a, b in zip(before, after)] == [True] + [False] * (len(before) - 1)
    assert JobFingerprint.build(SERVED, {}, list(before)) != JobFingerprint.build(SERVED, {}, list(after))


class _Transport:
    """What Pending needs from a client: its sends counted, its answers an error of the server's own kind."""

    url = "127.0.0.1:1"

    def __init__(self, status: str | None, retries: int):
        from serving.client.retry import RetryPolicy

        self.policy = RetryPolicy(retries=retries, backoff_s=0.0)
        self.status, self.sends = status, 0

    def _send(self, info, array, slot):
        self.sends += 1
        return None

    def _receive(self, info, handle, rows, slot):
        from tritonclient.utils import InferenceServerException

        raise InferenceServerException("the server said no", status=self.status)


@pytest.mark.parametrize("status, retried", [
    ("StatusCode.INVALID_ARGUMENT", False), ("StatusCode.INTERNAL", False), ("400", False), ("500", False),
    ("StatusCode.UNAVAILABLE", True), ("StatusCode.DEADLINE_EXCEEDED", True), ("503", True), ("429", True),
])
def test_retries_follow_the_status_code_never_the_message(status, retried):
    from serving.client.model_info import ModelInfo
    from serving.client.retry import Pending, is_retryable
    from serving.core.errors import InferenceError, ServerUnavailableError
    from tritonclient.utils import InferenceServerException

    # The message says "unavailable" and "timeout": only the status decides.
    assert is_retryable(InferenceServerException("unavailable, connection timeout", status=status)) is retried
    client = _Transport(status, retries=2)
    info = ModelInfo("m", "x", "UINT8", (1,), "p", 8, {})
    with pytest.raises(ServerUnavailableError if retried else InferenceError):
        Pending(client, info, [0], None).result()
    assert client.sends == (3 if retried else 1)
