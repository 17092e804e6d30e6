"""``patchserve check-export REPO``: the CI gate for a model repository (exit 0 only when all pass).

Every flag is a field of :class:`export.check_report.CheckConfig`; the parser is generated from it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from export.check_report import CheckConfig
from serving.core.options import add_options, from_args


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Check a Triton model repository: file hashes against the export "
                                            "manifest, configs against the spec, labels, ONNX graphs, the parity "
                                            "fixture in-process and through the embedded Triton server.")
    add_options(p, CheckConfig)
    return p


def main(args: argparse.Namespace) -> int:
    from export.check import check_repository

    cfg = from_args(CheckConfig, args)
    report = check_repository(Path(cfg.repo), list(cfg.models) or None, serve=cfg.serve,
                              run=Path(cfg.run) if cfg.run else None)
    if cfg.json:
        print(report.to_json())
        return 0 if report.passed else 1
    print(report.table())
    failed = report.failed()
    print(f"\ncheck-export: {'PASSED' if report.passed else f'FAILED ({len(failed)} check(s))'}")
    return 0 if report.passed else 1
