"""``patchserve check-export REPO``: the CI gate for a model repository (exit 0 only when all pass)."""

from __future__ import annotations

import argparse
from pathlib import Path


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Check a Triton model repository: configs, specs, labels, ONNX graphs, "
                                            "parity fixtures, then real inference on the embedded Triton server.")
    p.add_argument("repo", type=Path, metavar="REPO", help="model repository folder")
    p.add_argument("--models", default=None,
                   help="comma-separated model names to check (default: every model folder)")
    p.add_argument("--serve", action=argparse.BooleanOptionalAction, default=True,
                   help="load the python flavours into the embedded Triton server and infer (default: yes)")
    return p


def main(args: argparse.Namespace) -> int:
    from export.check import check_repository

    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    report = check_repository(args.repo, models, serve=args.serve)
    print(report.table())
    failed = report.failed()
    print(f"\ncheck-export: {'PASSED' if report.passed else f'FAILED ({len(failed)} check(s))'}")
    return 0 if report.passed else 1
