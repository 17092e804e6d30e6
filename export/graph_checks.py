"""Static checks of an ONNX graph that the ONNX checker does not make.

TensorRT accepts uint8 tensors only as network inputs and outputs and as the
input or output of a Cast; a uint8 tensor that feeds a Transpose, Slice or
Shape makes the parser or the builder fail on the GPU, long after export. The
check runs on any machine, so ``check-export`` catches it in CPU-only CI.
"""

from __future__ import annotations

_UINT8 = 2  # onnx.TensorProto.UINT8; a literal so this module does not import onnx at import time


def _uint8_tensors(model) -> set[str]:
    """Names of every uint8 tensor: inputs, initializers, and intermediates (from shape inference)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference can fail on exotic graphs; the declared types still count
        inferred = model
    graph = inferred.graph
    names = {v.name for v in (*graph.input, *graph.value_info, *graph.output)
             if v.type.tensor_type.elem_type == _UINT8}
    names |= {t.name for t in graph.initializer if t.data_type == _UINT8}
    # A Cast to uint8 produces one even when inference left no value_info for it.
    for node in graph.node:
        if node.op_type == "Cast" and any(a.name == "to" and a.i == _UINT8 for a in node.attribute):
            names.update(node.output)
    return names


def uint8_feed_problems(model) -> list[str]:
    """One message per node that consumes a uint8 tensor and is not a Cast (empty: the graph is fine)."""
    uint8 = _uint8_tensors(model)
    problems = []
    for i, node in enumerate(model.graph.node):
        if node.op_type == "Cast":
            continue
        for name in node.input:
            if name in uint8:
                label = node.name or f"#{i}"
                problems.append(f"uint8 tensor {name!r} feeds {node.op_type} node {label!r}; "
                                "TensorRT takes uint8 only into a Cast (cast first, then transpose/slice)")
    return problems


def route_shapes_through_cast(model) -> int:
    """Rewire Shape nodes that read a uint8 graph input to read its Cast's output instead; return how many.

    The dynamo exporter materialises the symbolic batch size with ``Shape`` on
    the graph input (for the flatten before the head, at inputs of 64 px and
    more). The cast tensor has the same shape, so reading it instead changes no
    value and leaves the uint8 input feeding nothing but the Cast.
    """
    inputs = {v.name for v in model.graph.input if v.type.tensor_type.elem_type == _UINT8}
    cast_of = {}
    for node in model.graph.node:
        if node.op_type == "Cast" and len(node.input) == 1 and node.input[0] in inputs:
            cast_of.setdefault(node.input[0], node.output[0])
    rewired = 0
    for node in model.graph.node:
        if node.op_type == "Shape" and node.input and node.input[0] in cast_of:
            node.input[0] = cast_of[node.input[0]]
            rewired += 1
    if rewired:
        # Keep the graph topologically sorted: those Casts read only graph inputs, so they can go first.
        nodes = list(model.graph.node)
        first = [n for n in nodes if n.op_type == "Cast" and n.output[0] in cast_of.values()]
        rest = [n for n in nodes if not (n.op_type == "Cast" and n.output[0] in cast_of.values())]
        del model.graph.node[:]
        model.graph.node.extend(first + rest)
    return rewired
