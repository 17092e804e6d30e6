"""The ``patchserve`` console script.

Each subcommand is a module of ``patchserve.commands`` with
``get_args_parser()`` and ``main(args)``; it is imported only when it runs, so
``patchserve score`` never imports torch or DALI.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from types import ModuleType

# name -> one-line help. The modules themselves are imported only when their
# command runs (see _command), so ``patchserve score`` never imports torch or DALI.
COMMANDS: dict[str, str] = {
    "synth": "write deterministic synthetic patches, HDF5 and a whole-slide image",
    "train": "train a ResNet on a DALI pipeline",
    "init-run": "a run folder from local torchvision weights, without training (features-only without classes)",
    "evaluate": "evaluate a run on a data set (metrics, report, plots, TTA)",
    "cv": "cross-validated grid search, then refit the best combination",
    "export": "export a run into a Triton model repository",
    "check-export": "check a model repository (the CI gate)",
    "serve": "start the embedded Triton server on a model repository",
    "score": "score folders, manifests, HDF5 files and whole slides against Triton",
    "bench": "throughput benchmarks of every stage",
    "doctor": "what is installed, its CUDA build, and what really runs on the GPU here",
    "demo": "the main job: synth, train, evaluate, export, check, serve, score",
}


def _command(name: str) -> ModuleType:
    """The module of one subcommand, imported here (not by string) so import-linter sees every arrow."""
    if name == "synth":
        from patchserve.commands import synth as module
    elif name == "train":
        from patchserve.commands import train as module
    elif name == "init-run":
        from patchserve.commands import init_run as module
    elif name == "evaluate":
        from patchserve.commands import evaluate as module
    elif name == "cv":
        from patchserve.commands import cv as module
    elif name == "export":
        from patchserve.commands import export as module
    elif name == "check-export":
        from patchserve.commands import check_export as module
    elif name == "serve":
        from patchserve.commands import serve as module
    elif name == "score":
        from patchserve.commands import score as module
    elif name == "bench":
        from patchserve.commands import bench as module
    elif name == "doctor":
        from patchserve.commands import doctor as module
    elif name == "demo":
        from patchserve import demo as module
    else:
        raise KeyError(name)
    return module


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="patchserve",
        description="Train, export, serve and score ResNet classifiers for medical image patches.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'patchserve COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, help_ in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return f"patchserve {version('patchserve')}"
    except Exception:  # noqa: BLE001 - not installed: running from a checkout
        return "patchserve (not installed)"


# Top-level module -> the extra of pyproject.toml that installs it.
EXTRA_OF_MODULE = {
    "tritonclient": "client", "pyarrow": "client", "openslide": "client", "h5py": "client", "tifffile": "client",
    "matplotlib": "client", "sklearn": "client", "skimage": "client", "distributed": "client", "dask": "client",
    "pytriton": "serve", "onnxruntime": "serve",
    "torch": "train", "torchvision": "train", "nvidia": "train",
    "onnx": "export", "onnxscript": "export",
    "tensorrt": "gpu",
}


def missing_extra_message(command: str, exc: ModuleNotFoundError) -> str | None:
    """What to install when a command needs a package this install lacks; None for other import errors."""
    top = (exc.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(top)
    if extra is None:
        return None
    return (f"patchserve {command} needs the '{extra}' extra (missing module {exc.name!r}): "
            f"pip install 'patchserve[{extra}]'")


def _missing_extra(command: str, exc: ModuleNotFoundError) -> int:
    """Exit code 2 with what to install; any other missing module is a real error and propagates."""
    message = missing_extra_message(command, exc)
    if message is None:
        raise exc
    print(message, file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        parser = _top_parser()
        if argv and not argv[0].startswith("-"):
            parser.error(f"invalid command {argv[0]!r}. Choose from: {', '.join(COMMANDS)}")
        parser.parse_args(argv or ["--help"])
        return 0
    name, rest = argv[0], argv[1:]
    try:
        module = _command(name)
        parser = module.get_args_parser()
    except ModuleNotFoundError as exc:
        return _missing_extra(name, exc)
    parser.prog = f"patchserve {name}"
    args = parser.parse_args(rest)
    from serving.core.errors import PatchserveError

    # SIGTERM (kill, docker stop, a batch scheduler) unwinds like Ctrl-C: finally blocks run, so
    # temporary .part files, shared memory and locks go; what was committed stays. Both are recorded
    # too: Python raises KeyboardInterrupt wherever the main thread next checks for signals, and when
    # that is inside a __del__ (tqdm's, at the end of export's swap) the exception is printed and
    # dropped; the command still ends with 130.
    _received.clear()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, _interrupt)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # an ignored SIGINT stays ignored
            previous[signal.SIGINT] = signal.signal(signal.SIGINT, _interrupt)
    try:
        rc = module.main(args)
    except ModuleNotFoundError as exc:
        return _missing_extra(name, exc)
    except PatchserveError as exc:
        print(f"patchserve {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"patchserve {name}: interrupted", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if _received:
        print(f"patchserve {name}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


_received: list[int] = []  # signals the running command got (see main)


def _interrupt(signum, frame) -> None:
    _received.append(signum)
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    sys.exit(main())
