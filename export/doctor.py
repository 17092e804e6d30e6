"""``patchserve doctor``: what is installed, which CUDA it was built for, and what really runs on the GPU.

Each probe does the real thing (a torch matmul on the GPU, a DALI mixed decode
of one JPEG, an ONNX Runtime session whose active providers include CUDA, a
TensorRT engine built from a tiny network, the embedded Triton server started
on an empty repository) and never raises: a failure becomes the component's
``detail`` and an ``install`` hint. The module lives in the export layer
because it probes the whole stack.
"""

from __future__ import annotations

import importlib.metadata as md
import io
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from serving.core.options import option

# The torch wheel the registry serves decides the CUDA major of the whole stack.
CUDA_MAJOR_HINT = "13"
# The embedded server's Triton (nvidia-pytriton wheel) carries the Python backend only.
NGC_HINT = "GPU flavours (onnxruntime, tensorrt) need a Triton with those backends: NGC's tritonserver container"


@dataclass(frozen=True)
class Component:
    """One line of the doctor's report."""

    name: str
    installed: bool
    version: str = ""
    cuda_built: str = ""  # CUDA version the package was built for ("" = CPU-only build or not applicable)
    gpu: bool = False  # the GPU probe really ran here
    gpu_applies: bool = True  # OpenSlide has no GPU path
    detail: str = ""
    install: str = ""  # what to install or do to get the GPU path ("" when nothing is missing)

    def to_dict(self) -> dict:
        return asdict(self)


def _dist_version(*names: str) -> tuple[str, str]:
    """(distribution name, version) of the first installed distribution among ``names``."""
    for name in names:
        try:
            return name, md.version(name)
        except md.PackageNotFoundError:
            continue
    return "", ""


