"""ONNX export, the server-side TTA graph and the DALI preprocessing, without a server."""

from __future__ import annotations

import glob

import numpy as np
import pytest

from export.errors import ExportError
from export.onnx_export import PROB_ATOL, check_onnx, export_onnx, onnx_signature, ort_session, parity_vs_torch


@pytest.fixture(scope="module")
def classifier(tiny_spec_module):
    import torch

    from training.model import ModelConfig, build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    return build_model(tiny_spec_module, ModelConfig()).eval()


@pytest.fixture(scope="module")
def tiny_spec_module():
    from serving.core.spec import ModelSpec

    # Custom tensor names on purpose: timm's exporter loses the dynamic batch with them.
    return ModelSpec(name="tiny", class_names=("normal", "tumour"), input_height=32, input_width=32,
                     mean=(0.7, 0.5, 0.7), std=(0.15, 0.2, 0.15), max_batch_size=8,
                     input_name="pix_u8", output_name="probs", logits_name="raw")


def _u8(shape, seed):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def test_custom_tensor_names_keep_the_dynamic_batch_and_match_torch_at_other_batches(
        classifier, tiny_spec_module, tmp_path):
    from training.model import ServedModel

    spec = tiny_spec_module
    served = ServedModel(classifier).eval()
    path = export_onnx(served, _u8((2, 32, 32, 3), 0), tmp_path / "m.onnx", input_name=spec.input_name,
                       output_names=[spec.output_name, spec.logits_name])
    ins, outs = onnx_signature(check_onnx(path))
    assert [(t.name, t.dtype) for t in ins] == [("pix_u8", "uint8")]
    assert isinstance(ins[0].shape[0], str) and ins[0].shape[1:] == (32, 32, 3)
    assert [(t.name, isinstance(t.shape[0], str), t.shape[1:]) for t in outs] == [
        ("probs", True, (2,)), ("raw", True, (2,))]
    session = ort_session(path)
    for batch in (1, 3, 8):  # traced at 2
        row = parity_vs_torch(served, session, _u8((batch, 32, 32, 3), batch), model="tiny",
                              input_name="pix_u8", output_name="probs")
        assert row.value <= PROB_ATOL, row.as_text()


def test_tracing_with_a_batch_of_one_is_refused(classifier, tmp_path):
    with pytest.raises(ExportError, match="trace with a batch of at least 2"):
        export_onnx(classifier, _u8((1, 32, 32, 3), 0), tmp_path / "m.onnx", input_name="x", output_names=["y"])


@pytest.mark.parametrize("mode", ["five", "ten"])
def test_tta_graph_equals_client_side_views_averaged(classifier, tiny_spec_module, mode):
    import torch

    from export.tta import TTAModel
    from serving.core.views import combine_views, make_views, num_views

    spec = tiny_spec_module
    src = _u8((3, *spec.source_hw, 3), 7)
    with torch.no_grad():
        server = TTAModel(classifier, spec, mode)(torch.from_numpy(src)).numpy()
        views = torch.from_numpy(make_views(src, mode, spec.input_hw))
        client = combine_views(torch.softmax(classifier(views), 1).numpy(), num_views(mode))
    np.testing.assert_allclose(server, client, atol=1e-6)


def test_tta_model_refuses_modes_it_cannot_export(classifier, tiny_spec_module):
    from export.tta import TTAModel

    with pytest.raises(ValueError, match="Invalid TTA views 'flip'. Only five, ten are supported."):
        TTAModel(classifier, tiny_spec_module, "flip")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_dali_preprocessing_matches_the_client_pil_path_within_two_grey_levels(
        synth_data, tiny_spec_module, tmp_path, fmt):
    from export.build import encode
    from export.patches import centre_crop
    from export.preprocess import run_serialized, serialize_pipeline
    from serving.core.imageio import load_rgb_u8

    spec = tiny_spec_module
    dali = serialize_pipeline(spec, tmp_path / "model.dali", batch_size=spec.max_batch_size)
    files = sorted(glob.glob(str(synth_data / "test" / "*" / "*.png")))[::2]
    encoded = [encode(load_rgb_u8(f), fmt) for f in files]
    got = run_serialized(dali, encoded, input_name=spec.encoded_name, batch_size=spec.max_batch_size)
    # Reference: the client's own decode + PIL bilinear resize + "none" view crop of the same bytes.
    want = [centre_crop(load_rgb_u8(e), spec) for e in encoded]
    diffs = [np.abs(g.astype(np.int16) - w.astype(np.int16)) for g, w in zip(got, want)]
    assert all(g.shape == (32, 32, 3) and g.dtype == np.uint8 for g in got)
    assert max(int(d.max()) for d in diffs) <= 2
    assert float(np.mean([d.mean() for d in diffs])) < 0.5
