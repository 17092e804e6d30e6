"""``evaluate`` with several splits: one folder per split and a comparison table."""

from __future__ import annotations

import json

import pytest


def test_several_splits_are_evaluated_into_their_folders_and_compared_in_one_table(random_run, synth_data, tmp_path):
    from training.evaluate import evaluate_splits

    out = tmp_path / "eval"
    results = evaluate_splits(random_run, synth_data, out, ["test", "test_shifted"], batch_size=16, workers=1,
                              device="cpu", dali_device="cpu", progress=False)
    assert list(results) == ["test", "test_shifted"]
    table = (out / "report.md").read_text().splitlines()
    rows = [ln for ln in table if ln.startswith("| test")]
    assert len(rows) == 2
    for split, row in zip(("test", "test_shifted"), rows):
        m = json.loads((out / split / "metrics.json").read_text())
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[:4] == [split, str(m["num_samples"]), f"{m['accuracy']:.4f}", f"{m['balanced_accuracy']:.4f}"]
        assert cells[-1] == f"[{split}/report.md]({split}/report.md)"
        assert (out / split / "report.md").is_file()
    assert results["test"].paths[0].split("/")[-3] == "test"
    assert results["test_shifted"].paths[0].split("/")[-3] == "test_shifted"


def test_a_split_given_twice_is_refused(random_run, synth_data, tmp_path):
    from training.config import EvalConfig
    from training.errors import TrainingError

    with pytest.raises(TrainingError, match="--split: expected distinct split names"):
        EvalConfig(run=str(random_run), data=str(synth_data), out=str(tmp_path), split=("test", "test"), workers=1)
