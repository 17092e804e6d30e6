"""The GPU check: one command that brings figures back for whatever is installed.

``scripts/gpu-check`` runs the steps below in order, each in a process of its
own (a session of its own too: a time limit ends its whole tree, torchrun's
workers included; ``serving.core.subproc``), each with its own time limit
within one budget (450 s by default, so a run fits 8 minutes on one GPU with
start-up). ``gpu-check.json`` and ``gpu-check.md`` are rewritten after every
step (atomically), so a run killed midway keeps what finished. A step whose
package is missing says "not installed", never "failed"; without CUDA the
GPU steps say "no CUDA". ``--dry-run`` takes every step at toy sizes on the
CPU (``benchmarks.gpu_common``), and runs in the test suite.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from benchmarks.errors import GpuCheckError
from benchmarks.gpu_common import REQUIREMENTS, GpuSizes, device_name, installed
from serving.core.atomic import atomic_write_text
from serving.core.subproc import TreeRun, run_tree

SCHEMA = 1
JSON_NAME = "gpu-check.json"
MD_NAME = "gpu-check.md"
DEFAULT_BUDGET_S = 450.0
GRACE_S = 10.0  # for a step's tree to end after its limit

@dataclass(frozen=True)
class Step:
    name: str
    needs: tuple[str, ...]
    timeout_s: float  # its own limit (cut to what is left of the budget)
    min_s: float  # started only with this much of the budget left
    cuda: bool = True  # needs CUDA in a full run
    dry_run_needs: tuple[str, ...] | None = None  # what the dry run needs instead of ``needs``

    def requirements(self, sizes: GpuSizes) -> tuple[str, ...]:
        return self.dry_run_needs if sizes.dry_run and self.dry_run_needs is not None else self.needs


_TORCH = ("torch", "torchvision")
_EXPORT = (*_TORCH, "onnx", "onnxscript", "onnxruntime")
# In order; torch.compile last: it runs when the budget still allows.
STEPS: tuple[Step, ...] = (
    # A first import of torch from a cold disk took over 90 s once on this project's CPU machine.
    Step("environment", (), 150, 20, cuda=False),
    Step("train", _TORCH, 150, 60),
    Step("infer", _TORCH, 120, 40),
    Step("onnx", _EXPORT, 240, 90),  # two ResNet50 exports (fp32, fp16) and their parity
    Step("ddp", _TORCH, 150, 45),
    Step("dali", (*_TORCH, "dali"), 180, 60),
    Step("onnxruntime-gpu", (*_EXPORT, "onnxruntime-gpu"), 180, 60, dry_run_needs=_EXPORT),
    Step("tensorrt", (*_EXPORT, "tensorrt"), 300, 120),
    Step("train-compile", _TORCH, 300, 120),
)
STEP_NAMES = tuple(s.name for s in STEPS)


# -- inside a step's process ------------------------------------------------------------------

def _version(*distributions: str) -> str | None:
    """The installed version of the first of ``distributions`` that is installed."""
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def environment(sizes: GpuSizes) -> dict:
    """What this machine has: versions, the GPU, which packages are installed."""
    import numpy

    env = {"python": platform.python_version(), "numpy": numpy.__version__, "mode": sizes.mode,
           "packages": {r: installed(r) for r in REQUIREMENTS}}
    try:
        import torch
    except ImportError:
        return {**env, "what": "versions and devices", "torch": None, "cuda": False, "gpus": 0, "device": "no torch"}
    env.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda=torch.cuda.is_available(),
               gpus=torch.cuda.device_count())
    if env["cuda"]:
        props = torch.cuda.get_device_properties(0)
        env.update(device=torch.cuda.get_device_name(0), compute_capability=f"{props.major}.{props.minor}",
                   device_memory_mib=round(props.total_memory / 2**20), cudnn=torch.backends.cudnn.version(),
                   nccl=".".join(map(str, torch.cuda.nccl.version())))
    else:
        env["device"] = "no CUDA"
    for name, dists in (("torchvision", ("torchvision",)), ("onnx", ("onnx",)), ("onnxscript", ("onnxscript",)),
                        ("onnxruntime", ("onnxruntime", "onnxruntime-gpu"))):
        env[name] = _version(*dists)
    if env["onnxruntime"]:
        import onnxruntime

        env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    env["what"] = "versions and devices"
    if sizes.dry_run:
        env["device"] = device_name(sizes)
    return env


def run_step(name: str, sizes: GpuSizes, workdir: Path, result_path: Path, dist_info=None) -> int:
    """Run one step here and write its result to ``result_path`` (rewritten after each row of a
    many-engine step). Returns the exit status for the step's process."""
    def write(result: dict) -> None:
        atomic_write_text(result_path, json.dumps(result, indent=1, default=str) + "\n")

    try:
        result = _dispatch(name, sizes, workdir, write, dist_info)
    except Exception as exc:  # noqa: BLE001 - the step's failure is its result
        write({"status": "failed", "error": f"{type(exc).__name__}: {str(exc)[:1500]}",
               "traceback": traceback.format_exc()[-3000:]})
        return 1
    if result is None:  # a DDP rank other than 0
        return 0
    if "status" not in result:
        result["status"] = "failed" if result.get("error") else "ok"
    write(result)
    return 0 if result["status"] != "failed" else 1


