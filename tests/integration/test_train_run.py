"""Training end to end on real DALI pipelines (CPU), evaluation and resume."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from tests.fixtures_train import small_train_config


def _evaluate(run, data, out, tta="none"):
    from training.evaluate import evaluate_run

    return evaluate_run(run, data, out, split="test", tta=tta, batch_size=16, workers=1, device="cpu",
                        dali_device="cpu", progress=False)


def test_trained_run_has_the_run_folder_layout_and_a_consistent_spec(trained_run):
    from serving.core.spec import ModelSpec
    from training.checkpoint import read_checkpoint

    for name in ("spec.json", "checkpoint_last.pt", "checkpoint_best.pt", "history.csv", "history.json"):
        assert (trained_run / name).is_file(), name
    spec = ModelSpec.load(trained_run / "spec.json")
    assert spec.class_names == ("normal", "tumour")
    assert spec.input_hw == (48, 48)
    # The synthetic patches record their resolution (synth.json): the spec carries it, and requires it read.
    assert (spec.trained_mpp, spec.requires) == (0.5, ("trained_mpp",))
    assert spec.name == "run" or spec.name.startswith("synth_data")
    payload = read_checkpoint(trained_run)
    assert payload["spec"] == spec
    assert payload["train_config"]["image_size"] == 48
    assert len(json.loads((trained_run / "history.json").read_text())) == 6


def test_trained_resnet18_classifies_the_test_split_well_above_chance(trained_run, synth_data, tmp_path):
    r = _evaluate(trained_run, synth_data, tmp_path / "eval")
    assert r.metrics["num_samples"] == 16
    assert r.metrics["accuracy"] >= 0.8


def test_metrics_json_agrees_with_sklearn_recomputed_from_predictions_csv(trained_run, synth_data, tmp_path):
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score

    out = tmp_path / "eval"
    _evaluate(trained_run, synth_data, out)
    metrics = json.loads((out / "metrics.json").read_text())
    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    names = metrics["class_names"]
    y = np.array([names.index(r["true_label"]) for r in rows])
    pred = np.array([names.index(r["pred_label"]) for r in rows])
    probs = np.array([[float(r[f"prob_{c}"]) for c in names] for r in rows])
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert metrics["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert metrics["auc"] == pytest.approx(roc_auc_score(y, probs[:, 1]), abs=1e-6)
    assert metrics["confusion_matrix"] == confusion_matrix(y, pred).tolist()
    for name in ("report.md", "confusion_matrix.png", "roc.png", "training_curves.png", "misclassified.png"):
        assert (out / name).stat().st_size > 0, name
    assert all(r["path"].endswith(".png") and "/test/" in r["path"] for r in rows)


def test_five_crop_tta_equals_the_average_of_five_independently_computed_views(trained_run, synth_data, tmp_path):
    from serving.core.views import view_boxes
    from training.checkpoint import load_for_inference
    from training.data import resolve_eval_samples
    from training.pipeline import build_eval_pipeline, iterate, unpad

    r = _evaluate(trained_run, synth_data, tmp_path / "eval", tta="five")
    model, spec, _ = load_for_inference(trained_run)
    samples = resolve_eval_samples(synth_data, "test", spec.class_names)
    pipe = build_eval_pipeline(samples, spec=spec, views=True, batch_size=16, num_threads=1)
    (padded, _, shapes), = list(iterate(pipe, samples, with_shapes=True))
    prepared = unpad(padded.numpy(), shapes.numpy())
    assert len({im.shape for im in prepared}) == 1
    images = torch.from_numpy(np.stack(prepared))
    ch, cw = spec.input_hw
    per_view = []
    with torch.no_grad():
        for top, left, flip in view_boxes("five", images.shape[1:3], spec.input_hw):
            crop = images[:, top:top + ch, left:left + cw, :].contiguous()
            per_view.append(torch.softmax(model(crop).float(), dim=1).numpy())
    np.testing.assert_allclose(r.probs, np.mean(per_view, axis=0), rtol=1e-5, atol=1e-6)


def test_resume_after_one_epoch_gives_the_same_weights_as_two_epochs_straight(synth_data, tmp_path):
    from training.checkpoint import read_checkpoint
    from training.train import train

    torch.set_num_threads(1)
    common = dict(lr_scheduler="exponential", lr_gamma=0.5, model_ema=True, model_ema_decay=0.9,
                  rotation_deg=10.0, brightness=0.1, scale_min=0.5)
    straight = small_train_config(synth_data, tmp_path / "straight", epochs=2, **common)
    # One training and one validation pipeline for the run, reset per epoch, never rebuilt.
    assert train(straight).pipeline_builds == {"train": 1, "val": 1}
    first = small_train_config(synth_data, tmp_path / "resumed", epochs=1, **common)
    train(first)
    train(first.replace(epochs=2, resume=str(tmp_path / "resumed")))
    a = read_checkpoint(tmp_path / "straight" / "checkpoint_last.pt")
    b = read_checkpoint(tmp_path / "resumed" / "checkpoint_last.pt")
    for key in ("model",):
        for name, t in a[key].items():
            torch.testing.assert_close(b[key][name], t, rtol=0, atol=1e-6, msg=name)
    for name, t in a["state"]["train_model"].items():
        torch.testing.assert_close(b["state"]["train_model"][name], t, rtol=0, atol=1e-6, msg=name)
    assert [h["train_loss"] for h in a["state"]["history"]] == pytest.approx(
        [h["train_loss"] for h in b["state"]["history"]], abs=1e-6)
