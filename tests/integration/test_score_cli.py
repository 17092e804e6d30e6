"""``patchserve score`` on folders, manifests and HDF5 against the real server."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from patchserve.cli import main as cli
from tests.parts_helpers import committed_parts
from serving.core.imageio import load_rgb_u8, resize_u8
from serving.jobs.output import read_results
from serving.core.views import view_boxes

ATOL = 1e-5
ENCODED_ATOL = 0.02  # DALI's resize differs from PIL's by a grey level or two


def _score(server, *args):
    return cli(["score", *map(str, args), "--url", server.grpc, "--model", server.spec.name, "--no-progress"])


def _expected(ort_reference, spec, paths):
    """What evaluation does: resize to the source size, centre crop, classify."""
    (top, left, _), = view_boxes("none", spec.source_hw, spec.input_hw)
    h, w = spec.input_hw
    crops = np.stack([resize_u8(load_rgb_u8(p), spec.source_hw)[top:top + h, left:left + w] for p in paths])
    return ort_reference.probs(crops)


@pytest.fixture(scope="module")
def class_tree(synth_data, tmp_path_factory):
    """The synthetic test split, plus a zero-byte and a truncated PNG among the images."""
    root = tmp_path_factory.mktemp("score_tree") / "test"
    shutil.copytree(synth_data / "test", root)
    (root / "normal" / "zero.png").write_bytes(b"")
    good = (root / "tumour" / "tumour_0000.png").read_bytes()
    (root / "tumour" / "truncated.png").write_bytes(good[: len(good) // 3])
    return root


@pytest.mark.client
def test_score_skips_corrupt_files_records_them_and_writes_metrics(triton_server, ort_reference, class_tree, tmp_path):
    spec = triton_server.spec
    out = tmp_path / "results.parquet"
    assert _score(triton_server, class_tree, "--out", out, "--batch-size", "4", "--concurrency", "3") == 0
    rows = read_results(out)
    good = sorted(p for p in class_tree.rglob("*.png") if p.name not in ("zero.png", "truncated.png"))
    assert [r["source"] for r in rows] == [str(p) for p in good]
    probs = np.array([[r[f"prob_{c}"] for c in spec.class_names] for r in rows])
    np.testing.assert_allclose(probs, _expected(ort_reference, spec, good), atol=ATOL)
    assert {r["label"] for r in rows} == set(spec.class_names)
    assert rows[0]["predicted"] == spec.class_names[int(probs[0].argmax())]
    assert (rows[0]["tta"], rows[0]["model"], rows[0]["version"], rows[0]["x"]) == ("none", spec.name, 1, None)
    errors = (tmp_path / "results.parquet.errors.csv").read_text().splitlines()
    assert errors[0] == "source,reason" and len(errors) == 3
    assert errors[1].startswith(f"{class_tree / 'normal' / 'zero.png'},") and errors[1].endswith("empty file (0 bytes)")
    assert errors[2].startswith(f"{class_tree / 'tumour' / 'truncated.png'},") and "cannot decode image" in errors[2]
    metrics = json.loads((tmp_path / "results.metrics.json").read_text())
    assert metrics["num_samples"] == len(good)
    assert sum(map(sum, metrics["confusion_matrix"])) == len(good)
    assert (tmp_path / "results.confusion_matrix.png").stat().st_size > 0


@pytest.mark.client
def test_interrupted_job_resumed_yields_exactly_one_row_per_patch(triton_server, synth_data, tmp_path):
    h5 = synth_data / "pcam" / "test_x.h5"
    images = synth_data / "val" / "normal"
    out = tmp_path / "results.csv"
    full = tmp_path / "full.csv"
    common = ["--tta", "flip", "--batch-size", "4", "--part-rows", "5"]
    assert _score(triton_server, h5, images, "--out", full, *common) == 0
    assert _score(triton_server, h5, images, "--out", out, *common, "--stop-after-parts", "2") == 3
    assert not out.exists() and len(committed_parts(out)) >= 2
    assert _score(triton_server, h5, images, "--out", out, *common, "--resume") == 0
    got, want = read_results(out), read_results(full)
    sources = [r["source"] for r in got]
    assert len(sources) == len(set(sources)) == 16 + 8
    assert sources == [r["source"] for r in want]
    assert sources[0] == f"{h5}#0" and got[0]["label"] is not None
    np.testing.assert_allclose([r["prob_tumour"] for r in got], [r["prob_tumour"] for r in want], atol=ATOL)


@pytest.mark.client
def test_encoded_files_through_the_ensemble_match_pixels(triton_server, synth_data, tmp_path):
    folder = synth_data / "test" / "tumour"
    assert _score(triton_server, folder, "--out", tmp_path / "px.parquet") == 0
    assert _score(triton_server, folder, "--out", tmp_path / "enc.parquet", "--send", "encoded") == 0
    px, enc = read_results(tmp_path / "px.parquet"), read_results(tmp_path / "enc.parquet")
    assert [r["source"] for r in enc] == [r["source"] for r in px] and len(px) == 8
    assert [r["predicted"] for r in enc] == [r["predicted"] for r in px]
    np.testing.assert_allclose([r["prob_tumour"] for r in enc], [r["prob_tumour"] for r in px], atol=ENCODED_ATOL)


def _inference_count(url: str, model: str) -> int:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"]
        return sum(int(m.get("inference_count", 0)) for m in stats)
    finally:
        client.close()


def test_work_spread_over_two_servers_keeps_rows_in_input_order(triton_server, ort_reference, synth_data, tmp_path):
    from serving.server.embedded import EmbeddedTriton

    spec = triton_server.spec
    manifest = synth_data / "manifest.csv"
    out = tmp_path / "results.parquet"
    with EmbeddedTriton(triton_server.repo) as second:
        urls = (triton_server.grpc, second.urls.grpc)
        before = [_inference_count(u, spec.name) for u in urls]  # the model warm-up counts too
        code = cli(["score", str(manifest), "--split", "val", "--url", urls[0], "--url", urls[1],
                    "--model", spec.name, "--out", str(out), "--batch-size", "2", "--no-progress"])
        served = tuple(_inference_count(u, spec.name) - b for u, b in zip(urls, before))
    assert code == 0
    rows = read_results(out)
    assert len(rows) == 16
    # Both servers did part of the work, and together exactly all of it.
    assert served[0] > 0 and served[1] > 0 and sum(served) == 16, served
    probs = np.array([[r[f"prob_{c}"] for c in spec.class_names] for r in rows])
    np.testing.assert_allclose(probs, _expected(ort_reference, spec, [r["source"] for r in rows]), atol=ATOL)


@pytest.mark.client
def test_bad_flags_are_refused_with_the_flag_named(triton_server, synth_data, tmp_path, capsys):
    assert _score(triton_server, synth_data / "test", "--out", tmp_path / "r.json") == 2
    assert "--out: " in capsys.readouterr().err
    assert _score(triton_server, synth_data / "test", "--out", tmp_path / "r.csv", "--send", "encoded",
                  "--tta", "five") == 2
    assert "--send encoded: the ensemble scores the centre crop only" in capsys.readouterr().err
    assert _score(triton_server, tmp_path / "missing", "--out", tmp_path / "r.csv") == 2
    assert "missing: no such file or folder" in capsys.readouterr().err


@pytest.mark.client
def test_existing_output_is_refused_without_resume_or_overwrite(triton_server, class_tree, tmp_path, capsys):
    out = tmp_path / "results.csv"
    assert _score(triton_server, class_tree / "normal", "--out", out) == 0
    first = out.read_bytes()
    assert _score(triton_server, class_tree / "normal", "--out", out) == 2
    assert "pass --resume to continue that job or --overwrite to start over" in capsys.readouterr().err
    assert out.read_bytes() == first  # nothing already computed was touched
    assert _score(triton_server, class_tree / "normal", "--out", out, "--overwrite") == 0
    assert out.read_bytes() == first
