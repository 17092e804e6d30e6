"""scripts/stain-study: the README's stain protocol, run through the command line on a tiny data set."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.scripts import SCRIPTS, load_script

SCRIPT = SCRIPTS / "stain-study"


def _module():
    return load_script("stain-study")


def test_recovered_share_is_measured_against_the_same_seeds_baseline():
    m = _module()
    rows = m.summarise([{"seed": 0, "scale": 0.0, "normalize": None, "test": 0.8, "test_shifted": 0.5},
                        {"seed": 0, "scale": 0.4, "normalize": None, "test": 0.8, "test_shifted": 0.7},
                        {"seed": 1, "scale": 0.0, "normalize": None, "test": 0.9, "test_shifted": 0.5},
                        {"seed": 1, "scale": 0.4, "normalize": None, "test": 0.8, "test_shifted": 0.8},
                        {"seed": 0, "scale": 0.0, "normalize": "macenko", "test": 0.7, "test_shifted": 0.7},
                        {"seed": 1, "scale": 0.0, "normalize": "macenko", "test": 0.9, "test_shifted": 0.6}])
    assert [round(r["drop"], 6) for r in rows] == [0.3, 0.1, 0.4, 0.0, 0.0, 0.3]
    assert rows[0]["recovered"] is None and rows[2]["recovered"] is None
    assert rows[1]["recovered"] == pytest.approx(2 / 3)
    assert rows[3]["recovered"] == pytest.approx(1.0)
    # A normalised arm is measured against the unnormalised, unaugmented run of its seed, not against itself.
    assert rows[4]["recovered"] == pytest.approx(1.0) and rows[5]["recovered"] == pytest.approx(0.25)
    md = m.table(rows)
    assert "| no stain augmentation or normalisation | 1 | 0.900 | 0.500 | 0.400 |  |" in md
    assert "| `--stain-augment --stain-scale 0.4` | 0 | 0.800 | 0.700 | 0.100 | 67% |" in md
    assert "| `--stain-normalize macenko` | 1 | 0.900 | 0.600 | 0.300 | 25% |" in md
    mean = m.means_table(rows)
    assert "| `--stain-normalize macenko` | 2 | 0.800 | 0.650 | 0.150 | 62% |" in mean
    assert "| no stain augmentation or normalisation | 2 | 0.850 | 0.500 | 0.350 |  |" in mean


@pytest.mark.parametrize("argv, match", [(["--scales", "0.4"], "include 0"), (["--scales", "0", "1.5"], r"\[0, 1\)")])
def test_bad_scales_are_refused_naming_the_flag(tmp_path, argv, match):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), *argv], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "--scales" in proc.stderr and re.search(match, proc.stderr), proc.stderr


def test_a_tiny_study_trains_and_evaluates_each_seed_and_scale_and_writes_its_table(tmp_path):
    out = tmp_path / "study"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--seeds", "3", "--scales", "0", "0.5",
                           "--size", "32", "--per-class", "10", "--epochs", "1", "--normalize", "reinhard"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads((out / "stain-study.json").read_text())
    assert [(r["seed"], r["scale"], r["normalize"]) for r in doc["rows"]] == \
        [(3, 0.0, None), (3, 0.5, None), (3, 0.0, "reinhard"), (3, 0.5, "reinhard")]
    for r in doc["rows"]:
        # The figures are those evaluate wrote, not made up by the script.
        for split in ("test", "test_shifted"):
            metrics = out / "eval" / _module().run_name(r["scale"], 3, r["normalize"]) / split / "metrics.json"
            metrics = json.loads(metrics.read_text())
            assert r[split] == metrics["accuracy"] and r[f"{split}_auc"] == metrics["auc"]
    config = json.loads((out / "runs" / "stain0.5_seed3" / "config.json").read_text())
    assert config["stain_augment"] is True and config["stain_scale"] == 0.5 and config["seed"] == 3
    baseline = json.loads((out / "runs" / "none_seed3" / "config.json").read_text())
    assert baseline["stain_augment"] is False and baseline["stain_normalize"] is None
    both = json.loads((out / "runs" / "stain0.5+reinhard_seed3" / "config.json").read_text())
    assert both["stain_augment"] is True and both["stain_normalize"] == "reinhard"
    spec = json.loads((out / "runs" / "reinhard_seed3" / "spec.json").read_text())
    assert spec["stain_normalization"]["method"] == "reinhard"
    assert [m["normalize"] for m in doc["means"]] == [None, "reinhard", None, "reinhard"]
    assert json.loads((out / "data" / "synth.json").read_text())["options"]["size"] == 32
    assert "share of the drop recovered" in (out / "stain-study.md").read_text()
    assert (out / "stain-study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| no stain augmentation or normalisation | 3 |" in proc.stdout
    assert "| `--stain-augment --stain-scale 0.5 --stain-normalize reinhard` | 1 |" in proc.stdout
