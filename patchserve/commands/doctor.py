"""``patchserve doctor``: per component, the version, its CUDA build, and whether it really runs on the GPU here."""

from __future__ import annotations

import argparse
import json


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Check torch, DALI, ONNX Runtime, TensorRT, the Triton server binary and OpenSlide: version, "
                    "CUDA build, and whether each really runs on the GPU here (by running it). Exits 0 without a "
                    "GPU; with --require-gpu, exits 1 unless every GPU path ran.")
    p.add_argument("--json", action=argparse.BooleanOptionalAction, default=False,
                   help="print the report as JSON (default: a table)")
    p.add_argument("--require-gpu", action=argparse.BooleanOptionalAction, default=False,
                   help="exit 1 unless a GPU is present and every installed GPU-capable component ran on it")
    return p


def main(args: argparse.Namespace) -> int:
    from export.doctor import run_doctor

    report = run_doctor()
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.as_text())
    if args.require_gpu:
        return 0 if report.gpus and all(c.gpu for c in report.components if c.gpu_applies) else 1
    return 0