def gpu_count() -> int:
    """GPUs torch can see (nvidia-smi when torch is not installed: a client-only machine)."""
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return 0
        return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def _tiny_onnx(static: bool = True) -> bytes:
    """y = x @ W + b on a 1x4 float input: small enough to build anywhere, real enough to run."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(4, 4) / 16, "w")
    b = numpy_helper.from_array(np.ones(4, dtype=np.float32), "b")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])]
    graph = helper.make_graph(nodes, "doctor", [x], [y], initializer=[w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every ONNX Runtime and TensorRT parser this project supports
    return model.SerializeToString()


def probe_torch(gpus: int) -> Component:
    try:
        import torch
    except ImportError:
        return Component("torch", False, install="pip install 'patchserve[train]' (torch, CUDA 13 wheel)")
    base = dict(name="torch", installed=True, version=torch.__version__, cuda_built=torch.version.cuda or "")
    if not torch.version.cuda:
        return Component(**base, detail="CPU-only build", install="install the CUDA build of torch from the registry")
    if not gpus:
        return Component(**base, detail="no CUDA device here")
    try:
        a = torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64) / 4096
        got = (a.cuda() @ a.cuda()).cpu()
        ok = bool(torch.allclose(got, a @ a, rtol=1e-3, atol=1e-3))
        name = torch.cuda.get_device_name(0)
        verdict = "matches the CPU" if ok else "DIFFERS from the CPU"
        return Component(**base, gpu=ok, detail=f"matmul on {name}: {verdict}")
    except Exception as exc:  # noqa: BLE001 - any CUDA failure is the answer
        return Component(**base, detail=f"matmul on cuda:0 failed: {exc}", install="a driver for CUDA 13")


def _jpeg() -> bytes:
    from PIL import Image

    yy, xx = np.mgrid[0:32, 0:32]
    img = np.stack([xx * 8, yy * 8, (xx + yy) * 4], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def probe_dali(gpus: int) -> Component:
    hint = f"pip install nvidia-dali-cuda{CUDA_MAJOR_HINT}0 (the same CUDA major as torch)"
    try:
        import nvidia.dali as dali
    except ImportError:
        return Component("DALI", False, install=hint)
    dist, _ = _dist_version(*(f"nvidia-dali-cuda{v}" for v in ("130", "120", "110")))
    # __cuda_version__ is an integer (13492 for the CUDA 13 build): its thousands are the major.
    raw = int(getattr(dali, "__cuda_version__", 0) or 0)
    built = str(raw // 1000) if raw else dist.rsplit("cuda", 1)[-1][:-1]
    base = dict(name="DALI", installed=True, version=f"{dali.__version__} ({dist})", cuda_built=built)
    if not gpus:
        return Component(**base, detail="no CUDA device here: CPU pipelines only (device_id=None)")
    try:
        from nvidia.dali import fn, pipeline_def, types

        data = np.frombuffer(_jpeg(), dtype=np.uint8)

        @pipeline_def(batch_size=1, num_threads=1, device_id=0, prefetch_queue_depth=1)
        def decode():
            encoded = fn.external_source(source=lambda: [data], batch=True, dtype=types.UINT8, ndim=1)
            return fn.decoders.image(encoded, device="mixed", output_type=types.RGB)

        pipe = decode()
        pipe.build()
        (out,) = pipe.run()
        shape = tuple(np.array(out.as_cpu().at(0)).shape)
        ok = "GPU" in type(out).__name__ and shape == (32, 32, 3)
        return Component(**base, gpu=ok, detail=f"mixed decode of one JPEG -> {type(out).__name__} {shape}")
    except Exception as exc:  # noqa: BLE001
        return Component(**base, detail=f"mixed decode failed: {exc}".splitlines()[0], install=hint)


def probe_onnxruntime(gpus: int) -> Component:
    hint = f"pip uninstall onnxruntime && pip install 'onnxruntime-gpu[cuda,cudnn]' (its CUDA {CUDA_MAJOR_HINT} build)"
    try:
        import onnxruntime as ort
    except ImportError:
        return Component("ONNX Runtime", False, install=hint)
    dist, _ = _dist_version("onnxruntime-gpu", "onnxruntime")
    available = ort.get_available_providers()
    built = getattr(ort, "cuda_version", "") if "CUDAExecutionProvider" in available else ""
    base = dict(name="ONNX Runtime", installed=True, version=f"{ort.__version__} ({dist})", cuda_built=built or "")
    if "CUDAExecutionProvider" not in available:
        return Component(**base, detail=f"providers {available}: CPU build", install=hint)
    if not gpus:
        return Component(**base, detail=f"no CUDA device here; providers built in: {', '.join(available)}")
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(_tiny_onnx(), options,
                                       providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        active = session.get_providers()
        y = session.run(["y"], {"x": np.ones((1, 4), np.float32)})[0]
        want = np.ones((1, 4)) @ (np.arange(16).reshape(4, 4) / 16) + 1
        ok = "CUDAExecutionProvider" in active and bool(np.allclose(y, want))
        return Component(**base, gpu=ok, detail=f"session active providers: {', '.join(active)}",
                         install="" if ok else "the CUDA 13 libraries its CUDA provider loads (libcurand.so.10, "
                                               "cuDNN 9, ...): pip install 'onnxruntime-gpu[cuda,cudnn]'")
    except Exception as exc:  # noqa: BLE001
        return Component(**base, detail=f"CUDA session failed: {exc}".splitlines()[0], install=hint)


def probe_tensorrt(gpus: int) -> Component:
    hint = "pip install 'patchserve[gpu]' (tensorrt-cu13 10.x, the major ONNX Runtime's TensorRT provider loads)"
    try:
        import tensorrt as trt
    except ImportError:
        return Component("TensorRT", False, install=hint)
    dists = sorted(d.metadata["Name"] for d in md.distributions()
                   if re.fullmatch(r"tensorrt[-_]cu\d+(?:[-_]libs)?", (d.metadata["Name"] or "").lower()))
    built = next((re.search(r"cu(\d+)", d).group(1) for d in dists), "")
    base = dict(name="TensorRT", installed=True, version=trt.__version__, cuda_built=built)
    if not gpus:
        return Component(**base, detail="no CUDA device here: plans are built on the GPU type that serves them")
    try:
        logger = trt.Logger(trt.Logger.ERROR)
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(_tiny_onnx()):
            raise RuntimeError("; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
        plan = builder.build_serialized_network(network, builder.create_builder_config())
        if plan is None:
            raise RuntimeError("build_serialized_network returned None")
        engine = trt.Runtime(logger).deserialize_cuda_engine(bytes(plan))
        ok = engine is not None
        note = "" if trt.__version__.startswith("10.") else \
            "; ONNX Runtime 1.31's TensorRT provider needs TensorRT 10 (libnvinfer.so.10)"
        return Component(**base, gpu=ok, detail=f"built and loaded an engine ({len(bytes(plan))} bytes){note}",
                         install="" if not note else hint)
    except Exception as exc:  # noqa: BLE001
        return Component(**base, detail=f"builder failed: {exc}".splitlines()[0], install=hint)


def probe_triton(gpus: int) -> Component:
    hint = "pip install 'patchserve[serve]' (nvidia-pytriton carries the tritonserver binary)"
    try:
        import pytriton  # noqa: F401 - the wheel that carries the tritonserver binary
    except ImportError:
        return Component("Triton server", False, install=hint)
    _, version = _dist_version("nvidia-pytriton")
    from serving.server.embedded import EmbeddedTriton, triton_backends

    backends = triton_backends()
    gpu_backends = [b for b in backends if b in ("onnxruntime", "tensorrt")]
    try:
        import tritonclient.http as httpclient

        with tempfile.TemporaryDirectory(prefix="patchserve-doctor-") as repo, \
                EmbeddedTriton(repo, startup_timeout_s=60.0) as server:
            client = httpclient.InferenceServerClient(server.urls.http)
            try:
                meta = client.get_server_metadata()
            finally:
                client.close()
        detail = f"started on an empty repository; backends: {', '.join(backends)}"
        tv = meta.get("version", "?")
    except Exception as exc:  # noqa: BLE001
        return Component("Triton server", True, version=f"nvidia-pytriton {version}",
                         detail=f"the binary did not start: {exc}".splitlines()[0], install=hint)
    # The wheel's binary has no GPU backend: its GPU question does not apply (NGC's container answers it).
    return Component("Triton server", True, version=f"{tv} (nvidia-pytriton {version})",
                     gpu=bool(gpu_backends and gpus), gpu_applies=bool(gpu_backends),
                     detail=detail + ("" if gpu_backends else "; the python flavour runs ONNX Runtime on the CPU"),
                     install="" if gpu_backends else NGC_HINT)


def probe_openslide(gpus: int) -> Component:
    try:
        import openslide
    except ImportError:
        return Component("OpenSlide", False, gpu_applies=False, install="pip install openslide-python openslide-bin")
    return Component("OpenSlide", True, version=f"{openslide.__version__} (library {openslide.__library_version__})",
                     gpu_applies=False, detail="slides are read on the CPU")


PROBES: tuple[Callable[[int], Component], ...] = (probe_torch, probe_dali, probe_onnxruntime, probe_tensorrt,
                                                  probe_triton, probe_openslide)


@dataclass(frozen=True)
class DoctorReport:
    gpus: int
    device: str
    components: tuple[Component, ...]

    @property
    def cuda_majors(self) -> dict[str, str]:
        return {c.name: c.cuda_built.split(".")[0] for c in self.components if c.cuda_built}

    def to_dict(self) -> dict:
        majors = self.cuda_majors
        return {"gpus": self.gpus, "device": self.device, "cuda_majors": majors,
                "cuda_majors_agree": len(set(majors.values())) <= 1,
                "components": [c.to_dict() for c in self.components]}

    def as_text(self) -> str:
        lines = [f"GPU: {self.device}" if self.gpus else "GPU: none found (CPU-only machine: GPU paths not checked)"]
        head = f"{'component':<14} {'version':<36} {'CUDA':<6} {'on GPU':<7} detail"
        lines += [head, "-" * len(head)]
        for c in self.components:
            on_gpu = "n/a" if not c.gpu_applies else ("yes" if c.gpu else "no")
            lines.append(f"{c.name:<14} {(c.version if c.installed else 'not installed'):<36} "
                         f"{c.cuda_built or '-':<6} {on_gpu:<7} {c.detail}")
        majors = self.cuda_majors
        if majors:
            agree = len(set(majors.values())) <= 1
            lines.append(f"CUDA majors: {', '.join(f'{k} {v}' for k, v in majors.items())} -> "
                         f"{'one major' if agree else 'MIXED: install the builds for one CUDA major'}")
        todo = [c for c in self.components if c.install and (not c.installed or self.gpus or not c.gpu_applies)]
        if todo:
            lines.append("to install:")
            lines += [f"  {c.name}: {c.install}" for c in todo]
        return "\n".join(lines)


@dataclass(frozen=True)
class DoctorConfig:
    """Options of ``patchserve doctor``."""

    json: bool = option(False, "print the report as JSON instead of a table")
    require_gpu: bool = option(False, "exit 1 unless a GPU is present and every installed GPU-capable component "
                                      "ran on it")


def run_doctor() -> DoctorReport:
    """Probe every component; never raises for a missing or broken one."""
    gpus = gpu_count()
    device = ""
    if gpus:
        try:
            import torch

            device = f"{gpus} x {torch.cuda.get_device_name(0)}"
        except Exception:  # noqa: BLE001 - nvidia-smi saw a GPU, torch could not name it
            device = f"{gpus} GPU(s)"
    return DoctorReport(gpus, device, tuple(probe(gpus) for probe in PROBES))
