"""WSInfer 0.6.1, the peer of ``patchserve bench peer``: its own virtual environment from the package
registry, the model as WSInfer takes it (TorchScript + config JSON) made from a patchserve run, its
command line, and its output CSV.

- The environment is built once under the cache folder and reused while its stamp (the packages and
  the Python it was built for) matches; a lock keeps two benchmarks from building it at once.
- At run time WSInfer needs no network: a local ``--model-path`` and ``--config``; its command line
  still loads the model zoo's registry when it starts (``wsinfer_zoo.client.load_registry``, for the
  ``--model`` choices), so it runs with ``HF_HUB_OFFLINE=1`` and ``HOME`` in the cache, where an empty
  registry file is written.
- The TorchScript is the run's classifier without its first layer (the uint8 NHWC -> normalised float
  NCHW step): WSInfer's transforms (``ToTensor``, ``Normalize`` with the spec's mean/std) do that
  step, at the spec's patch size and resolution, so its tiles and probabilities can be compared with
  the served ONNX model's.
"""

from __future__ import annotations

import copy
import csv
import fcntl
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from benchmarks.errors import BenchmarkError

WSINFER = "wsinfer==0.6.1"
# Without a pin pip resolves the newest torch: a CUDA build of several GB from the registry. These
# two lie on the project's machines (pip takes them from local disk); on another machine pip fetches them.
TORCH_PINS = ("torch==2.14.1", "torchvision==0.29.1")
# Newer than WSInfer 0.6.1 and broken with it: its __init__ imports zarr.storage.KVStore (zarr 2), and
# tiffslide 3 (its slide reader) needs zarr 3.
COMPAT_PINS = ("zarr==2.18.7", "tiffslide==2.5.1")
ENV_FORMAT = 1  # bump when what the environment holds changes: it is rebuilt
ENV_DIR = "wsinfer-0.6.1"
# WSInfer's model config schema (wsinfer_zoo/schemas/model-config.schema.json): every key is required.
CONFIG_KEYS = ("spec_version", "architecture", "num_classes", "patch_size_pixels", "spacing_um_px", "class_names",
               "transform")


def default_cache(environ: dict[str, str]) -> Path:
    """``$XDG_CACHE_HOME/patchserve``, else ``~/.cache/patchserve``: where the peer environment is kept."""
    base = environ.get("XDG_CACHE_HOME") or str(Path(environ.get("HOME") or Path.home()) / ".cache")
    return Path(base) / "patchserve"


def _stamp(packages: tuple[str, ...]) -> dict:
    return {"format": ENV_FORMAT, "packages": list(packages),
            "python": f"{sys.version_info.major}.{sys.version_info.minor}"}


def wsinfer_env(cache: Path, *, log=print) -> Path:
    """The virtual environment with WSInfer (built when missing or stale); returns its folder."""
    cache.mkdir(parents=True, exist_ok=True)
    venv = cache / ENV_DIR
    packages = (WSINFER, *TORCH_PINS, *COMPAT_PINS)
    stamp = venv / "installed.json"
    with open(cache / f"{ENV_DIR}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or by the kernel if we die
        if (venv / "bin" / "wsinfer").exists() and stamp.is_file() and json.loads(stamp.read_text()) == _stamp(packages):
            return venv
        log(f"  installing {', '.join(packages)} into {venv} (once; several minutes)")
        # A venv's scripts hold its absolute path, so it is built in place; the stamp, written last,
        # says it is whole.
        shutil.rmtree(venv, ignore_errors=True)
        _run([sys.executable, "-m", "venv", str(venv)], f"creating {venv}")
        _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", *packages],
             f"installing {', '.join(packages)}")
        stamp.write_text(json.dumps(_stamp(packages)))
    return venv


