"""serving.evaluation.metrics and serving.evaluation.plots: exact values on small hand-made cases."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest


def test_metrics_on_an_imbalanced_binary_case_expose_low_specificity():
    from serving.evaluation.metrics import compute_metrics

    y = np.array([0, 0, 1, 1, 1, 1, 1, 1])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.1, 0.9], [0.3, 0.7], [0.4, 0.6], [0.2, 0.8], [0.6, 0.4], [0.1, 0.9]])
    m = compute_metrics(y, probs, ["normal", "tumour"])
    assert m["confusion_matrix"] == [[1, 1], [1, 5]]
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["per_class"]["tumour"]["specificity"] == pytest.approx(1 / 2)  # TN / (TN + FP)
    assert m["per_class"]["normal"]["specificity"] == pytest.approx(5 / 6)
    assert m["specificity_macro"] == pytest.approx((1 / 2 + 5 / 6) / 2)
    assert m["specificity_weighted"] == pytest.approx((2 * 5 / 6 + 6 * 1 / 2) / 8)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 5 / 6) / 2)
    assert m["auc"] == pytest.approx(8.5 / 12)  # 12 positive/negative pairs, one tie
    assert "tumour" in m["classification_report"]


def test_multiclass_auc_is_one_vs_rest_and_none_when_a_class_is_absent():
    from sklearn.metrics import roc_auc_score

    from serving.evaluation.metrics import compute_metrics

    rng = np.random.default_rng(0)
    y = np.array([0, 1, 2] * 5)
    probs = rng.dirichlet([1, 1, 1], size=15)
    m = compute_metrics(y, probs, ["a", "b", "c"])
    assert m["auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"))
    assert compute_metrics(np.zeros(4, int), rng.dirichlet([1, 1, 1], 4), ["a", "b", "c"])["auc"] is None


def test_write_metrics_writes_json_and_predictions_with_class_names(tmp_path):
    import csv
    import json

    from serving.evaluation.metrics import compute_metrics, write_metrics

    probs = np.array([[0.8, 0.2], [0.3, 0.7]])
    m = compute_metrics([0, 0], probs, ["x", "y"])
    write_metrics(tmp_path, m, paths=["p0", "p1"], y_true=[0, 0], probs=probs, class_names=["x", "y"], extra={"tta": "none"})
    assert json.loads((tmp_path / "metrics.json").read_text())["tta"] == "none"
    rows = list(csv.reader(open(tmp_path / "predictions.csv")))
    assert rows == [["path", "true_label", "pred_label", "prob_x", "prob_y"], ["p0", "x", "x", "0.8", "0.2"],
                    ["p1", "x", "y", "0.3", "0.7"]]


def test_plots_are_written_as_png(tmp_path):
    from serving.evaluation import plots

    plots.plot_confusion_matrix([[3, 1], [0, 4]], ["a", "b"], tmp_path / "cm.png")
    plots.plot_roc([0, 1, 1, 0], np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.6, 0.4]]), ["a", "b"], tmp_path / "roc.png")
    plots.plot_training_curves([{"epoch": "1", "train_loss": "1.0", "val_loss": "0.9", "train_accuracy": "0.5",
                                 "val_accuracy": "0.6"}], tmp_path / "curves.png")
    plots.plot_misclassified([np.zeros((8, 8, 3), np.uint8)], ["a"], ["b"], tmp_path / "mis.png")
    for f in ("cm.png", "roc.png", "curves.png", "mis.png"):
        assert (tmp_path / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_serving_metrics_and_plots_import_neither_torch_nor_dali():
    code = ("import sys, serving.evaluation.metrics, serving.evaluation.plots; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'nvidia')]; print(bad); "
            "sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
