"""DALI on the GPU: mixed (nvJPEG) decoding and GPU augmentation feed CUDA tensors (skipped without CUDA)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def jpeg_samples(synth_data, tmp_path_factory):
    """The val split re-encoded as JPEG (what nvJPEG decodes on the GPU), with labels."""
    from PIL import Image

    from serving.inputs.datasets import Sample, discover

    out = tmp_path_factory.mktemp("jpeg")
    samples = []
    for i, s in enumerate(discover(synth_data, split="val").samples):
        path = out / f"{i:03d}.jpg"
        # 4:4:4 (no chroma subsampling): nvJPEG and libjpeg-turbo then differ only by IDCT rounding.
        Image.open(s.source).convert("RGB").save(path, quality=95, subsampling=0)
        samples.append(Sample(str(path), s.label))
    return samples


def test_mixed_jpeg_decoding_on_the_gpu_matches_cpu_decoding_within_four_levels(jpeg_samples):
    from serving.core.spec import ModelSpec
    from training.pipeline import build_eval_pipeline, iterate

    spec = ModelSpec(name="g", class_names=("a", "b"), input_height=48, input_width=48, mean=(0.5,) * 3,
                     std=(0.25,) * 3)
    out = {}
    for dev in ("cpu", "gpu"):
        pipe = build_eval_pipeline(jpeg_samples, spec=spec, batch_size=16, num_threads=1, device=dev, device_id=0)
        (x, y), = list(iterate(pipe, jpeg_samples))
        assert x.is_cuda == (dev == "gpu") and x.dtype.__str__() == "torch.uint8"
        out[dev] = (x.cpu().numpy().astype(int), y.cpu().numpy())
    # nvJPEG and libjpeg-turbo round the IDCT differently: a level or two, rarely more.
    diff = np.abs(out["cpu"][0] - out["gpu"][0])
    assert diff.max() <= 4 and diff.mean() <= 0.5
    assert out["cpu"][1].tolist() == out["gpu"][1].tolist() == [s.label for s in jpeg_samples]


def test_gpu_augmentation_yields_uint8_nhwc_cuda_batches_that_differ_between_seeds(jpeg_samples):
    from training.pipeline import AugmentConfig, build_train_pipeline, iterate

    augment = AugmentConfig(hflip_prob=0.5, vflip_prob=0.5, rotation_deg=20.0, brightness=0.2, saturation=0.2,
                            hue=0.05, scale_min=0.5)
    batches = []
    for seed in (1, 2):
        pipe = build_train_pipeline(jpeg_samples, input_hw=(32, 32), augment=augment, batch_size=8, num_threads=1,
                                    seed=seed, device="gpu", device_id=0)
        x, y = next(iter(iterate(pipe, jpeg_samples)))
        assert x.is_cuda and tuple(x.shape) == (8, 32, 32, 3) and str(x.dtype) == "torch.uint8"
        batches.append(x.cpu().numpy())
    assert not np.array_equal(batches[0], batches[1])


def test_gpu_augmentation_without_random_ops_equals_the_cpu_pipeline_within_four_levels(jpeg_samples):
    from training.pipeline import AugmentConfig, build_train_pipeline, iterate

    none = AugmentConfig(hflip_prob=0.0, vflip_prob=0.0, scale_min=1.0)
    out = {}
    for dev in ("cpu", "gpu"):
        pipe = build_train_pipeline(jpeg_samples, input_hw=(32, 32), augment=none, batch_size=16, num_threads=1,
                                    seed=0, device=dev, device_id=0)
        x, _ = next(iter(iterate(pipe, jpeg_samples)))
        out[dev] = x.cpu().numpy().astype(int)
    diff = np.abs(out["cpu"] - out["gpu"])  # decode and antialiased-resize rounding on each device
    assert diff.max() <= 4 and diff.mean() <= 0.5
