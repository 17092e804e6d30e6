"""Triton model configs built as ``model_config_pb2.ModelConfig`` messages.

Never string templates: every config is a protobuf message, written with
``google.protobuf.text_format``, so a typo is an AttributeError here rather
than a model that fails to load on a server. Everything comes from the spec
and :class:`ExportOptions`.

The message classes come from tritonclient (the client extra), imported where
a config is built or read: every export module imports without it (a GPU
machine that only exports and measures has no tritonclient).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from export.errors import ExportInputError
from export.tta import TTA_EXPORT_MODES
from serving.core.imageio import DEFAULT_MAX_IMAGE_PIXELS
from serving.core.options import option
from serving.core.spec import FLAVOURS, SPEC_PARAMETER, TTA_VIEWS_PARAMETER, WEIGHTS_PARAMETER, ModelSpec

if TYPE_CHECKING:
    from tritonclient.grpc.model_config_pb2 import ModelConfig


def model_config_pb2():
    """Triton's ``model_config.proto`` messages (tritonclient's copy)."""
    # Here, not at the top: export modules must import without tritonclient.
    from tritonclient.grpc import model_config_pb2 as mc

    return mc


FORMATS = FLAVOURS
TTA_PARAMETER = TTA_VIEWS_PARAMETER
MAX_PIXELS_PARAMETER = "max_image_pixels"
LABELS_FILE = "labels.txt"
ONNX_FILE = "model.onnx"
PLAN_FILE = "model.plan"
DALI_FILE = "model.dali"
PYTHON_FILE = "model.py"
# Flavour name -> config file inside the model folder; the server picks one
# with --model-config-name and falls back to config.pbtxt for the others.
DEFAULT_FLAVOUR = "python"


def config_file(flavour: str) -> str:
    return "config.pbtxt" if flavour == DEFAULT_FLAVOUR else f"configs/{flavour}.pbtxt"


# The dynamic batcher's wait for more requests. 2,000 us was about a quarter
# of the p50 latency of a single patch; this is the largest delay of the
# sweep in benchmarks/bench_serve.py (benchmarks/queue_delay.py) that adds at
# most 5% to that p50 while batches still form with many requests in flight.
DEFAULT_MAX_QUEUE_DELAY_US = 200


@dataclass(frozen=True)
class ExportOptions:
    """Export settings that shape the configs (stored as export.json beside them).

    The maximum batch size is not one of them: it lives in the spec only.
    """

    version: int = option(1, "numeric version folder")
    formats: tuple[str, ...] = option(
        ("python", "onnxruntime"),
        f"comma-separated flavours out of {','.join(FORMATS)}; tensorrt needs a GPU and the tensorrt package "
        "(the gpu extra), and is skipped with a message otherwise")
    tta_views: str = option("five", "views of the server-side TTA model", choices=TTA_EXPORT_MODES)
    with_tta: bool = option(True, "export the server-side TTA model NAME_tta", flag="--tta")
    with_dali: bool = option(True, "export the DALI preprocessing model and the encoded-bytes ensemble",
                             flag="--dali")
    instances: int = option(1, "model instances per model")
    max_queue_delay_us: int = option(
        DEFAULT_MAX_QUEUE_DELAY_US,
        "dynamic batcher queue delay in microseconds, chosen by benchmarks/bench_serve.py: at most +5% p50 "
        "latency for single patches")
    fp16: bool = option(True, "FP16 TensorRT plan / accelerator")
    trt_accelerator: bool = option(False, "add the TensorRT execution accelerator to the onnxruntime flavour")
    # Of the ONNX graphs: fp32, or int8 (static quantization, CPU servers).
    precision: str = option("fp32", "precision of the ONNX graphs: int8 is ONNX Runtime static quantization "
                                    "for CPU servers, calibrated on the run's training images (or --data); its "
                                    "parity is written beside it and checked by check-export",
                            choices=("fp32", "int8"))

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "int8"):
            raise ExportInputError(f"Invalid --precision {self.precision!r}. Only fp32, int8 are supported.")
        if self.precision == "int8" and "tensorrt" in self.formats:
            raise ExportInputError("--precision int8 is for CPU servers (ONNX Runtime); leave tensorrt out of "
                                   "--formats (its plan takes --fp16)")
        formats = tuple(self.formats)
        bad = [f for f in formats if f not in FORMATS]
        if bad or not formats:
            raise ExportInputError(f"--formats: invalid format(s) {bad or formats}. Only {', '.join(FORMATS)} are supported.")
        if "python" not in formats:
            # config.pbtxt (the embedded default) is the python flavour; without it no server here can load the model.
            raise ExportInputError(f"--formats: 'python' is required (it is config.pbtxt), got {','.join(formats)}")
        object.__setattr__(self, "formats", tuple(dict.fromkeys(formats)))
        if self.tta_views not in TTA_EXPORT_MODES:
            raise ExportInputError(f"--tta-views: invalid value {self.tta_views!r}. Only {', '.join(TTA_EXPORT_MODES)} are supported.")
        for flag, v, low in (("--version", self.version, 1),
                             ("--instances", self.instances, 1), ("--max-queue-delay-us", self.max_queue_delay_us, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ExportInputError(f"{flag}: expected an integer >= {low}, got {v!r}")

    def to_json(self) -> str:
        d = asdict(self)
        d["formats"] = list(self.formats)
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "ExportOptions":
        d = json.loads(text)
        if "max_batch_size" in d:
            # One source for each value: a second copy here could drift from the spec's.
            raise ExportInputError("export.json: holds max_batch_size, which lives in spec.json only; "
                                   "re-export the model")
        d["formats"] = tuple(d.get("formats", ()))
        return cls(**d)


def spec_json(spec: ModelSpec) -> str:
    return json.dumps(spec.to_dict(), sort_keys=True, separators=(",", ":"))


def _tensor(cls, name: str, dtype: int, dims, **kw):
    t = cls(name=name, data_type=dtype, **kw)
    t.dims.extend(int(d) for d in dims)
    return t


def _base(name: str, spec: ModelSpec, opts: ExportOptions, *, warmup_input: tuple | None) -> ModelConfig:
    mc = model_config_pb2()
    cfg = mc.ModelConfig(name=name, max_batch_size=spec.max_batch_size)
    cfg.version_policy.latest.num_versions = 1
    cfg.parameters[SPEC_PARAMETER].string_value = spec_json(spec)
    db = cfg.dynamic_batching
    db.max_queue_delay_microseconds = opts.max_queue_delay_us
    db.preferred_batch_size.extend(sorted({max(1, spec.max_batch_size // 2), spec.max_batch_size}))
    if warmup_input is not None:
        # Warm up at the largest batch so the first real request does not pay for allocation.
        tensor_name, dims = warmup_input
        w = cfg.model_warmup.add(name=f"zeros_batch_{spec.max_batch_size}", batch_size=spec.max_batch_size)
        wi = w.inputs[tensor_name]
        wi.data_type = mc.TYPE_UINT8
        wi.dims.extend(dims)
        wi.zero_data = True
    return cfg


def _instances(cfg: ModelConfig, kind: int, count: int) -> None:
    cfg.instance_group.add(kind=kind, count=count)


def _runtime(cfg: ModelConfig, flavour: str, opts: ExportOptions) -> None:
    """Backend, model file and instances of one flavour of an ONNX-derived model."""
    mc = model_config_pb2()
    if flavour == "python":
        cfg.backend = "python"
        cfg.parameters["onnx_file"].string_value = ONNX_FILE
        # One ONNX Runtime thread per worker; the backend chooses the workers from the serving machine's cores.
        cfg.parameters["intra_op_threads"].string_value = "1"
        cfg.parameters["workers"].string_value = "auto"
        _instances(cfg, mc.ModelInstanceGroup.KIND_CPU, opts.instances)
    elif flavour == "onnxruntime":
        cfg.platform = "onnxruntime_onnx"
        cfg.backend = "onnxruntime"
        cfg.default_model_filename = ONNX_FILE
        _instances(cfg, mc.ModelInstanceGroup.KIND_GPU, opts.instances)
        if opts.trt_accelerator:
            acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
            acc.parameters["precision_mode"] = "FP16" if opts.fp16 else "FP32"
            acc.parameters["max_workspace_size_bytes"] = str(1 << 30)
    elif flavour == "tensorrt":
        cfg.platform = "tensorrt_plan"
        cfg.backend = "tensorrt"
        cfg.default_model_filename = PLAN_FILE
        _instances(cfg, mc.ModelInstanceGroup.KIND_GPU, opts.instances)
    else:
        raise ExportInputError(f"--formats: invalid format {flavour!r}. Only {', '.join(FORMATS)} are supported.")


def classifier_config(spec: ModelSpec, opts: ExportOptions, flavour: str) -> ModelConfig:
    """uint8 [H, W, 3] -> probabilities [C] (with labels) and logits [C]; features [D] with a feature_layer."""
    mc = model_config_pb2()
    dims = [spec.input_height, spec.input_width, 3]
    cfg = _base(spec.name, spec, opts, warmup_input=(spec.input_name, dims))
    cfg.input.append(_tensor(mc.ModelInput, spec.input_name, mc.TYPE_UINT8, dims))
    _outputs(cfg, spec, logits=True)
    _runtime(cfg, flavour, opts)
    return cfg


def _outputs(cfg: ModelConfig, spec: ModelSpec, *, logits: bool) -> None:
    """The probabilities (with labels) and, with ``logits``, the logits of a model with classes; then the
    features [feature_size] of a model with a feature_layer."""
    mc = model_config_pb2()
    if not spec.features_only:
        cfg.output.append(_tensor(mc.ModelOutput, spec.output_name, mc.TYPE_FP32, [spec.num_classes],
                                  label_filename=LABELS_FILE))
        if logits:
            cfg.output.append(_tensor(mc.ModelOutput, spec.logits_name, mc.TYPE_FP32, [spec.num_classes]))
    if spec.has_features:
        cfg.output.append(_tensor(mc.ModelOutput, spec.features_name, mc.TYPE_FP32, [spec.feature_size]))


def tta_config(spec: ModelSpec, opts: ExportOptions, flavour: str) -> ModelConfig:
    """uint8 [source H, source W, 3] -> probabilities [C] (and features [D]) averaged over the TTA views."""
    mc = model_config_pb2()
    dims = [spec.source_height, spec.source_width, 3]
    cfg = _base(spec.tta_model_name, spec, opts, warmup_input=(spec.input_name, dims))
    cfg.parameters[TTA_PARAMETER].string_value = opts.tta_views
    cfg.input.append(_tensor(mc.ModelInput, spec.input_name, mc.TYPE_UINT8, dims))
    _outputs(cfg, spec, logits=False)
    _runtime(cfg, flavour, opts)
    return cfg


def preprocess_config(spec: ModelSpec, opts: ExportOptions, flavour: str) -> ModelConfig:
    """Encoded bytes uint8 [-1] (ragged) -> uint8 [H, W, 3]; ``python`` or ``dali`` backend."""
    mc = model_config_pb2()
    # No warm-up: zeros are not a decodable image and would fail the model load.
    cfg = _base(spec.preprocess_model_name, spec, opts, warmup_input=None)
    cfg.input.append(_tensor(mc.ModelInput, spec.encoded_name, mc.TYPE_UINT8, [-1], allow_ragged_batch=True))
    cfg.output.append(_tensor(mc.ModelOutput, spec.input_name, mc.TYPE_UINT8,
                              [spec.input_height, spec.input_width, 3]))
    if flavour == "python":
        cfg.backend = "python"
        cfg.parameters["dali_file"].string_value = DALI_FILE
        cfg.parameters["dali_threads"].string_value = "1"
        # Read from each image's header before DALI decodes it: a bomb fails its request, not the process.
        cfg.parameters[MAX_PIXELS_PARAMETER].string_value = str(DEFAULT_MAX_IMAGE_PIXELS)
    elif flavour == "dali":
        cfg.backend = "dali"
        cfg.default_model_filename = DALI_FILE
    else:
        raise ExportInputError(f"preprocess flavour: invalid {flavour!r}. Only python and dali are supported.")
    # The pipeline is CPU-only (portable): CPU instances in both backends.
    _instances(cfg, mc.ModelInstanceGroup.KIND_CPU, opts.instances)
    return cfg


def ensemble_config(spec: ModelSpec, opts: ExportOptions) -> ModelConfig:
    """Encoded bytes -> preprocess -> classifier, scheduled by Triton's ensemble scheduler."""
    mc = model_config_pb2()
    cfg = mc.ModelConfig(name=spec.ensemble_model_name, platform="ensemble", max_batch_size=spec.max_batch_size)
    cfg.version_policy.latest.num_versions = 1
    cfg.parameters[SPEC_PARAMETER].string_value = spec_json(spec)
    cfg.input.append(_tensor(mc.ModelInput, spec.encoded_name, mc.TYPE_UINT8, [-1]))
    _outputs(cfg, spec, logits=True)
    pre = cfg.ensemble_scheduling.step.add(model_name=spec.preprocess_model_name, model_version=-1)
    pre.input_map[spec.encoded_name] = spec.encoded_name
    pre.output_map[spec.input_name] = spec.input_name
    cls = cfg.ensemble_scheduling.step.add(model_name=spec.name, model_version=-1)
    cls.input_map[spec.input_name] = spec.input_name
    for out in cfg.output:
        cls.output_map[out.name] = out.name
    return cfg


