"""Cross-validated grid search end to end through the CLI (2 combos x 2 folds x 1 epoch)."""

from __future__ import annotations

import csv

import pytest


@pytest.mark.slow
def test_cv_writes_a_sorted_table_of_the_grid_and_refits_the_best(synth_data, tmp_path):
    from patchserve.cli import main

    out = tmp_path / "cv"
    rc = main(["cv", str(synth_data), "--out", str(out), "--grid", "lr=1e-3,1e-1", "--folds", "2",
               "--metric", "accuracy", "--epochs", "1", "--image-size", "32", "-b", "16", "--workers", "1",
               "--device", "cpu", "--dali-device", "cpu", "--no-progress", "--optimizer", "sgd"])
    assert rc == 0
    with open(out / "cv_results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["rank"] for r in rows] == ["1", "2"]
    assert sorted(float(r["lr"]) for r in rows) == [1e-3, 1e-1]
    means = [float(r["mean"]) for r in rows]
    assert means == sorted(means, reverse=True)
    for r in rows:
        assert float(r["mean"]) == pytest.approx((float(r["fold_1"]) + float(r["fold_2"])) / 2, abs=1e-6)
    md = (out / "cv_results.md").read_text().splitlines()
    assert md[0] == "| lr | mean | std |"
    assert md[2].startswith(f"| {float(rows[0]['lr'])} | {means[0]:.4f} |")
    assert (out / "best_run" / "checkpoint_best.pt").is_file()
    assert not list((out / "folds").rglob("*.pt"))  # fold checkpoints are not kept
