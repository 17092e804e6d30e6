"""A time limit ends the whole tree of a command: torchrun's workers (each in a session of its own) too."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from serving.core.procs import process_gone
from serving.core.subproc import run_tree

ROOT = Path(__file__).resolve().parents[2]

# A torchrun worker that records its PID, then sleeps far past any time limit.
SLEEPER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    Path(sys.argv[1], f"rank{os.environ['RANK']}.pid").write_text(str(os.getpid()))
    time.sleep(600)
""")


def _torchrun_sleepers(tmp_path: Path) -> list[str]:
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
            str(tmp_path)]


def _wait_for(paths: list[Path], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(p.is_file() and p.read_text() for p in paths):
        assert time.monotonic() < deadline, f"not written in {timeout_s} s: {paths}"
        time.sleep(0.1)


def _gone_within(pids: list[int], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(process_gone(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


def test_a_command_that_finishes_returns_its_code_and_output():
    got = run_tree([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
                   timeout_s=60)
    assert (got.returncode, got.stdout, got.stderr, got.timed_out) == (3, "out\n", "err\n", False)


def test_the_time_limit_ends_a_child_that_left_the_group_while_its_parent_lived(tmp_path):
    # The grandchild starts a session of its own (as torchrun's workers do): a group kill misses it.
    pid_file = tmp_path / "grandchild.pid"
    code = (f"import subprocess, sys, time\n"
            f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)\n"
            f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
            f"time.sleep(600)\n")
    t0 = time.monotonic()
    got = run_tree([sys.executable, "-c", code], timeout_s=5, grace_s=2)
    assert got.timed_out and got.returncode is None
    assert time.monotonic() - t0 < 30
    assert _gone_within([got.pid, int(pid_file.read_text())])


@pytest.mark.parametrize("grace_s", [0.0, 3.0])
def test_the_time_limit_ends_torchrun_and_every_worker(tmp_path, grace_s):
    # grace 0: torchrun is killed before it can stop its workers itself, as a plain timeout kill did.
    got = run_tree(_torchrun_sleepers(tmp_path), timeout_s=25, grace_s=grace_s)
    assert got.timed_out
    pids = [int((tmp_path / f"rank{r}.pid").read_text()) for r in (0, 1)]  # both workers had started
    assert _gone_within([got.pid, *pids]), [p for p in pids if not process_gone(p)]


@pytest.mark.slow
def test_pytest_timeout_interrupting_a_gpu_test_ends_torchrun_workers(tmp_path):
    # The GPU tests' own guard: a per-test timeout (pytest-timeout, signal method, from the project's
    # ini) interrupts a test blocked on torchrun; the workers must not outlive it.
    probe = tmp_path / "test_probe.py"
    probe.write_text(textwrap.dedent(f"""
        import sys
        import pytest
        from serving.core.subproc import run_tree

        @pytest.mark.timeout(45)
        def test_hangs_in_torchrun():
            run_tree({_torchrun_sleepers(tmp_path)!r}, timeout_s=600, grace_s=3)
    """))
    proc = subprocess.run([sys.executable, "-m", "pytest", str(probe), "-q", "-p", "no:cacheprovider",
                           "--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1 and "Timeout (>45.0s)" in proc.stdout, proc.stdout[-2000:]
    pids = [int((tmp_path / f"rank{r}.pid").read_text()) for r in (0, 1)]
    assert _gone_within(pids), [p for p in pids if not process_gone(p)]
