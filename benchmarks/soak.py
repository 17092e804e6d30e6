"""Soak test: many patches at high concurrency through the client against the embedded server.

``python -m benchmarks.soak --patches 20000 --concurrency 64`` exports a
random-init classifier into a temporary folder, starts the embedded Triton on
it and streams the patches through :class:`serving.client.PatchClient`,
bounded by ``--max-seconds``. It checks: no request failed, every patch was
answered exactly once and in order (each answer equals ONNX Runtime's answer
for that patch, out of a pool of distinct patches whose size is coprime with
the batch, so a swap or a shift shows), and client and server memory stayed
flat (median RSS of the last quarter of the run at most ``--max-rss-growth``
times that of the first quarter, after warm-up). Results go to
``benchmarks/results/soak.json`` and to a section of ``benchmarks/RELIABILITY.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from serving.core.progress import bar_disable

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_JSON = BENCH_DIR / "results" / "soak.json"
RELIABILITY_MD = BENCH_DIR / "RELIABILITY.md"
SECTION = ("<!-- soak:begin -->", "<!-- soak:end -->")
POOL = 251  # distinct patches; prime, so no batch size lines the pool up with itself
ATOL = 1e-5
WARMUP_FRACTION = 0.1  # RSS samples of the first tenth of the run are warm-up


def rss_kib(pid: int) -> int:
    """Resident memory of one process (VmRSS), 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_kib(pid: int) -> int:
    """RSS of ``pid`` and its descendants: Triton runs each Python-backend model in a stub child process."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss_kib(p)
        todo.extend(children.get(p, []))
    return total


class RssSampler:
    """Sample client and server RSS every ``every_s`` seconds on a thread."""

    def __init__(self, server_pid: int | None, every_s: float = 0.25):
        self.server_pid, self.every_s = server_pid, every_s
        self.samples: list[tuple[float, int, int]] = []  # (seconds, client KiB, server KiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-rss", daemon=True)

    def _run(self) -> None:
        t0 = time.perf_counter()
        while not self._stop.is_set():
            server = tree_rss_kib(self.server_pid) if self.server_pid else 0
            self.samples.append((time.perf_counter() - t0, rss_kib(os.getpid()), server))
            self._stop.wait(self.every_s)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def growth(values: list[int]) -> tuple[float, float, float]:
    """(first-quarter median, last-quarter median, ratio) after dropping the warm-up."""
    v = values[int(len(values) * WARMUP_FRACTION):]
    if len(v) < 4:
        return float("nan"), float("nan"), float("nan")
    q = len(v) // 4
    first, last = statistics.median(v[:q]), statistics.median(v[-q:])
    return first, last, (last / first if first else float("nan"))


@dataclass
class SoakResult:
    patches: int
    concurrency: int
    batch_size: int
    answered: int = 0
    mismatched: int = 0
    failed_requests: int = 0
    seconds: float = 0.0
    timed_out: bool = False
    client_rss_mib: tuple[float, float] = (0.0, 0.0)  # first- and last-quarter medians
    server_rss_mib: tuple[float, float] = (0.0, 0.0)
    client_rss_growth: float = 0.0
    server_rss_growth: float = 0.0
    rss_samples: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def patches_per_s(self) -> float:
        return self.answered / self.seconds if self.seconds else 0.0

    def checks(self, max_rss_growth: float) -> dict[str, bool]:
        return {"zero errors": self.failed_requests == 0 and not self.errors,
                "every patch answered once, in order": self.answered == self.patches and self.mismatched == 0,
                "within --max-seconds": not self.timed_out,
                f"client RSS flat (<= {max_rss_growth}x)": self.client_rss_growth <= max_rss_growth,
                f"server RSS flat (<= {max_rss_growth}x)": self.server_rss_growth <= max_rss_growth}


def run_soak(url: str, model: str, pool_nhwc_u8: np.ndarray, expected: np.ndarray, *, patches: int,
             concurrency: int, max_seconds: float, server_pid: int | None, batch_size: int | None = None,
             sample_every_s: float = 0.25, progress: bool = True) -> SoakResult:
    """Send ``patches`` patches (patch i is ``pool[i % len(pool)]``) and check every answer."""
    from tqdm import tqdm

    from serving.client.patch_client import PatchClient
    from serving.client.stream import stream_predictions
    from serving.core.errors import InferenceError, PatchserveError

    n_pool = len(pool_nhwc_u8)
    with PatchClient(url, model, concurrency=concurrency, batch_size=batch_size) as client:
        rows = client.request_rows()
        result = SoakResult(patches, concurrency, rows)
        deadline = time.perf_counter() + max_seconds

        def groups():
            for start in range(0, patches, rows):
                if time.perf_counter() > deadline:
                    result.timed_out = True
                    return
                idx = np.arange(start, min(start + rows, patches)) % n_pool
                yield idx, pool_nhwc_u8[idx]

        t0 = time.perf_counter()
        bar = tqdm(total=patches, unit="patch", disable=bar_disable(progress), desc="soak")
        with RssSampler(server_pid, sample_every_s) as sampler:
            try:
                for idx, probs in stream_predictions([client], groups(), "none", on_error="record"):
                    if isinstance(probs, InferenceError):
                        result.failed_requests += 1
                        result.errors.append(str(probs))
                        continue
                    result.answered += len(idx)
                    result.mismatched += int((np.abs(probs - expected[idx]).max(axis=1) > ATOL).sum())
                    bar.update(len(idx))
            except PatchserveError as exc:
                result.errors.append(str(exc))
        bar.close()
        result.seconds = time.perf_counter() - t0
    samples = sampler.samples
    c_first, c_last, result.client_rss_growth = growth([s[1] for s in samples])
    s_first, s_last, result.server_rss_growth = growth([s[2] for s in samples])
    result.client_rss_mib = (round(c_first / 1024, 1), round(c_last / 1024, 1))
    result.server_rss_mib = (round(s_first / 1024, 1), round(s_last / 1024, 1))
    result.rss_samples = len(samples)
    return result


def reference(repo: Path, spec, n: int = POOL, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A pool of distinct random patches and ONNX Runtime's probabilities for each, in process."""
    import onnxruntime as ort

    pool = np.random.default_rng(seed).integers(0, 256, (n, *spec.input_hw, 3), dtype=np.uint8)
    onnx = sorted((repo / spec.name).glob("*/model.onnx"))[-1]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(onnx), options, providers=["CPUExecutionProvider"])
    return pool, session.run([spec.output_name], {spec.input_name: pool})[0]


