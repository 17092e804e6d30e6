"""Fixtures of the export area.

``export_run_dir``: a run folder with a random-init resnet18 checkpoint
(``checkpoint_last.pt`` + ``spec.json``), spec "tiny_export" at 32 px
(source 37 px), classes normal/tumour, max batch 8. The train area's
``random_run`` is used instead when it exists.

``exported_repo``: ``(repo, spec)``, that run exported with every flavour
possible without a GPU (python + onnxruntime configs, TTA "five", DALI
preprocessing, ensemble) at max_batch_size 8, its parity fixture drawn from
``synth_data``. Read-only: shared by the session.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

EXPORT_MAX_BATCH = 8


def link_copy(src: Path, dst: Path) -> Path:
    """Copy a repository, linking the large weight files instead of copying them."""
    def copy(s, d):
        if Path(s).suffix in (".onnx", ".dali", ".plan"):
            Path(d).symlink_to(Path(s).resolve())
        else:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=copy, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


@pytest.fixture(scope="session")
def export_run_dir(request, tmp_path_factory):
    import torch

    from serving.core.spec import ModelSpec
    from training.checkpoint import write_random_run

    torch.set_num_threads(1)
    try:
        return Path(request.getfixturevalue("random_run"))
    except pytest.FixtureLookupError:
        pass
    spec = ModelSpec(name="tiny_export", class_names=("normal", "tumour"), input_height=32, input_width=32,
                     mean=(0.7, 0.5, 0.7), std=(0.15, 0.2, 0.15), max_batch_size=EXPORT_MAX_BATCH)
    return write_random_run(tmp_path_factory.mktemp("export_run") / "run", spec)


@pytest.fixture(scope="session")
def exported_repo(export_run_dir, synth_data, tmp_path_factory):
    from export.build import export_run

    repo = tmp_path_factory.mktemp("exported_repo") / "repo"
    result = export_run(export_run_dir, repo, formats=("python", "onnxruntime"), tta_views="five",
                        with_tta=True, with_dali=True, max_batch_size=EXPORT_MAX_BATCH, data=synth_data)
    return repo, result.spec
