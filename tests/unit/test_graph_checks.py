"""The uint8-feeds-only-Cast check that makes exported graphs TensorRT-ready."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from export.graph_checks import route_shapes_through_cast, uint8_feed_problems  # noqa: E402


def _graph(transpose_first: bool):
    """uint8 NHWC -> (Transpose, Cast) or (Cast, Transpose) -> float NCHW."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x_u8", TensorProto.UINT8, ["N", 4, 4, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4, 4])
    if transpose_first:
        nodes = [helper.make_node("Transpose", ["x_u8"], ["t"], name="permute", perm=[0, 3, 1, 2]),
                 helper.make_node("Cast", ["t"], ["y"], name="cast", to=TensorProto.FLOAT)]
    else:
        nodes = [helper.make_node("Cast", ["x_u8"], ["c"], name="cast", to=TensorProto.FLOAT),
                 helper.make_node("Transpose", ["c"], ["y"], name="permute", perm=[0, 3, 1, 2])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_uint8_input_feeding_a_transpose_is_reported_with_the_node():
    assert uint8_feed_problems(_graph(transpose_first=True)) == [
        "uint8 tensor 'x_u8' feeds Transpose node 'permute'; TensorRT takes uint8 only into a Cast "
        "(cast first, then transpose/slice)"]


def test_uint8_input_feeding_only_a_cast_passes():
    assert uint8_feed_problems(_graph(transpose_first=False)) == []


def test_an_intermediate_uint8_tensor_from_a_cast_is_checked_too():
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.UINT8, [2])
    nodes = [helper.make_node("Cast", ["x"], ["q"], name="to_u8", to=TensorProto.UINT8),
             helper.make_node("Identity", ["q"], ["y"], name="copy")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 18)])
    assert [p.split(";")[0] for p in uint8_feed_problems(model)] == ["uint8 tensor 'q' feeds Identity node 'copy'"]


def test_a_shape_read_from_the_uint8_input_is_rerouted_through_its_cast_with_the_same_result(tmp_path):
    from onnx import TensorProto, helper

    from export.onnx_export import ort_session

    x = helper.make_tensor_value_info("x_u8", TensorProto.UINT8, ["N", 2, 2, 3])
    n = helper.make_tensor_value_info("n", TensorProto.INT64, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 2, 3])
    nodes = [helper.make_node("Shape", ["x_u8"], ["n"], name="batch", end=1),
             helper.make_node("Cast", ["x_u8"], ["y"], name="cast", to=TensorProto.FLOAT)]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y, n]), opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8  # what this ONNX Runtime reads; the onnx package writes a newer one by default
    assert [p.split(";")[0] for p in uint8_feed_problems(model)] == ["uint8 tensor 'x_u8' feeds Shape node 'batch'"]
    assert route_shapes_through_cast(model) == 1
    onnx.checker.check_model(model, full_check=True)  # still topologically sorted
    assert uint8_feed_problems(model) == []
    assert [(node.op_type, list(node.input)) for node in model.graph.node] == [("Cast", ["x_u8"]), ("Shape", ["y"])]
    f = tmp_path / "m.onnx"
    onnx.save(model, str(f))
    got_y, got_n = ort_session(f).run(["y", "n"], {"x_u8": np.full((5, 2, 2, 3), 7, np.uint8)})
    assert got_n.tolist() == [5] and got_y.dtype == np.float32 and float(got_y.max()) == 7.0


# 64 px: from this size on the exporter reads the batch size with Shape on the graph input.
@pytest.mark.parametrize("what", ["classifier", "tta"])
def test_exported_classifier_and_tta_graphs_cast_their_uint8_input_first_and_keep_the_dynamic_batch(what, tmp_path):
    import torch

    from export.onnx_export import PROB_ATOL, export_onnx, ort_session, parity_vs_torch
    from export.tta import TTAModel
    from serving.core.spec import ModelSpec
    from training.model import ModelConfig, ServedModel, build_model

    torch.manual_seed(0)
    spec = ModelSpec(name="tiny", class_names=("a", "b"), input_height=64, input_width=64,
                     mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2), max_batch_size=4)
    clf = build_model(spec, ModelConfig()).eval()
    module, hw = (ServedModel(clf), spec.input_hw) if what == "classifier" else (TTAModel(clf, spec, "five"),
                                                                                  spec.source_hw)
    sample = np.random.default_rng(0).integers(0, 256, size=(2, *hw, 3), dtype=np.uint8)
    path = export_onnx(module, sample, tmp_path / "m.onnx", input_name=spec.input_name,
                       output_names=[spec.output_name] if what == "tta" else [spec.output_name, spec.logits_name])
    model = onnx.load(str(path))
    consumers = [n.op_type for n in model.graph.node if spec.input_name in n.input]
    assert consumers == ["Cast"]
    assert uint8_feed_problems(model) == []
    x = np.random.default_rng(1).integers(0, 256, size=(3, *hw, 3), dtype=np.uint8)  # traced at 2
    row = parity_vs_torch(module, ort_session(path), x, model="tiny", input_name=spec.input_name,
                          output_name=spec.output_name)
    assert row.value <= PROB_ATOL, row.as_text()
