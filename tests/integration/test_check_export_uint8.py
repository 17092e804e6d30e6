"""check-export's uint8 rule: a graph whose uint8 input feeds anything but a Cast fails (TensorRT could not build it)."""

from __future__ import annotations

from export.check import check_repository
from tests.fixtures_export import link_copy


def _transpose_before_cast(path, input_name: str) -> None:
    """Rewrite the ONNX file so its uint8 input passes through an (identity) Transpose first, as exports once did."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    for node in model.graph.node:
        node.input[:] = ["permuted_u8" if i == input_name else i for i in node.input]
    model.graph.node.insert(0, helper.make_node("Transpose", [input_name], ["permuted_u8"], name="early_transpose",
                                                perm=[0, 1, 2, 3]))
    onnx.checker.check_model(model, full_check=True)
    path.unlink()  # a symlink into the shared fixture: replace it, never write through it
    onnx.save(model, str(path))


def test_uint8_input_feeding_a_transpose_fails_the_uint8_cast_check_only(exported_repo, tmp_path):
    repo, spec = exported_repo
    good = check_repository(repo, serve=False)
    assert [(r.model, r.status) for r in good.rows if r.check == "uint8-cast"] == [
        (spec.name, "ok"), (spec.tta_model_name, "ok")]
    broken = link_copy(repo, tmp_path / "repo")
    _transpose_before_cast(broken / spec.name / "1" / "model.onnx", spec.input_name)
    report = check_repository(broken, serve=False)
    assert [(r.check, r.model) for r in report.failed()] == [("uint8-cast", spec.name)]
    (row,) = report.failed("uint8-cast")
    assert row.detail == (f"uint8 tensor '{spec.input_name}' feeds Transpose node 'early_transpose'; TensorRT takes "
                          "uint8 only into a Cast (cast first, then transpose/slice)")
