"""The ``patchserve`` console script.

Each subcommand lives in the package it belongs to, as a module with
``get_args_parser()`` and ``main(args)``; it is imported only when it runs, so
``patchserve score`` never imports torch or DALI.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Only these strings are loaded for --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("training.synth_cli", "write deterministic synthetic patches, HDF5 and a whole-slide image"),
    "train": ("training.train_cli", "train a ResNet on a DALI pipeline"),
    "evaluate": ("training.evaluate_cli", "evaluate a run on a data set (metrics, report, plots, TTA)"),
    "cv": ("training.cv_cli", "cross-validated grid search, then refit the best combination"),
    "export": ("export.export_cli", "export a run into a Triton model repository"),
    "check-export": ("export.check_cli", "check a model repository (the CI gate)"),
    "serve": ("serving.serve_cli", "start the embedded Triton server on a model repository"),
    "score": ("serving.score_cli", "score folders, manifests, HDF5 files and whole slides against Triton"),
    "bench": ("benchmarks.bench_cli", "throughput benchmarks of every stage"),
    "demo": ("serving.demo", "the main job: synth, train, evaluate, export, check, serve, score"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="patchserve",
        description="Train, export, serve and score ResNet classifiers for medical image patches.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'patchserve COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return f"patchserve {version('patchserve')}"
    except Exception:  # noqa: BLE001 - not installed: running from a checkout
        return "patchserve (not installed)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        parser = _top_parser()
        if argv and not argv[0].startswith("-"):
            parser.error(f"invalid command {argv[0]!r}. Choose from: {', '.join(COMMANDS)}")
        parser.parse_args(argv or ["--help"])
        return 0
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    parser = module.get_args_parser()
    parser.prog = f"patchserve {name}"
    args = parser.parse_args(rest)
    from serving.errors import PatchserveError

    try:
        rc = module.main(args)
    except PatchserveError as exc:
        print(f"patchserve {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"patchserve {name}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