def markdown(result: SoakResult, command: str, max_rss_growth: float, machine: str) -> str:
    checks = result.checks(max_rss_growth)
    lines = [SECTION[0], "", f"Command: `{command}`", "", f"Machine: {machine}", "",
             "| measure | value |", "|---|---|",
             f"| patches sent / answered | {result.patches:,} / {result.answered:,} |",
             f"| concurrency (requests in flight) x rows per request | {result.concurrency} x {result.batch_size} |",
             f"| failed requests / wrong or out-of-order answers | {result.failed_requests} / {result.mismatched} |",
             f"| wall time | {result.seconds:.1f} s ({result.patches_per_s:,.0f} patches/s) |",
             f"| client RSS, median of first / last quarter | {result.client_rss_mib[0]} / "
             f"{result.client_rss_mib[1]} MiB ({result.client_rss_growth:.3f}x) |",
             f"| server RSS (tritonserver + backend stubs), first / last quarter | {result.server_rss_mib[0]} / "
             f"{result.server_rss_mib[1]} MiB ({result.server_rss_growth:.3f}x) |",
             f"| RSS samples (every 0.25 s, first {WARMUP_FRACTION:.0%} dropped as warm-up) | {result.rss_samples} |",
             "", "Checks: " + ", ".join(f"{k}: {'pass' if ok else 'FAIL'}" for k, ok in checks.items()) + ".",
             "", SECTION[1]]
    return "\n".join(lines)


def write_section(md: Path, section: str) -> None:
    from serving.core.atomic import atomic_write_text

    text = md.read_text() if md.exists() else ""
    if SECTION[0] in text and SECTION[1] in text:
        head, rest = text.split(SECTION[0], 1)
        text = head + section + rest.split(SECTION[1], 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## Soak\n\n" + section + "\n"
    atomic_write_text(md, text)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Soak the client and the embedded server; check errors, order, memory.")
    p.add_argument("--patches", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    p.add_argument("--max-seconds", type=float, default=900.0, help="stop sending after this long (a failed check)")
    p.add_argument("--image-size", type=int, default=32, help="patch size of the random-init model")
    p.add_argument("--max-batch-size", type=int, default=16, help="the exported model's max batch (rows per request)")
    p.add_argument("--max-rss-growth", type=float, default=1.2)
    p.add_argument("--out", default=str(RESULTS_JSON))
    p.add_argument("--markdown", default=str(RELIABILITY_MD))
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return p


def main(args: argparse.Namespace) -> int:
    from benchmarks.common import export_random_model, machine_info, machine_line
    from serving.core.atomic import atomic_write_text
    from serving.server.embedded import EmbeddedTriton

    if args.patches < 1 or args.concurrency < 1:
        raise SystemExit("--patches and --concurrency: expected positive integers")
    with tempfile.TemporaryDirectory(prefix="patchserve-soak-") as tmp:
        repo, spec = export_random_model(Path(tmp), size=args.image_size, max_batch_size=args.max_batch_size,
                                         name="soak")
        pool, expected = reference(repo, spec)
        with EmbeddedTriton(repo) as server:
            result = run_soak(server.urls.grpc, spec.name, pool, expected, patches=args.patches,
                              concurrency=args.concurrency, max_seconds=args.max_seconds,
                              server_pid=server.process.pid, progress=args.progress)
    command = "python -m benchmarks.soak " + " ".join(sys.argv[1:])
    checks = result.checks(args.max_rss_growth)
    doc = {"command": command.strip(), "machine": machine_info(), "result": asdict(result),
           "patches_per_s": result.patches_per_s, "checks": checks}
    atomic_write_text(Path(args.out), json.dumps(doc, indent=2) + "\n")
    section = markdown(result, command.strip(), args.max_rss_growth, machine_line(doc["machine"]))
    write_section(Path(args.markdown), section)
    print(section)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
