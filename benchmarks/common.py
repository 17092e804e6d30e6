"""What every benchmark shares: timing with warm-up and medians, the machine
description, JSON results, the RESULTS.md table and a plot.

Each stage's table in ``benchmarks/RESULTS.md`` sits between
``<!-- bench:STAGE -->`` and ``<!-- /bench:STAGE -->`` markers and is
replaced whole on every run of that stage, so the file always holds the
latest figures of each stage with the command that produced them.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
RESULTS_MD = BENCH_DIR / "RESULTS.md"


@dataclass(frozen=True)
class Timing:
    """Throughput of one measured thing: medians over repeats, after warm-up."""

    name: str
    items: int  # items processed per repeat (images, patches, tiles)
    seconds: tuple[float, ...]
    unit: str = "images/s"
    extra: dict = field(default_factory=dict)

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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["seconds"] = list(self.seconds)
        d.update(median_s=self.median_s, rate=self.rate, rate_min=self.rate_min, rate_max=self.rate_max)
        return d


def measure(name: str, fn: Callable[[], int | None], *, items: int, warmup: int = 1, repeats: int = 3,
            unit: str = "images/s", **extra) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed.

    ``fn`` may return the number of items it processed (else ``items``).
    """
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = fn()
        seconds.append(time.perf_counter() - t0)
        if isinstance(n, int) and n > 0:
            items = n
    return Timing(name, items, tuple(seconds), unit, dict(extra))


def percentiles_ms(latencies_s: list[float]) -> dict[str, float]:
    import numpy as np

    a = np.asarray(latencies_s) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99))}


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


@dataclass
class Target:
    """A ratio the issue asks for: ``measured / baseline >= minimum`` (or <= maximum)."""

    name: str
    ratio: float
    target: float
    higher_is_better: bool = True

    @property
    def met(self) -> bool:
        return self.ratio >= self.target if self.higher_is_better else self.ratio <= self.target

    def to_dict(self) -> dict:
        return {"name": self.name, "ratio": round(self.ratio, 3), "target": self.target,
                "comparison": ">=" if self.higher_is_better else "<=", "met": self.met}


def write_results(stage: str, *, command: str, rows: list[dict], columns: list[str], targets: list[Target],
                  notes: list[str], payload: dict, quick: bool, plot: Callable[[Path], None] | None = None) -> Path:
    """Write ``results/STAGE.json``, ``results/STAGE.png`` and the stage's table in RESULTS.md."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    doc = {"stage": stage, "command": command, "quick": quick, "machine": info,
           "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows,
           "targets": [t.to_dict() for t in targets], "notes": notes, **payload}
    json_path = RESULTS_DIR / f"{stage}.json"
    json_path.write_text(json.dumps(doc, indent=2, default=float) + "\n")
    png = RESULTS_DIR / f"{stage}.png"
    if plot is not None:
        plot(png)
    _update_markdown(stage, doc, columns, png if plot is not None else None)
    return json_path


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3g}"
    return str(v)


def _update_markdown(stage: str, doc: dict, columns: list[str], png: Path | None) -> None:
    lines = [f"<!-- bench:{stage} -->", f"### {stage}", "",
             f"Machine: {machine_line(doc['machine'])}. Measured {doc['when']}"
             f"{' (quick mode)' if doc['quick'] else ''} with `{doc['command']}`.", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in doc["rows"]:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    if doc["targets"]:
        lines += ["", "| target | measured ratio | wanted | met |", "|---|---|---|---|"]
        for t in doc["targets"]:
            lines.append(f"| {t['name']} | {t['ratio']:.2f} | {t['comparison']} {t['target']} | "
                         f"{'yes' if t['met'] else '**no**'} |")
    if doc["notes"]:
        lines += [""] + [f"- {n}" for n in doc["notes"]]
    if png is not None:
        lines += ["", f"![{stage}](results/{png.name})"]
    lines.append(f"<!-- /bench:{stage} -->")
    block = "\n".join(lines)
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else _RESULTS_HEADER
    pattern = re.compile(rf"<!-- bench:{stage} -->.*?<!-- /bench:{stage} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS_MD.write_text(text)


_RESULTS_HEADER = """# Benchmark results

Every figure below was measured by the command shown with it, on the machine
named with it: medians over repeats after a warm-up, min and max beside them,
ratios measured within one run. Regenerate with `make bench` (all stages,
quick mode) or `patchserve bench STAGE`. JSON with every repeat is in
`benchmarks/results/`.
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
    from serving.spec import ModelSpec
    from training.checkpoint import write_random_run

    spec = ModelSpec(name=name, class_names=("normal", "tumour"), input_height=size, input_width=size,
                     mean=(0.7, 0.55, 0.7), std=(0.15, 0.2, 0.15), arch=arch, max_batch_size=max_batch_size)
    run = write_random_run(folder / "run", spec)
    repo = folder / "repo"
    export_run(run, repo, formats=("python",), with_dali=False, instances=instances, overwrite=True)
    return repo, spec
