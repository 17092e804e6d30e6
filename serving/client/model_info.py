"""What the client reads from a server about one model: tensors, batching, config parameters."""

from __future__ import annotations

from dataclasses import dataclass

from serving.core.errors import SpecMismatchError


@dataclass(frozen=True)
class ModelInfo:
    """What the server says about one model: tensors and batching."""

    name: str
    input_name: str
    datatype: str  # Triton wire type: "UINT8", "BYTES"
    dims: tuple[int, ...]  # without the batch dimension
    output_name: str
    max_batch_size: int
    parameters: dict
    outputs: tuple[str, ...] = ()  # every output the config lists (the probabilities, the features...)


def grpc_channel_args(lib) -> list[tuple[str, int]]:
    """tritonclient's defaults, with gRPC's reconnect backoff capped: its default
    grows to two minutes, so a restarted server would go unnoticed that long."""
    return [("grpc.max_send_message_length", lib.MAX_GRPC_MESSAGE_SIZE),
            ("grpc.max_receive_message_length", lib.MAX_GRPC_MESSAGE_SIZE),
            ("grpc.initial_reconnect_backoff_ms", 250), ("grpc.min_reconnect_backoff_ms", 250),
            ("grpc.max_reconnect_backoff_ms", 2000)]


def parse_config(name: str, config: dict, output_name: str | None) -> ModelInfo:
    config = config.get("config", config)  # gRPC wraps it, HTTP does not
    inputs = config.get("input", [])
    outputs = [o["name"] for o in config.get("output", [])]
    if len(inputs) != 1:
        raise SpecMismatchError(f"model {name!r}: expected one input tensor, the server lists {len(inputs)}")
    out = output_name if output_name in outputs else (outputs[0] if outputs else None)
    if out is None:
        raise SpecMismatchError(f"model {name!r}: the server lists no output tensor")
    params = {k: (v.get("string_value", "") if isinstance(v, dict) else str(v))
              for k, v in config.get("parameters", {}).items()}
    inp = inputs[0]
    return ModelInfo(name, inp["name"], inp.get("data_type", "").removeprefix("TYPE_").replace("STRING", "BYTES"),
                     tuple(int(d) for d in inp.get("dims", [])), out, int(config.get("max_batch_size", 0)), params,
                     tuple(outputs))
