"""Triton Python-backend model: ONNX Runtime on the CPU (the ``python`` flavour).

Copied by ``patchserve export`` into ``REPO/NAME/1/model.py``. It imports only
numpy, onnxruntime and Triton's own utilities, so it runs inside the embedded
server without patchserve installed. The ONNX file and thread count come from
the model config's parameters.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        self.model_config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in self.model_config.get("parameters", {}).items()}
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        onnx_path = os.path.join(version_dir, params.get("onnx_file", "model.onnx"))
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "0") or 0)
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        self.input_names = [i["name"] for i in self.model_config["input"]]
        self.output_names = [o["name"] for o in self.model_config["output"]]
        onnx_inputs = {i.name for i in self.session.get_inputs()}
        onnx_outputs = {o.name for o in self.session.get_outputs()}
        missing = [n for n in self.input_names if n not in onnx_inputs] + \
                  [n for n in self.output_names if n not in onnx_outputs]
        if missing:
            raise pb_utils.TritonModelException(
                f"{onnx_path}: tensors {missing} of config.pbtxt are not in the ONNX graph "
                f"(inputs {sorted(onnx_inputs)}, outputs {sorted(onnx_outputs)})")

    def execute(self, requests):
        # The dynamic batcher hands over several requests: run them as one batch.
        arrays = {name: [] for name in self.input_names}
        sizes = []
        for request in requests:
            for name in self.input_names:
                arrays[name].append(pb_utils.get_input_tensor_by_name(request, name).as_numpy())
            sizes.append(arrays[self.input_names[0]][-1].shape[0])
        try:
            feeds = {name: np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
                     for name, parts in arrays.items()}
            results = self.session.run(self.output_names, feeds)
        except Exception as exc:  # noqa: BLE001 - report to every request, keep serving
            error = pb_utils.TritonError(f"onnxruntime failed: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses = []
        start = 0
        for size in sizes:
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(out[start:start + size]))
                       for name, out in zip(self.output_names, results)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses
