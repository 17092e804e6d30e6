"""The main job, end to end on the embedded defaults.

synth (patches + a slide) -> train a resnet18 briefly on the CPU with HED
stain augmentation -> evaluate on the test split and on a second centre's
stain (test_shifted), side by side -> export (python, onnxruntime, tta and dali configurations) -> check-export
-> start the embedded Triton server -> score the test folder with five-crop
TTA and the slide -> print metrics, patches/s and where the outputs are.

Each step runs the real ``patchserve`` subcommand in a child process, so this
module imports neither torch nor DALI and each step is what a user would type.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from serving.core.errors import InputError, PatchserveError
from serving.core.options import add_options, from_args, option

TTA_MODES = ("none", "flip", "five", "ten", "server")


@dataclass(frozen=True)
class DemoConfig:
    """Options of ``patchserve demo``."""

    out: Path = option(Path("demo"), "folder for everything the demo writes")
    name: str = option("patchserve_demo", "model name in the Triton repository")
    repo: Path = option(Path("model_repository"), "model repository to export into (its configs are checked in; "
                                                  "the demo regenerates its weights)")
    size: int = option(64, "patch side in pixels")
    per_class: int = option(300, "synthetic patches per class")
    epochs: int = option(4, "training epochs")
    tta: str = option("five", "TTA mode for scoring the test folder", choices=TTA_MODES)
    seed: int = option(0, "seed of the data, the training and the slide")
    quick: bool = option(False, "a smaller, faster run (for smoke tests)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "repo", Path(self.repo))
        if self.tta not in TTA_MODES:
            raise InputError(f"--tta: invalid value {self.tta!r}. Only {', '.join(TTA_MODES)} are supported.")
        for flag, value in (("--size", self.size), ("--per-class", self.per_class), ("--epochs", self.epochs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{flag}: expected an integer >= 1, got {value!r}")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, DemoConfig)
    return p


SHIFTED = "test_shifted"  # the synthetic test tissue under a second centre's stain


def side_by_side(test: dict, shifted: dict) -> str:
    """Metrics of the test split and of the second centre's stain in two columns."""
    lines = [f"    {'metric':<20}{'test':>8}{SHIFTED:>14}"]
    for k in test:
        if k in shifted:
            lines.append(f"    {k:<20}{test[k]:>8.3f}{shifted[k]:>14.3f}")
    return "\n".join(lines)


def _run(step: str, args: list[str], log: list[dict]) -> float:
    cmd = [sys.executable, "-m", "patchserve", *args]
    print(f"\n==> {step}: patchserve {' '.join(shlex.quote(a) for a in args)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd)
    dt = time.perf_counter() - t0
    log.append({"step": step, "command": "patchserve " + " ".join(args), "seconds": round(dt, 1),
                "returncode": proc.returncode})
    if proc.returncode != 0:
        raise PatchserveError(f"demo step '{step}' failed with exit code {proc.returncode}")
    return dt


def main(args: argparse.Namespace) -> int:
    args = from_args(DemoConfig, args)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    data, run, eval_dir = out / "data", out / "run", out / "eval"
    repo = args.repo
    scores = out / "scores"
    per_class, epochs, slide_size = args.per_class, args.epochs, 4096
    if args.quick:
        per_class, epochs, slide_size = 40, 1, 2048
    log: list[dict] = []
    t_start = time.perf_counter()

    _run("synthesise data and a slide",
         ["synth", str(data), "--classes", "2", "--per-class", str(per_class), "--size", str(args.size),
          "--seed", str(args.seed), "--slide", "--slide-size", str(slide_size), "--overwrite"], log)
    _run("train a resnet18 on DALI (CPU)",
         ["train", str(data), "--out", str(run), "--arch", "resnet18", "--epochs", str(epochs),
          "--image-size", str(args.size), "--batch-size", "32", "--lr", "1e-3", "--optimizer", "adamw",
          "--lr-scheduler", "cosine", "--name", args.name, "--seed", str(args.seed), "--max-batch-size", "32",
          "--stain-augment", "--overwrite"], log)
    _run("evaluate on the test split and on a second centre's stain, five-crop TTA",
         ["evaluate", str(run), str(data), "--split", f"test,{SHIFTED}", "--out", str(eval_dir),
          "--tta", "five"], log)
    _run("export into the Triton repository",
         ["export", str(run), "--repo", str(repo), "--formats", "python,onnxruntime", "--overwrite"], log)
    _run("check the export (the CI gate)", ["check-export", str(repo)], log)

    from serving.server.embedded import EmbeddedTriton

    print("\n==> start the embedded Triton server", flush=True)
    with EmbeddedTriton(repo) as server:
        print(f"    gRPC {server.urls.grpc}  HTTP {server.urls.http}  metrics {server.urls.metrics}")
        test_out = scores / "test.parquet"
        _run(f"score the test folder ({args.tta} TTA)",
             ["score", str(data / "test"), "--url", server.urls.grpc, "--model", args.name,
              "--tta", args.tta, "--out", str(test_out), "--overwrite"], log)
        slide = sorted((data / "slides").glob("*.tiff"))[0]
        slide_out = scores / "slide.parquet"
        _run("score the whole slide",
             ["score", str(slide), "--url", server.urls.grpc, "--model", args.name, "--tta", "none",
              "--out", str(slide_out), "--overwrite"], log)

    total = time.perf_counter() - t_start
    summary = {"total_seconds": round(total, 1), "steps": log, "outputs": {
        "run": str(run), "evaluation": str(eval_dir), "repository": str(repo), "scores": str(scores)}}
    keys = ("accuracy", "balanced_accuracy", "f1_macro", "specificity_macro", "auc")
    for label, folder in (("test_metrics", eval_dir / "test"), ("shifted_stain_metrics", eval_dir / SHIFTED)):
        if (folder / "metrics.json").exists():
            m = json.loads((folder / "metrics.json").read_text())
            summary[label] = {k: m[k] for k in keys if isinstance(m.get(k), (int, float))}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n==> done in {:.0f} s".format(total))
    for step in log:
        print(f"    {step['seconds']:7.1f} s  {step['step']}")
    if "test_metrics" in summary and "shifted_stain_metrics" in summary:
        print(side_by_side(summary["test_metrics"], summary["shifted_stain_metrics"]))
    print(f"    outputs: run {run}, evaluation {eval_dir} (report.md, plots), repository {repo},")
    print(f"             scores {scores} (parquet, metrics, heatmap PNG and GeoJSON of the slide)")
    return 0
