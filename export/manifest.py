"""The export manifest: what export wrote into a model folder, by sha256, and which weights it serves.

One ``manifest.json`` per model version, in the version folder::

    {"format": 1, "model": NAME, "version": 1, "weights_sha256": HEX,
     "files": {"config.pbtxt": HEX, "configs/onnxruntime.pbtxt": HEX, "labels.txt": HEX,
               "spec.json": HEX, "export.json": HEX, "1/model.onnx": HEX, "1/fixture.npz": HEX, ...}}

Paths are relative to the model folder. The gate recomputes every hash and
fails on a file of the model folder that the manifest does not list (other
numeric versions aside: they carry their own manifests).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from export.errors import ManifestError

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Manifest:
    model: str
    version: int
    weights_sha256: str
    files: dict[str, str]

    def to_json(self) -> str:
        return json.dumps({"format": MANIFEST_FORMAT, "model": self.model, "version": self.version,
                           "weights_sha256": self.weights_sha256, "files": dict(sorted(self.files.items()))},
                          indent=2, sort_keys=True) + "\n"


def model_files(folder: Path, version: int) -> list[str]:
    """Every file of a model folder except other versions' folders and the manifest itself (sorted, relative)."""
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        top = rel.parts[0]
        if top.isdigit() and top != str(version):
            continue
        if path.is_dir() and not path.is_symlink():
            continue
        if rel.as_posix() == f"{version}/{MANIFEST_FILE}":
            continue
        out.append(rel.as_posix())
    return out


def write_manifest(folder: Path, version: int, weights_sha256: str) -> Manifest:
    """Hash every file export put into ``folder`` (the staged model folder) and write the manifest."""
    from serving.core.atomic import atomic_write_text

    files = {rel: file_sha256(folder / rel) for rel in model_files(folder, version)}
    manifest = Manifest(folder.name, version, weights_sha256, files)
    atomic_write_text(folder / str(version) / MANIFEST_FILE, manifest.to_json())
    return manifest


def read_manifest(folder: Path, version: int) -> Manifest:
    path = folder / str(version) / MANIFEST_FILE
    try:
        data = json.loads(path.read_text())
        if data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {MANIFEST_FORMAT}")
        files = data["files"]
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise ValueError("'files' is not a map of path -> sha256")
        return Manifest(str(data["model"]), int(data["version"]), str(data["weights_sha256"]), dict(files))
    except FileNotFoundError as exc:
        raise ManifestError(f"{version}/{MANIFEST_FILE} is missing: the version was not written by export") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ManifestError(f"{version}/{MANIFEST_FILE} is unreadable ({exc})") from exc


def verify_manifest(folder: Path, manifest: Manifest) -> list[str]:
    """Problems: files whose hash differs, listed files that are missing, files the manifest does not list."""
    problems = []
    if manifest.model != folder.name:
        problems.append(f"manifest names model {manifest.model!r}, the folder is {folder.name!r}")
    present = set(model_files(folder, manifest.version))
    for rel, want in sorted(manifest.files.items()):
        if rel not in present:
            problems.append(f"{rel}: listed but missing")
        elif file_sha256(folder / rel) != want:
            problems.append(f"{rel}: sha256 differs from the manifest")
    for rel in sorted(present - set(manifest.files)):
        if "__pycache__" in Path(rel).parts:
            # The server's own bytecode cache of model.py: judged by whether an interpreter would run it.
            from export.pyc import pyc_problem

            problem = pyc_problem(folder, rel, manifest.files)
            if problem:
                problems.append(problem)
            continue
        problems.append(f"{rel}: not written by export (not in the manifest)")
    return problems