def _dispatch(name: str, sizes: GpuSizes, workdir: Path, write: Callable[[dict], None], dist_info):
    from benchmarks import gpu_ddp, gpu_onnx, gpu_serve, gpu_train

    if name == "environment":
        return environment(sizes)
    if name in ("train", "train-compile"):
        row = gpu_train.train_throughput(sizes, compile=name == "train-compile")
        if not row["loss_finite"]:
            row["error"] = f"the loss is not finite after the timed steps ({row['last_loss']})"
        return row
    if name == "infer":
        return gpu_serve.torch_inference(sizes)
    if name == "onnx":
        return gpu_onnx.onnx_parity(sizes, workdir)
    if name == "ddp":
        row = gpu_ddp.ddp_steps(dist_info, sizes)
        if row is not None and not (row["ddp_wrapped"] and row["weights_agree_across_ranks"]):
            row["error"] = "DDP left the ranks' weights different" if row["ddp_wrapped"] else "not DDP-wrapped"
        return row
    if name == "dali":
        return gpu_train.dali_fed(sizes, workdir)
    if name in ("onnxruntime-gpu", "tensorrt"):
        max_batch = sizes.batch if not sizes.dry_run else 4
        spec, onnx_path = gpu_serve.export_served(sizes, workdir / "served", max_batch)
        engines = (gpu_serve.onnxruntime_engines(spec, onnx_path, sizes, max_batch) if name == "onnxruntime-gpu"
                   else [gpu_serve.tensorrt_engine(spec, onnx_path, workdir / "served")])
        result = {"what": f"{sizes.arch} {sizes.image}px served graph through the engines of the "
                          f"{'onnxruntime' if name == 'onnxruntime-gpu' else 'tensorrt'} flavour, in-process",
                  "device": device_name(sizes), "rows": []}

        def on_row(row: dict) -> None:
            result["rows"].append(row)
            write({**result, "status": "running"})

        rows = gpu_serve.engine_rows(engines, sizes, max_batch, on_row)
        statuses = {r["status"] for r in rows}
        result["status"] = ("failed" if "failed" in statuses else
                            "not installed" if statuses == {"not installed"} else "ok")
        return result
    raise GpuCheckError(f"--step: invalid step {name!r}. Only {', '.join(STEP_NAMES)} are supported.")


# -- the orchestrating process -----------------------------------------------------------------

def step_command(script: Path, step: Step, sizes: GpuSizes, workdir: Path, result_path: Path,
                 nproc: int) -> list[str]:
    """How ``script`` (scripts/gpu-check) runs one step in a process of its own; the ddp step under torchrun."""
    args = [str(script), "--step", step.name, "--sizes", sizes.mode, "--workdir", str(workdir),
            "--result", str(result_path)]
    if step.name == "ddp":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]
    return [sys.executable, *args]