def set_weights(cfg: ModelConfig, weights_sha256: str | None) -> ModelConfig:
    """Record which weights a model serves, so a client can read it from a live server."""
    if weights_sha256:
        cfg.parameters[WEIGHTS_PARAMETER].string_value = weights_sha256
    return cfg


def config_weights(cfg: ModelConfig) -> str | None:
    return cfg.parameters[WEIGHTS_PARAMETER].string_value if WEIGHTS_PARAMETER in cfg.parameters else None


def to_text(cfg: ModelConfig) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(cfg)


def parse_text(text: str, where: str | Path = "config") -> ModelConfig:
    """Parse pbtxt into a ModelConfig; ExportInputError names the file on a syntax error."""
    from google.protobuf import text_format

    mc = model_config_pb2()
    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as exc:
        raise ExportInputError(f"{where}: not a valid Triton ModelConfig ({exc})") from exc


def read_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ExportInputError(f"{path}: cannot read the model config ({exc.strerror})") from exc
    return parse_text(text, path)


def config_spec(cfg: ModelConfig) -> ModelSpec | None:
    """The spec stored in a config's parameters, or None when there is none."""
    if SPEC_PARAMETER not in cfg.parameters:
        return None
    return ModelSpec.from_json(cfg.parameters[SPEC_PARAMETER].string_value)
