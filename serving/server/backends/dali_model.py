"""Triton Python-backend model: the serialized DALI preprocessing on the CPU.

Copied by ``patchserve export`` into ``REPO/NAME_preprocess/1/model.py`` beside
``model.dali``; the embedded server has no DALI backend, so this runs the very
same serialized pipeline with DALI's CPU operators (``device_id=None``).

Encoded bytes on the wire: input ``TYPE_UINT8`` with dims ``[-1]`` and
``allow_ragged_batch`` (the DALI backend's convention for encoded images), so
a request carries shape ``[1, nbytes]`` for one file. A request may carry
several files as ``[n, nbytes]`` when they are zero-padded to one length:
JPEG and PNG decoders stop at their end marker and ignore the padding. Each
request row is one image; the output is uint8 HWC at the classifier's input
size. A file that cannot be decoded fails only its own request. Each image's
header is read first (PIL, no pixels decoded): an image over the
``max_image_pixels`` parameter fails its request with that reason and is never
handed to DALI, so a decompression bomb cannot take the process down.
"""

import io
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.model_config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in self.model_config.get("parameters", {}).items()}
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        self.dali_path = os.path.join(version_dir, params.get("dali_file", "model.dali"))
        self.num_threads = max(1, int(params.get("dali_threads", "1") or 1))
        self.batch_size = max(1, int(self.model_config.get("max_batch_size", 1)))
        self.input_name = self.model_config["input"][0]["name"]
        self.output_name = self.model_config["output"][0]["name"]
        self.max_pixels = int(params.get("max_image_pixels", "0") or 0)  # 0: no limit
        self.pipe = self._build()

    def _build(self):
        from nvidia.dali import Pipeline

        pipe = Pipeline.deserialize(filename=self.dali_path, batch_size=self.batch_size,
                                    num_threads=self.num_threads, device_id=None, prefetch_queue_depth=1)
        pipe.build()
        return pipe

    def _run(self, rows):
        images = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            self.pipe.feed_input(self.input_name, chunk)
            (out,) = self.pipe.run()
            images += [np.array(out.at(i)) for i in range(len(chunk))]
        return images

    def _refusal(self, rows):
        """Why a request's images must not be decoded (too large, unreadable header), or None."""
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = None  # the limit below, with its own message, replaces PIL's
        for i, row in enumerate(rows):
            try:
                with Image.open(io.BytesIO(row.tobytes())) as img:
                    w, h = img.size
                    mode, fmt = img.mode, img.format
            except Exception as exc:  # noqa: BLE001 - PIL raises many types for a bad header
                return f"cannot decode the image bytes: image {i} has no header PIL can read ({type(exc).__name__})"
            if self.max_pixels and w * h > self.max_pixels:
                return (f"image {i}: image too large: {w}x{h} = {w * h} pixels is over the limit of "
                        f"{self.max_pixels} (max_image_pixels)")
            if fmt not in ("PNG", "JPEG") or mode not in ("RGB", "L"):
                # DALI would not apply patchserve's decode rule to alpha, palette, 16-bit or CMYK images.
                return f"image {i}: expected an RGB or grey PNG or JPEG, got a {mode} {fmt}"
        return None

    def execute(self, requests):
        per_request = []
        for request in requests:
            data = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
            data = data.reshape(1, -1) if data.ndim == 1 else data.reshape(data.shape[0], -1)
            per_request.append([np.ascontiguousarray(row, dtype=np.uint8) for row in data])
        refusals = [self._refusal(rows) for rows in per_request]
        if not any(refusals):
            try:
                flat = self._run([row for rows in per_request for row in rows])
                results, start = [], 0
                for rows in per_request:
                    results.append(np.stack(flat[start:start + len(rows)]))
                    start += len(rows)
                return [self._response(r) for r in results]
            except Exception:  # noqa: BLE001 - one bad file must not fail its neighbours: retry one by one
                self.pipe = self._build()
        responses = []
        for rows, why in zip(per_request, refusals):
            if why is not None:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(why)))
                continue
            try:
                responses.append(self._response(np.stack(self._run(rows))))
            except Exception as exc:  # noqa: BLE001 - report to this request, keep serving
                self.pipe = self._build()
                error = pb_utils.TritonError(f"cannot decode the image bytes: {_short(exc)}")
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
        return responses

    def _response(self, images):
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, images)])


def _short(exc):
    # DALI errors carry the pipeline's definition traceback; the first and last lines say what failed.
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return " ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else type(exc).__name__
