"""patchserve as it was at an earlier commit against the checkout, on one slide: the whole command, its CPU and
its memory.

    .venv/bin/python -m benchmarks.then_now --before REV --out DIR [--slide-size 8192] [--repeats 5]

Both trees run the same way, each with its own code from export to score: one random-init resnet18 run at
64 px (the `bench peer` model) exported by each tree's ``patchserve export`` with its defaults, each
repository served by that tree's embedded Triton server, and that tree's ``patchserve score SLIDE --url``
against it, on the same synthetic slide. The earlier tree is a ``git worktree`` of REV, removed at the end;
both use this interpreter and its packages. Arms interleaved after a warm-up each; per arm the median tiles/s
(the command's wall time), CPU-ms per tile (client and server trees, benchmarks/proctree.py) and peak RSS of the
client and of the server tree. Writes DIR/then_now.json and prints the table: what "no higher than today's"
is measured against (issue 28).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import interleave, machine_info, machine_line
from benchmarks.errors import BenchmarkError
from benchmarks.proctree import run_tree

HERE = Path(__file__).resolve().parent.parent
SIZE, BATCH = 64, 32
# Started under a tree's code: serves REPO until its stdin closes, after one line "GRPC-URL SERVER-PID".
SERVE = ("import sys\nfrom serving.server.embedded import EmbeddedTriton\n"
         "with EmbeddedTriton(sys.argv[1]) as s:\n"
         "    print(s.urls.grpc, s.process.pid, flush=True)\n    sys.stdin.read()\n")


# Every child runs in the temporary folder: ``python -m`` puts its working folder first on sys.path, so one
# started in this checkout would import this checkout's code whatever PYTHONPATH says.
def _tree_env(tree: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(tree)
    return env


def _check(cmd: list[str], env: dict[str, str], what: str, cwd: Path) -> None:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=cwd)
    if done.returncode != 0:
        raise BenchmarkError(f"{what} failed:\n{(done.stderr or done.stdout)[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="the earlier commit (any git revision)")
    ap.add_argument("--out", required=True, type=Path, help="folder for then_now.json")
    ap.add_argument("--slide-size", type=int, default=8192, help="level-0 width of the synthetic slide (px)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    from benchmarks.bench_peer import _make_run, read_patchserve_parquet
    from serving.synth.slide import write_slide

    args.out.mkdir(parents=True, exist_ok=True)
    rev = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", args.before], capture_output=True,
                         text=True, check=True).stdout.strip()
    now = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, check=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(HERE), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True).stdout.strip())
    names = {"then": f"patchserve at {rev}", "now": f"patchserve at {now}{' + changes' if dirty else ''}"}
    with tempfile.TemporaryDirectory(prefix="then-now-") as tmp:
        tmp = Path(tmp)
        before = tmp / "before"
        subprocess.run(["git", "-C", str(HERE), "worktree", "add", "--detach", str(before), args.before],
                       check=True, capture_output=True)
        servers: list[subprocess.Popen] = []
        try:
            trees = {"then": before, "now": HERE}
            run_dir, spec = _make_run(tmp / "run")
            written = write_slide(tmp / "synth", patch_size=SIZE, slide_size=args.slide_size)
            urls = {}
            for key, tree in trees.items():
                env = _tree_env(tree)
                _check([sys.executable, "-m", "patchserve", "export", str(run_dir), "--repo", str(tmp / f"repo-{key}")],
                       env, f"{names[key]}: export", cwd=tmp)
                server = subprocess.Popen([sys.executable, "-c", SERVE, str(tmp / f"repo-{key}")], env=env,
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=tmp)
                servers.append(server)
                line = server.stdout.readline().split()
                if len(line) != 2:
                    raise BenchmarkError(f"{names[key]}: the embedded server did not start")
                urls[key] = (line[0], int(line[1]))
                print(f"  {names[key]}: served at {line[0]} (server pid {line[1]}) from {tree}", flush=True)
            runs = {k: [] for k in trees}
            counts = {}
            counter = iter(range(10 ** 6))

            def arm(key: str):
                def score() -> int:
                    out = tmp / f"scores-{next(counter)}.parquet"
                    url, pid = urls[key]
                    cmd = [sys.executable, "-m", "patchserve", "score", str(written.slide), "--url", url,
                           "--model", spec.name, "--out", str(out), "--no-progress"]
                    r = run_tree(cmd, log=tmp / "log.txt", env=_tree_env(trees[key]), cwd=tmp, server_pid=pid)
                    n = len(read_patchserve_parquet(out, spec.class_names))
                    runs[key].append(r)
                    counts[key] = n
                    return n
                return score

            t0 = time.perf_counter()
            got = interleave({k: arm(k) for k in trees}, items=1, repeats=args.repeats, unit="tiles/s")
            seconds = time.perf_counter() - t0
        finally:
            for server in servers:
                server.stdin.close()
                server.wait(timeout=120)
            subprocess.run(["git", "-C", str(HERE), "worktree", "remove", "--force", str(before)],
                           capture_output=True)
    rows = []
    for key, t in got.items():
        timed = runs[key][-args.repeats:]  # the warm-up ran first
        cpu = statistics.median(r.total_cpu_s for r in timed)
        rows.append({"tree": names[key], "tiles": counts[key], "tiles/s": round(t.rate, 1),
                     "CPU-ms/tile": round(1e3 * cpu / counts[key], 2),
                     "client CPU-ms/tile": round(1e3 * statistics.median(r.cpu_s for r in timed) / counts[key], 2),
                     "client peak RSS MB": round(statistics.median(r.peak_rss_mb for r in timed), 1),
                     "server peak RSS MB": round(statistics.median(r.server_peak_rss_mb for r in timed), 1),
                     "runs": [r.__dict__ | {"extra": None} for r in timed]})
    doc = {"machine": machine_line(machine_info()), "command": " ".join(["python -m benchmarks.then_now", *sys.argv[1:]]),
           "slide": list(written.level_dimensions[0]), "repeats": args.repeats, "seconds": seconds, "rows": rows}
    (args.out / "then_now.json").write_text(json.dumps(doc, indent=1) + "\n")
    cols = ["tree", "tiles", "tiles/s", "CPU-ms/tile", "client CPU-ms/tile", "client peak RSS MB",
            "server peak RSS MB"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
