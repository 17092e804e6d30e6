"""The NGC deploy command names the GPU flavour, so the container does not load the CPU python flavour."""

from __future__ import annotations

from serving.server.embedded import NGC_IMAGE, gpu_flavour, ngc_command


def _repo(root, flavours):
    for model in ("m", "m_ensemble"):
        (root / model).mkdir(parents=True)
        (root / model / "config.pbtxt").write_text("")
    (root / "m" / "configs").mkdir()
    for f in flavours:
        (root / "m" / "configs" / f"{f}.pbtxt").write_text("")
    return root


def test_gpu_flavour_is_tensorrt_when_a_plan_config_exists_else_onnxruntime(tmp_path):
    assert gpu_flavour(_repo(tmp_path / "a", ["onnxruntime"])) == "onnxruntime"
    assert gpu_flavour(_repo(tmp_path / "b", ["onnxruntime", "tensorrt"])) == "tensorrt"


def test_ngc_command_loads_the_named_flavour_from_the_mounted_repository(tmp_path):
    cmd = ngc_command(tmp_path, model_config_name="tensorrt", http_port=9000, grpc_port=9001, metrics_port=9002)
    assert cmd == (f"docker run --gpus all --rm -p 9000:8000 -p 9001:8001 -p 9002:8002 -v {tmp_path.resolve()}:/models "
                   f"{NGC_IMAGE} tritonserver --model-repository=/models --model-control-mode=none "
                   "--model-config-name=tensorrt")
