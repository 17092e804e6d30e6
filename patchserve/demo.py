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
from pathlib import Path

from serving.errors import PatchserveError


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("demo"), help="folder for everything the demo writes (default: demo)")
    p.add_argument("--name", default="patchserve_demo", help="model name in the Triton repository")
    p.add_argument("--repo", type=Path, default=Path("model_repository"),
                   help="model repository to export into (default: model_repository, whose configs are checked "
                        "in; the demo regenerates its weights)")
    p.add_argument("--size", type=int, default=64, help="patch side in pixels (default: 64)")
    p.add_argument("--per-class", type=int, default=300, help="synthetic patches per class (default: 300)")
    p.add_argument("--epochs", type=int, default=4, help="training epochs (default: 4)")
    p.add_argument("--tta", default="five", choices=("none", "flip", "five", "ten", "server"),
                   help="TTA mode for scoring the test folder (default: five)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a smaller, faster run (for smoke tests)")
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

    from serving.server import EmbeddedTriton

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
