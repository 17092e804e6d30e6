"""``patchserve check-export REPO``: the CI gate for a model repository (exit 0 only when all pass)."""

from __future__ import annotations

import argparse
from pathlib import Path


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Check a Triton model repository: file hashes against the export "
                                            "manifest, configs against the spec, labels, ONNX graphs, the parity "
                                            "fixture in-process and through the embedded Triton server.")
    p.add_argument("repo", type=Path, metavar="REPO", help="model repository folder")
    p.add_argument("--models", default=None,
                   help="comma-separated model names to check (default: every model folder)")
    p.add_argument("--serve", action=argparse.BooleanOptionalAction, default=True,
                   help="load the python flavours into the embedded Triton server and infer (default: yes)")
    p.add_argument("--run", type=Path, default=None, metavar="RUN",
                   help="run folder or checkpoint: recompute the fixtures' logits with PyTorch from its weights "
                        "and require the repository to answer them (proof it serves this run)")
    p.add_argument("--json", action=argparse.BooleanOptionalAction, default=False,
                   help="print the result as JSON (rows of check/model/status/detail) instead of a table")
    return p


def main(args: argparse.Namespace) -> int:
    from export.check import check_repository

    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    report = check_repository(args.repo, models, serve=args.serve, run=args.run)
    if args.json:
        print(report.to_json())
        return 0 if report.passed else 1
    print(report.table())
    failed = report.failed()
    print(f"\ncheck-export: {'PASSED' if report.passed else f'FAILED ({len(failed)} check(s))'}")
    return 0 if report.passed else 1