def _run(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchmarkError(f"{what} failed:\n{(done.stderr or done.stdout)[-2000:]}")


def offline_environ(venv: Path, environ: dict[str, str]) -> dict[str, str]:
    """The environment ``wsinfer run`` gets: no network, no GPU, its home in the cache beside the venv."""
    home = venv.parent / f"{ENV_DIR}-home"
    registry = home / ".wsinfer-zoo" / "wsinfer-zoo-registry.json"
    registry.parent.mkdir(parents=True, exist_ok=True)
    if not registry.is_file():
        registry.write_text(json.dumps({"models": {}}) + "\n")
    env = {k: v for k, v in environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    # CPU on both arms: the embedded Triton server serves the ONNX model on the CPU.
    env.update(HOME=str(home), HF_HUB_OFFLINE="1", WSINFER_FORCE_CPU="1", CUDA_VISIBLE_DEVICES="",
               PATH=f"{venv / 'bin'}{os.pathsep}{environ.get('PATH', '')}")
    return env


def wsinfer_command(venv: Path, slides: Path, results: Path, model_path: Path, config: Path) -> list[str]:
    """``wsinfer run`` on a folder of slides with a local model, every other option at its default."""
    return [str(venv / "bin" / "wsinfer"), "run", "--wsi-dir", str(slides), "--results-dir", str(results),
            "--model-path", str(model_path), "--config", str(config)]


def wsinfer_csv(results: Path, slide: Path) -> Path:
    """Where ``wsinfer run`` writes a slide's tiles: ``RESULTS/model-outputs-csv/STEM.csv``."""
    return results / "model-outputs-csv" / f"{slide.stem}.csv"


def read_wsinfer_csv(path: Path, class_names: tuple[str, ...]) -> dict[tuple[int, int], tuple[float, ...]]:
    """Level-0 top-left (minx, miny) of each tile -> its probabilities in ``class_names`` order."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = [f"prob_{c}" for c in class_names]
        missing = [c for c in ("minx", "miny", *cols) if c not in (reader.fieldnames or ())]
        if missing:
            raise BenchmarkError(f"{path}: WSInfer's CSV lacks the columns {missing} (has {reader.fieldnames})")
        return {(int(float(r["minx"])), int(float(r["miny"]))): tuple(float(r[c]) for c in cols) for r in reader}


def wsinfer_config(spec, spacing_um_px: float) -> dict:
    """WSInfer's model config for ``spec``: its patch size, resolution, classes, and mean/std as transforms."""
    return {"spec_version": "1.0", "architecture": spec.arch, "num_classes": len(spec.class_names),
            "class_names": list(spec.class_names), "patch_size_pixels": int(spec.input_height),
            "spacing_um_px": float(spacing_um_px),
            "transform": [{"name": "Resize", "arguments": {"size": int(spec.input_height)}},
                          {"name": "ToTensor"},
                          {"name": "Normalize", "arguments": {"mean": list(spec.mean), "std": list(spec.std)}}]}


def write_wsinfer_model(run: Path, folder: Path, *, spacing_um_px: float | None = None) -> tuple[Path, Path]:
    """``folder/model.pt`` (TorchScript: normalised float NCHW in, logits out) and ``folder/config.json``.

    ``spacing_um_px``: the resolution of the patches, by default the run's ``trained_mpp``.
    """
    import torch

    from training.checkpoint import load_for_inference

    classifier, spec, _ = load_for_inference(run)
    spacing = spacing_um_px if spacing_um_px is not None else spec.trained_mpp
    if spacing is None:
        raise BenchmarkError(f"{run}: the spec records no trained_mpp; give spacing_um_px for WSInfer's config")
    if spec.input_height != spec.input_width:
        raise BenchmarkError(f"{run}: WSInfer takes square patches, the spec's input is "
                             f"{spec.input_height}x{spec.input_width}")
    if spec.stain_normalization or spec.features_only:
        raise BenchmarkError(f"{run}: in-model stain normalisation or a features-only model has no WSInfer "
                             "equivalent (its transforms are Resize, ToTensor and Normalize)")
    body = copy.deepcopy(classifier).eval()
    body.normalize = torch.nn.Identity()  # WSInfer's ToTensor + Normalize do it, with the same mean/std
    body.channels_last = False  # contiguous NCHW, as WSInfer's DataLoader gives it

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner.logits_and_features(x, None)[0]

    folder.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, 3, spec.input_height, spec.input_width)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; WSInfer 0.6.1 loads nothing else
        traced = torch.jit.trace(Logits(body).eval(), example, check_trace=False)
    model_path, config_path = folder / "model.pt", folder / "config.json"
    traced.save(str(model_path))
    config_path.write_text(json.dumps(wsinfer_config(spec, spacing), indent=2) + "\n")
    return model_path, config_path
