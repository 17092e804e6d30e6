"""The ONNX backend's choice of workers: the cores the server may use (affinity, cgroup quota), not the host's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from serving.server.backends import onnx_model
from serving.server.backends.onnx_model import WORKERS_ENV, cgroup_cpu_limit, choose_workers, cores_seen


def _tree(tmp_path, proc_lines: str, files: dict[str, str]):
    tmp_path.mkdir(parents=True, exist_ok=True)
    proc = tmp_path / "proc_cgroup"
    proc.write_text(proc_lines)
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return str(root), str(proc)


def test_cgroup_v2_quota_of_the_tightest_ancestor(tmp_path):
    root, proc = _tree(tmp_path, "0::/kubepods/pod1/ctr\n", {
        "kubepods/cpu.max": "max 100000\n",
        "kubepods/pod1/cpu.max": "150000 100000\n",   # the pod: 1.5 cores
        "kubepods/pod1/ctr/cpu.max": "400000 100000\n",
    })
    assert cgroup_cpu_limit(root, proc) == 1.5


def test_cgroup_v2_without_quota_and_v1_quota(tmp_path):
    root, proc = _tree(tmp_path, "0::/\n", {"cpu.max": "max 100000\n"})
    assert cgroup_cpu_limit(root, proc) is None
    root, proc = _tree(tmp_path / "v1", "2:cpuacct:/\n1:cpu:/job\n0::/\n", {
        "cpu/job/cpu.cfs_quota_us": "300000\n", "cpu/job/cpu.cfs_period_us": "100000\n",
        "cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"})
    assert cgroup_cpu_limit(root, proc) == 3.0
    root, proc = _tree(tmp_path / "none", "garbage\n", {})
    assert cgroup_cpu_limit(root, proc) is None


def test_cores_seen_caps_affinity_by_quota_rounding_up(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    root, proc = _tree(tmp_path, "0::/c\n", {"c/cpu.max": "50000 100000\n"})  # half a core: still one
    assert cores_seen(root, proc)[0] == 1
    root, proc = _tree(tmp_path / "b", "0::/c\n", {"c/cpu.max": f"{(affinity + 4) * 100000} 100000\n"})
    n, how = cores_seen(root, proc)
    assert n == affinity and f"affinity {affinity}" in how and "quota" in how


def test_choose_workers_override_config_and_auto():
    assert choose_workers("auto", 1, environ={}, cores=(4, "x"))[0] == 4
    assert choose_workers("auto", 2, environ={}, cores=(4, "x"))[0] == 2
    assert choose_workers("auto", 3, environ={}, cores=(2, "x"))[0] == 1  # never 0
    assert choose_workers("", 1, environ={}, cores=(3, "x"))[0] == 3  # a config without the parameter
    assert choose_workers("2", 1, environ={}, cores=(8, "x")) == (2, "config.pbtxt workers 2")
    assert choose_workers("auto", 1, environ={WORKERS_ENV: "3"}, cores=(8, "x")) == (3, f"{WORKERS_ENV}=3")
    # A user's OMP_NUM_THREADS is not ours: it changes nothing.
    assert choose_workers("auto", 1, environ={"OMP_NUM_THREADS": "1"}, cores=(2, "x"))[0] == 2
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(ValueError, match=WORKERS_ENV):
            choose_workers("auto", 1, environ={WORKERS_ENV: bad}, cores=(2, "x"))
    with pytest.raises(ValueError, match="workers='many'"):
        choose_workers("many", 1, environ={}, cores=(2, "x"))


def test_affinity_is_what_counts_not_the_host():
    """One core allowed by affinity: one worker, on a host with more."""
    code = ("import os, sys; sys.path.insert(0, sys.argv[1]); import onnx_model as m; "
            "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); print(m.choose_workers('auto', 1, environ={})[0])")
    out = subprocess.run([sys.executable, "-c", code, os.path.dirname(onnx_model.__file__)],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


def test_a_batch_split_over_workers_gives_every_request_its_own_rows_of_every_output(tmp_path):
    """The slices of one batch (of several requests) come back whole, each request gets its rows of every
    output, in order; a slice that failed fails every request of its batch."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from serving.server.backends.onnx_model import request_outputs

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "x"], ["sq"]), helper.make_node("ReduceSum", ["x"], ["sum"], keepdims=0,
                                                                        axes=[1])],
        "g", [x], [helper.make_tensor_value_info("sq", TensorProto.FLOAT, ["n", 3]),
                   helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["n"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    backend = onnx_model.TritonPythonModel.__new__(onnx_model.TritonPythonModel)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"x": np.arange(39, dtype=np.float32).reshape(13, 3)}
    sizes = [5, 1, 7]  # three requests of one batch
    for workers, slices in ((1, 1), (2, 2), (3, 3), (5, 3)):  # never a slice under MIN_SLICE rows
        backend.workers = workers
        parts = backend.split(feeds)
        assert len(parts) == slices and sum(len(p["x"]) for p in parts) == 13
        outs = [session.run(["sq", "sum"], p) for p in parts]
        start = 0
        for size, (sq, total) in zip(sizes, request_outputs(outs, sizes), strict=True):
            rows = feeds["x"][start:start + size]
            np.testing.assert_array_equal(sq, rows ** 2)
            np.testing.assert_array_equal(total, rows.sum(axis=1))
            start += size
    broken = RuntimeError("slice 2 failed")
    assert request_outputs([outs[0], broken, outs[2]], sizes) == [broken] * 3
