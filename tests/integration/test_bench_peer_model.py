"""The peer benchmark's WSInfer model: the TorchScript and config JSON written from a run give, through
WSInfer's own transforms, the probabilities of the ONNX model export wrote from the same run.

WSInfer itself is not installed here: its environment (torch and its CUDA libraries) is several GB, so
``patchserve bench peer`` builds it in the user's cache; this test holds the model it is given to the
served one, and tests/unit/test_bench_peer.py the matching and the readers.
"""

from __future__ import annotations

import json

import numpy as np

from benchmarks.peer_wsinfer import write_wsinfer_model


def _tiles(n: int, size: int) -> np.ndarray:
    """Smooth tissue-like uint8 tiles (noise would put every probability near the same value)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = [np.stack([128 + 100 * np.sin(xx / (5 + i)), 128 + 90 * np.cos(yy / (7 + i)),
                     128 + 80 * np.sin((xx + yy) / (9 + i))], -1) for i in range(n)]
    return np.clip(out, 0, 255).astype(np.uint8)


def test_wsinfer_torchscript_through_its_transforms_gives_the_exported_onnx_probabilities(tmp_path):
    import torch
    from PIL import Image
    from torchvision import transforms

    from export.build import export_run
    from export.onnx_export import ort_session
    from serving.core.spec import ModelSpec
    from training.checkpoint import write_random_run

    torch.set_num_threads(1)
    spec = ModelSpec(name="peer_parity", class_names=("normal", "tumour"), input_height=64, input_width=64,
                     mean=(0.7, 0.55, 0.7), std=(0.15, 0.2, 0.15), max_batch_size=8, trained_mpp=0.5)
    run = write_random_run(tmp_path / "run", spec, seed=3)
    export_run(run, tmp_path / "repo", formats=("python",), with_tta=False, with_dali=False, progress=False)
    model_pt, config = write_wsinfer_model(run, tmp_path / "wsinfer")
    cfg = json.loads(config.read_text())
    assert (cfg["patch_size_pixels"], cfg["spacing_um_px"], cfg["class_names"]) == (64, 0.5, ["normal", "tumour"])

    tiles = _tiles(6, 64)
    # What wsinfer.modellib.transforms builds from the config, and run_inference's softmax of the logits.
    compose = transforms.Compose([getattr(transforms, t["name"])(**(t.get("arguments") or {}))
                                  for t in cfg["transform"]])
    batch = torch.stack([compose(Image.fromarray(t)) for t in tiles])
    module = torch.jit.load(str(model_pt), map_location="cpu").eval()
    with torch.no_grad():
        theirs = torch.softmax(module(batch), dim=1).numpy()

    session = ort_session(tmp_path / "repo" / spec.name / "1" / "model.onnx")
    ours = session.run([spec.output_name], {spec.input_name: tiles})[0]
    assert theirs.shape == ours.shape == (6, 2)
    assert np.abs(theirs - ours).max() < 1e-4
    assert (theirs.argmax(1) == ours.argmax(1)).all()
    assert len(set(np.round(ours[:, 1], 4))) > 1  # the tiles do not all give the same probability


def test_bench_peer_smoke_writes_its_table_into_out_when_wsinfer_is_already_cached(tmp_path):
    """The whole stage, one repeat per arm, only where a run of the benchmark has built WSInfer's environment
    (building it is several GB and minutes: not for the test suite)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    from benchmarks.peer_wsinfer import ENV_DIR, default_cache

    cache = default_cache(dict(os.environ))
    if not (cache / ENV_DIR / "installed.json").is_file():
        pytest.skip(f"WSInfer's environment is not cached in {cache} (patchserve bench peer builds it)")
    root = Path(__file__).resolve().parents[2]
    out, work = tmp_path / "out", tmp_path / "cwd"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-m", "patchserve", "bench", "peer", "--quick", "--smoke", "--out",
                           str(out), "--cache", str(cache)], cwd=work, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["peer.json", "peer.png"] and list(work.iterdir()) == []
    doc = json.loads((out / "peer.json").read_text())
    assert [r["tool"] for r in doc["rows"]] == ["patchserve", "patchserve, 1 worker", "WSInfer 0.6.1"]
    assert doc["rows"][2]["server tree peak RSS MB"] == "-" and doc["rows"][0]["server tree peak RSS MB"] > 0
    match = doc["match"]
    assert match["matched"] > 0.9 * min(match["ours"], match["theirs"])
    assert match["top1_agreement"] >= 0.999 and match["max_abs_dp"] < 1e-4
    assert doc["targets"][0]["target"] == 1.6 and doc["smoke"] is True