@dataclass
class GpuCheck:
    """Runs the steps through ``script``, each in its own process tree with its own time limit."""

    sizes: GpuSizes
    out: Path
    workdir: Path
    script: Path
    budget_s: float = DEFAULT_BUDGET_S
    steps: tuple[Step, ...] = STEPS
    on_step: Callable[[dict], None] = lambda record: None

    def __post_init__(self) -> None:
        self.started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        self.t0 = time.monotonic()
        self.records: list[dict] = []
        self.environment: dict = {}

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def report(self, finished: bool) -> dict:
        return {"schema": SCHEMA, "mode": self.sizes.mode, "precision": self.sizes.precision,
                "started": self.started, "seconds": round(time.monotonic() - self.t0, 1),
                "budget_s": self.budget_s, "finished": finished,
                "device": self.environment.get("device", "unknown"), "environment": self.environment,
                "steps": self.records}

    def write(self, finished: bool = False) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        report = self.report(finished)
        atomic_write_text(self.out / JSON_NAME, json.dumps(report, indent=2, default=str) + "\n")
        atomic_write_text(self.out / MD_NAME, markdown(report))

    def run(self) -> dict:
        self.write()
        for step in self.steps:
            record = self._run_one(step)
            if step.name == "environment":
                self.environment = {k: v for k, v in record.items() if k not in ("step", "status", "seconds")}
            self.records.append(record)
            self.write()
            self.on_step(record)
        self.write(finished=True)
        return self.report(finished=True)

    def _skip(self, step: Step) -> dict | None:
        missing = [REQUIREMENTS[r][1] for r in step.requirements(self.sizes) if not installed(r)]
        if missing:
            return {"status": "not installed", "missing": ", ".join(missing)}
        # Unknown (the environment step failed) is not "no CUDA": the step then runs and finds out.
        if step.cuda and not self.sizes.dry_run and self.environment.get("cuda") is False:
            return {"status": "no CUDA", "note": f"torch sees no CUDA device ({self.environment.get('device')})"}
        if self.left_s() < step.min_s:
            return {"status": "no time left", "note": f"{self.left_s():.0f} s of the {self.budget_s:.0f} s budget "
                                                      f"left; the step needs {step.min_s:.0f} s"}
        return None

    def _nproc(self, step: Step) -> int:
        if step.name != "ddp":
            return 1
        # Two processes only where two GPUs exist; the dry run's gloo group takes two CPU processes.
        return 2 if self.sizes.dry_run else max(1, min(2, int(self.environment.get("gpus") or 1)))

    def _run_one(self, step: Step) -> dict:
        skipped = self._skip(step)
        if skipped is not None:
            return {"step": step.name, **skipped, "seconds": 0.0}
        timeout_s = min(step.timeout_s, max(1.0, self.left_s()))
        result_path = self.workdir / f"{step.name}.json"
        result_path.unlink(missing_ok=True)
        t0 = time.monotonic()
        cmd = step_command(self.script, step, self.sizes, self.workdir, result_path, self._nproc(step))
        try:
            # die_with_parent: a gpu-check killed outright takes the step's process with it.
            run: TreeRun = run_tree(cmd, timeout_s=timeout_s, grace_s=GRACE_S, die_with_parent=True)
        except BaseException:
            # Ctrl-C or SIGTERM of gpu-check: the step's tree has been ended; keep what it wrote.
            self.records.append({"step": step.name, "status": "interrupted", **_read(result_path),
                                 "seconds": round(time.monotonic() - t0, 1)})
            self.write()
            raise
        result = _read(result_path)
        record = {"step": step.name, **result, "seconds": round(run.seconds, 1), "limit_s": round(timeout_s)}
        if run.timed_out:
            record["status"] = "timed out"
            record["note"] = f"ended at its {timeout_s:.0f} s limit, its whole process tree with it"
        elif not result or result.get("status") == "running":
            record["status"] = "failed"
            record["error"] = f"exit code {run.returncode} without a result: {(run.stderr or run.stdout)[-1500:]}"
        return record


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# -- the report a person reads -------------------------------------------------------------------

_FIGURES = ("images_per_s", "p50_ms_batch1", "p99_ms_batch1", "vs_anchor", "peak_allocated_mib", "first_step_s",
            "backend", "ranks", "max_abs_logit_diff")


def _figures(d: dict) -> str:
    parts = []
    for key in _FIGURES:
        if d.get(key) is not None:
            parts.append(f"{key} {d[key]}")
    for key in ("fp32", "fp16", "pipeline_alone", "dali_fed_training"):
        if isinstance(d.get(key), dict):
            parts.append(f"{key}: {_figures(d[key]) or d[key].get('status')} "
                         f"{'(' + d[key]['status'] + ')' if 'status' in d[key] else ''}".strip())
    return "; ".join(parts)


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# gpu-check ({report['mode']}) on {report['device']}", "",
             f"python {env.get('python', '?')}, numpy {env.get('numpy', '?')}, torch {env.get('torch', '?')} "
             f"(CUDA {env.get('torch_cuda', '-')}), {report['precision']}; started {report['started']}, "
             f"{report['seconds']:.0f} s of a {report['budget_s']:.0f} s budget"
             + ("" if report["finished"] else " (not finished: the run stopped here)"), "",
             "| step | status | device | figures | note |", "|---|---|---|---|---|"]
    for r in report["steps"]:
        rows = r.get("rows") or [None]
        for sub in rows:
            d = sub or r
            name = r["step"] if sub is None else f"{r['step']}: {sub['what']}"
            note = d.get("error") or d.get("missing") or d.get("note") or d.get("anchor") or ""
            if d.get("status") == "not installed" and d.get("missing"):
                note = f"not installed: {d['missing']}"
            lines.append(f"| {name} | {d.get('status', '')} | {d.get('device', r.get('device', ''))} | "
                         f"{_figures(d)} | {str(note).replace('|', '/')[:300]} |")
    return "\n".join(lines) + "\n"
