"""``patchserve doctor``: per component, the version, its CUDA build, and whether it really runs on the GPU here."""

from __future__ import annotations

import argparse
import json

from export.doctor import DoctorConfig
from serving.core.options import add_options, from_args


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Check torch, DALI, ONNX Runtime, TensorRT, the Triton server binary and OpenSlide: version, "
                    "CUDA build, and whether each really runs on the GPU here (by running it). Exits 0 without a "
                    "GPU; with --require-gpu, exits 1 unless every GPU path ran.")
    add_options(p, DoctorConfig)
    return p


def main(args: argparse.Namespace) -> int:
    from export.doctor import run_doctor

    cfg = from_args(DoctorConfig, args)
    report = run_doctor()
    print(json.dumps(report.to_dict(), indent=2) if cfg.json else report.as_text())
    if cfg.require_gpu:
        return 0 if report.gpus and all(c.gpu for c in report.components if c.gpu_applies) else 1
    return 0
