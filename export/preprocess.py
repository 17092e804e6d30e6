"""The reference preprocessing (serving/core/preprocess.py) as a serialized DALI pipeline.

encoded JPEG/PNG bytes -> decode to RGB (EXIF orientation applied) -> grey-scale
equalisation for models trained with it -> the spec's evaluation geometry
(an input-size image kept, any other size resized to the source size) -> the
"none" view of :func:`serving.core.views.view_boxes` -> uint8 HWC, exactly what the
classifier takes. The pipeline is CPU-only so the same
``model.dali`` runs in the DALI backend of a GPU server and, through
``serving/server/backends/dali_model.py``, inside the embedded server's Python
backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from export.errors import ExportError
from serving.core.spec import ModelSpec


def build_pipeline(spec: ModelSpec, batch_size: int, num_threads: int = 1):
    """The preprocessing pipeline for ``spec`` (not built), CPU-only."""
    from nvidia.dali import fn, pipeline_def, types

    from training.pipeline import eval_geometry, grey_equalize

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=None, prefetch_queue_depth=1)
    def preprocess():
        encoded = fn.external_source(name=spec.encoded_name, dtype=types.UINT8, ndim=1, device="cpu")
        images = fn.decoders.image(encoded, device="cpu", output_type=types.RGB)
        if spec.grayscale_equalize:
            images = grey_equalize(images)
        return eval_geometry(images, spec.input_hw, spec.source_hw, crop=True, geometry=spec.eval_geometry)

    return preprocess()


def serialize_pipeline(spec: ModelSpec, path: str | Path, batch_size: int) -> Path:
    """Write ``model.dali``; its batch size is the model's maximum batch size."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = build_pipeline(spec, batch_size).serialize()
    except Exception as exc:  # noqa: BLE001 - DALI raises RuntimeError for most failures
        raise ExportError(f"{path}: cannot serialize the DALI preprocessing pipeline: {exc}") from exc
    from serving.core.atomic import atomic_write_bytes

    return atomic_write_bytes(path, data)


def run_serialized(path: str | Path, encoded: Sequence[bytes | np.ndarray], *, input_name: str,
                   batch_size: int) -> list[np.ndarray]:
    """Run a ``model.dali`` on the CPU over encoded images (for parity checks and tests)."""
    from nvidia.dali import Pipeline

    pipe = Pipeline.deserialize(filename=str(path), batch_size=batch_size, num_threads=1, device_id=None,
                                prefetch_queue_depth=1)
    pipe.build()
    out: list[np.ndarray] = []
    for start in range(0, len(encoded), batch_size):
        chunk = [np.frombuffer(e, dtype=np.uint8) if isinstance(e, (bytes, bytearray)) else e
                 for e in encoded[start:start + batch_size]]
        pipe.feed_input(input_name, chunk)
        (images,) = pipe.run()
        out += [np.array(images.at(i)) for i in range(len(chunk))]
    return out
