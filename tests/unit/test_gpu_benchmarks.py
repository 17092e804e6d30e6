"""Parts of the GPU benchmarks that run on the CPU: the DALI loader they build, and engine rows."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.gpu_common import DRY_RUN
from benchmarks.gpu_serve import Engine, engine_rows


def test_the_dali_benchmark_builds_training_s_pipeline_with_device_id_none_and_batches_come_out(tmp_path):
    # The benchmark used to hand reader_name= to a pipeline without a reader: "Operator Reader not found".
    pytest.importorskip("nvidia.dali", reason="the train extra installs DALI")
    from benchmarks.gpu_train import dali_loader, endless, write_jpegs
    from training.pipeline import READER

    paths = write_jpegs(tmp_path, 6, size=48)
    loader, samples = dali_loader(paths, DRY_RUN, threads=1)
    batches = endless(loader, samples, DRY_RUN.batch)
    got = [next(batches) for _ in range(3)]  # past the end of the first epoch: the pipeline is reset, not rebuilt
    assert [tuple(x.shape) for x, _ in got] == [(DRY_RUN.batch, DRY_RUN.image, DRY_RUN.image, 3)] * 3
    assert {(x.device.type, str(x.dtype)) for x, _ in got} == {("cpu", "torch.uint8")}
    assert got[0][1].tolist() == [int(p.name[0]) for p in paths[:4]]
    assert loader.builds == 1
    assert READER not in loader._pipe.reader_meta()  # external_source: no reader to name


def test_each_engine_row_lands_as_soon_as_it_is_measured_whatever_the_next_engine_does(tmp_path):
    from benchmarks.gpu_serve import export_served, tensorrt_engine
    from export.onnx_export import ort_session

    spec, onnx_path = export_served(DRY_RUN, tmp_path, max_batch=4)
    session = ort_session(onnx_path)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(onnx_path.read_bytes()[: 1000])
    landed = []
    engines = [Engine("ONNX Runtime CPU", lambda: lambda x: session.run([spec.output_name], {spec.input_name: x})[0]),
               Engine("a truncated graph", lambda: ort_session(broken)),
               tensorrt_engine(spec, onnx_path, tmp_path),  # no GPU or no tensorrt here: not installed
               Engine("not here", lambda: None, not_run="dry run: needs a GPU")]
    rows = engine_rows(engines, DRY_RUN, 4, lambda row: landed.append(dict(row)))
    assert landed == rows
    import torch

    from benchmarks.gpu_common import installed

    plan = "ok" if torch.cuda.is_available() and installed("tensorrt") else "not installed"
    assert [r["status"] for r in rows] == ["ok", "failed", plan, "not run"]
    assert rows[0]["batch"] == 4 and rows[0]["images_per_s"] > 0 and rows[0]["p99_ms_batch1"] > 0
    assert rows[1]["error"].startswith("InvalidProtobuf") or rows[1]["error"].startswith("Fail")
    assert plan == "ok" or rows[2]["missing"] in ("no CUDA GPU on this machine; build the plan on the GPU type that will serve it",
                                  "the tensorrt package is not installed (pip install 'patchserve[gpu]' on a GPU "
                                  "machine)")
    assert np.isfinite(rows[0]["images_per_s"])
