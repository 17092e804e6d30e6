"""``patchserve export RUN --repo REPO``: a run into a Triton model repository."""

from __future__ import annotations

import argparse
from pathlib import Path

from export.triton_config import DEFAULT_MAX_QUEUE_DELAY_US, FORMATS


def _formats(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in parts if p not in FORMATS]
    if bad or not parts:
        raise argparse.ArgumentTypeError(f"invalid format(s) {bad or text!r}. Only {', '.join(FORMATS)} are supported.")
    return parts


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export a trained run (ONNX, TTA graph, DALI preprocessing, "
                                            "optional TensorRT plan) into a Triton model repository.")
    p.add_argument("run", type=Path, metavar="RUN", help="run folder (or checkpoint file) written by patchserve train")
    p.add_argument("--repo", type=Path, required=True, help="model repository folder to write into")
    p.add_argument("--name", default=None, help="model name in the repository (default: the spec's name)")
    p.add_argument("--version", type=int, default=1, help="numeric version folder (default: 1)")
    p.add_argument("--formats", type=_formats, default=("python", "onnxruntime"),
                   help=f"comma-separated flavours out of {','.join(FORMATS)} (default: python,onnxruntime); "
                        "tensorrt needs a GPU and the tensorrt package, and is skipped with a message otherwise")
    p.add_argument("--tta-views", choices=("five", "ten"), default="five", help="views of the server-side TTA model")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                   help="export the server-side TTA model NAME_tta (default: yes)")
    p.add_argument("--dali", action=argparse.BooleanOptionalAction, default=True,
                   help="export the DALI preprocessing model and the encoded-bytes ensemble (default: yes)")
    p.add_argument("--max-batch-size", type=int, default=None, help="default: the spec's max_batch_size")
    p.add_argument("--instances", type=int, default=1, help="model instances per model (default: 1)")
    p.add_argument("--max-queue-delay-us", type=int, default=DEFAULT_MAX_QUEUE_DELAY_US,
                   help="dynamic batcher queue delay in microseconds (default: %(default)s, chosen by "
                        "benchmarks/bench_serve.py: at most +5%% p50 latency for single patches)")
    p.add_argument("--precision", choices=("fp32", "int8"), default="fp32",
                   help="precision of the ONNX graphs: int8 is ONNX Runtime static quantization for CPU servers, "
                        "calibrated on the run's training images (or --data); its parity is written beside it "
                        "and checked by check-export (default: fp32)")
    p.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True,
                   help="FP16 TensorRT plan / accelerator (default: yes)")
    p.add_argument("--trt-accelerator", action=argparse.BooleanOptionalAction, default=False,
                   help="add the TensorRT execution accelerator to the onnxruntime flavour (default: no)")
    p.add_argument("--data", type=Path, default=None,
                   help="patches for the top-1 agreement check (default: the data folder the run recorded)")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="replace an existing version folder")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    return p


def main(args: argparse.Namespace) -> int:
    from export.onnx_export import format_table
    from export.build import export_run

    result = export_run(args.run, args.repo, name=args.name, version=args.version, formats=args.formats,
                        tta_views=args.tta_views, with_tta=args.tta, with_dali=args.dali,
                        max_batch_size=args.max_batch_size, instances=args.instances,
                        max_queue_delay_us=args.max_queue_delay_us, overwrite=args.overwrite, fp16=args.fp16,
                        trt_accelerator=args.trt_accelerator, data=args.data, progress=args.progress,
                        precision=args.precision)
    print(format_table(result.parity))
    for note in result.notes:
        print(f"note: {note}")
    for name, folder in result.models.items():
        print(f"wrote {name:<28} {folder}")
    print(f"flavours: {', '.join(result.options.formats)} (pick one with tritonserver --model-config-name=FLAVOUR; "
          "config.pbtxt is python)")
    from serving.server import gpu_flavour, ngc_command

    print("Serve it on a GPU machine from NGC's container:")
    print(f"  {ngc_command(args.repo, model_config_name=gpu_flavour(args.repo))}")
    return 0
