"""export --overwrite is atomic: SIGINT (as a terminal sends it, to the process group) or SIGKILL at
several moments of a real export process leaves every model old or new and complete, the family
unmixed, the gate green; the next export removes what the killed one left beside the repository."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from export.build import export_run
from export.check import check_repository
from export.manifest import read_manifest


def _sigint_default():
    # A background job of a non-interactive shell starts with SIGINT ignored and
    # would pass this test without testing anything: give the child the default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _ignores_sigint(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
    raise AssertionError(f"no SigIgn line for {pid}")


def _weights(run) -> str:
    from training.checkpoint import read_checkpoint, weights_sha256

    return weights_sha256(read_checkpoint(run)["model"])


def _moments(spec):
    """Paths whose appearance in the export's work folder marks a moment of the export."""
    return {
        "staging-created": lambda w: (w / "staging").is_dir(),
        "classifier-onnx-written": lambda w: (w / "staging" / spec.name / "1" / "model.onnx").is_file(),
        "tta-onnx-written": lambda w: (w / "staging" / spec.tta_model_name / "1" / "model.onnx").is_file(),
        "manifests-written": lambda w: (w / "staging" / spec.tta_model_name / "1" / "manifest.json").is_file(),
        "swapping": lambda w: (w / "trash").is_dir(),
    }


def _interrupt(cmd, parent: Path, repo: Path, reached, sig) -> tuple[int, bool]:
    """Start the export, wait until ``reached(work folder)``, send ``sig`` to its process group."""
    proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=_sigint_default,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert not _ignores_sigint(proc.pid)
        work = parent / f".{repo.name}.export-{proc.pid}"
        hit = False
        while proc.poll() is None:
            if work.is_dir() and reached(work):
                os.killpg(proc.pid, sig)
                hit = True
                break
            time.sleep(0.002)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode in (0, 130, -signal.SIGKILL), err.decode()[-2000:]
    return proc.returncode, hit


def _state(repo: Path, spec, a: str, b: str) -> str:
    names = sorted(p.name for p in repo.iterdir())
    assert names == sorted([spec.name, spec.tta_model_name])  # nothing half-written inside the repository
    seen = {read_manifest(repo / n, 1).weights_sha256 for n in names}
    assert len(seen) == 1 and seen <= {a, b}, "models of two exports mixed"
    report = check_repository(repo, serve=False)
    assert report.passed, report.table()
    return "new" if seen == {b} else "old"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_interrupted_overwrite_leaves_old_or_new_complete_and_the_next_export_cleans_up(
        export_run_dir, synth_data, tmp_path, sig):
    from training.checkpoint import read_checkpoint, write_random_run

    spec = read_checkpoint(export_run_dir)["spec"]
    other = write_random_run(tmp_path / "other_run", spec, seed=1)
    a, b = _weights(export_run_dir), _weights(other)
    assert a != b
    parent = tmp_path / "repos"
    repo = parent / "repo"
    export_run(export_run_dir, repo, with_dali=False, data=synth_data)
    snapshot = shutil.copytree(repo, tmp_path / "snapshot")
    cmd = [sys.executable, "-m", "patchserve", "export", str(other), "--repo", str(repo), "--overwrite",
           "--no-dali", "--no-progress", "--data", str(synth_data)]
    moments = _moments(spec)
    # SIGKILL at the moments in between; Ctrl-C at the start, midway and during the swap
    # (tests/unit/test_staging_signals.py holds the swap's deferral of the signal itself).
    keep = ("classifier-onnx-written", "manifests-written") if sig == signal.SIGKILL else \
        ("staging-created", "tta-onnx-written", "swapping")
    moments = {k: moments[k] for k in keep}
    outcomes = {}
    for moment, reached in moments.items():
        rc, hit = _interrupt(cmd, parent, repo, reached, sig)
        outcomes[moment] = (rc, hit, _state(repo, spec, a, b))
        # Put the old export back for the next moment.
        shutil.rmtree(repo)
        shutil.copytree(snapshot, repo)
    for moment, (rc, hit, state) in outcomes.items():
        if rc == 0:
            assert state == "new", (moment, outcomes)  # it finished before the signal
        elif moment != "swapping":
            assert state == "old", (moment, outcomes)  # interrupted before the swap: nothing changed
    assert any(hit and rc != 0 for rc, hit, _ in outcomes.values()), outcomes
    if sig == signal.SIGINT:
        # Ctrl-C cleans up after itself; SIGKILL leaves its work folder to the next export.
        assert [p.name for p in parent.iterdir()] == ["repo"]
    else:
        export_run(other, repo, with_dali=False, data=synth_data, overwrite=True)
        assert [p.name for p in parent.iterdir()] == ["repo"]
        report = check_repository(repo, serve=True, run=other)
        assert report.passed, report.table()


# Loaded into the export process through PYTHONPATH (sitecustomize): moments of the swap made observable.
_SWAP_HOOK = r'''
import os, shutil, signal, time

_mode, _mark, _repo = os.environ["SWAP_HOOK"], os.environ["SWAP_HOOK_MARK"], os.environ["SWAP_HOOK_REPO"]
_fsync, _rmtree = os.fsync, shutil.rmtree


def fsync(fd):
    try:
        where = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        where = ""
    if _mode == "held" and where == _repo:  # the swap's last step: a slow disk keeps it open for 3 s
        open(_mark, "w").close()
        time.sleep(3)
    return _fsync(fd)


class _Finaliser:
    """Ctrl-C arriving while an object's __del__ runs (tqdm's, as it happened): Python raises the
    KeyboardInterrupt inside __del__, prints "Exception ignored in" and goes on."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):
            pass


def rmtree(path, *args, **kwargs):
    if _mode == "del" and ".export-" in os.fspath(path):  # the first thing after the swap
        _Finaliser()
    return _rmtree(path, *args, **kwargs)


os.fsync, shutil.rmtree = fsync, rmtree
'''


@pytest.mark.parametrize("mode", ["held", "del"], ids=["held-during-the-swap", "lost-in-a-del-after-it"])
def test_ctrl_c_at_the_swap_ends_export_with_130_and_the_new_models_complete(export_run_dir, synth_data, tmp_path,
                                                                              mode):
    from training.checkpoint import read_checkpoint, write_random_run

    spec = read_checkpoint(export_run_dir)["spec"]
    other = write_random_run(tmp_path / "other_run", spec, seed=1)
    repo = tmp_path / "repos" / "repo"
    export_run(export_run_dir, repo, with_dali=False, data=synth_data)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_SWAP_HOOK)
    mark = tmp_path / "in-swap"
    env = dict(os.environ, SWAP_HOOK=mode, SWAP_HOOK_MARK=str(mark), SWAP_HOOK_REPO=str(repo.resolve()),
               PYTHONPATH=os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p))
    cmd = [sys.executable, "-m", "patchserve", "export", str(other), "--repo", str(repo), "--overwrite",
           "--no-dali", "--no-progress", "--data", str(synth_data)]
    proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=_sigint_default, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if mode == "held":
            while proc.poll() is None and not mark.exists():
                time.sleep(0.01)
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the middle of the swap
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, (proc.returncode, err[-3000:])
    assert err.rstrip().endswith("patchserve export: interrupted"), err[-3000:]
    if mode == "held":
        assert "wrote " not in out  # it ended right after the swap, before reporting what it wrote
    else:
        assert "KeyboardInterrupt" in err  # what Python printed from the __del__, and went on
    assert _state(repo, spec, _weights(export_run_dir), _weights(other)) == "new"  # the swap finished, whole
    assert [p.name for p in repo.parent.iterdir()] == ["repo"]
