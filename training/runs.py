"""Run folders people can trust: no silent overwrite, the full configuration on disk.

``train`` refuses a run folder that already holds files unless ``--overwrite``
(its own outputs are removed first; other files stay) or ``--resume``
(continue it). ``RUN/config.json`` holds every training option, defaults
included, so a run can be read and repeated without its command line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from serving.core.atomic import atomic_write_text
from training.errors import TrainingError

CONFIG_JSON = "config.json"
# Everything train writes into RUN; --overwrite removes exactly these.
RUN_OUTPUTS = ("checkpoint_best.pt", "checkpoint_last.pt", "spec.json", "history.csv", "history.json",
               CONFIG_JSON, "bad_files.csv", "training_curves.png", "cache")


def check_run_folder(run: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse a non-empty ``run`` unless overwriting or resuming; with ``overwrite`` clear train's outputs."""
    if run.exists() and not run.is_dir():
        raise TrainingError(f"--out {run}: exists and is not a folder")
    if not run.is_dir() or not any(run.iterdir()) or resume:
        return
    if not overwrite:
        held = sorted(p.name for p in run.iterdir())
        listed = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
        raise TrainingError(f"--out {run}: run folder is not empty ({listed}); pass --overwrite to replace the "
                            f"run or --resume {run} to continue it")
    for name in RUN_OUTPUTS:
        p = run / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def write_run_config(run: Path, config: dict) -> Path:
    """``RUN/config.json``: every option of the run (sorted keys, defaults included)."""
    return atomic_write_text(run / CONFIG_JSON, json.dumps(config, indent=2, sort_keys=True) + "\n")
