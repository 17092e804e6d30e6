"""Client pieces that need no server: settings, spec checks, request planning, ordering."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from serving.client.batching import check_images, client_views, split_rows, windowed
from serving.client.batching import encode_batch
from serving.client.config import check_spec
from serving.client.model_info import ModelInfo
from serving.client.config import ClientConfig, check_tta, check_url
from serving.core.errors import BadInputError, InputError, SpecMismatchError


def test_client_config_names_the_bad_flag_and_the_choices():
    with pytest.raises(InputError, match="--protocol: invalid protocol 'tcp'. Only grpc and http are supported."):
        ClientConfig(protocol="tcp")
    with pytest.raises(InputError, match="--concurrency: expected a positive integer, got 0"):
        ClientConfig(concurrency=0)
    with pytest.raises(InputError, match="--batch-size: expected a positive integer, got -1"):
        ClientConfig(batch_size=-1)
    with pytest.raises(InputError, match="--tta: invalid TTA mode 'six'. Only none, flip, five, ten, server"):
        check_tta("six")


def test_url_must_be_host_and_port_and_a_scheme_is_dropped():
    assert check_url("http://127.0.0.1:8000/") == "127.0.0.1:8000"
    with pytest.raises(InputError, match="--url: expected HOST:PORT such as 127.0.0.1:8001, got 'localhost'"):
        check_url("localhost")


def test_spec_check_lists_every_disagreeing_field(tiny_spec):
    check_spec(tiny_spec, tiny_spec)  # the same spec passes
    with pytest.raises(SpecMismatchError, match=r"input_height: server has 32, expected 48; "
                                                r"class_names: server has \('normal', 'tumour'\), expected"):
        check_spec(tiny_spec, {"input_height": 48, "class_names": ["benign", "malignant"]})
    with pytest.raises(SpecMismatchError, match="unknown field 'colour'"):
        check_spec(tiny_spec, {"colour": 1})


def test_images_of_wrong_dtype_or_size_are_refused_before_sending(tiny_spec):
    with pytest.raises(BadInputError, match="expected dtype uint8"):
        check_images(np.zeros((2, 32, 32, 3), np.float32), tiny_spec)
    with pytest.raises(BadInputError, match=r"expected patches of 32x32 \(input size\) or 37x37 \(source size\), got 40x40"):
        check_images(np.zeros((2, 40, 40, 3), np.uint8), tiny_spec)
    with pytest.raises(BadInputError, match=r"expected shape \(N, H, W, 3\)"):
        check_images(np.zeros((2, 32, 32), np.uint8), tiny_spec)


def test_client_views_slice_the_corners_centre_and_mirrors(tiny_spec):
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (3, 37, 37, 3), dtype=np.uint8)
    views, v = client_views(src, tiny_spec, "ten")
    assert v == 10 and views.shape == (30, 32, 32, 3)
    # Patch 1, view 3 is the bottom-right corner; view 9 the mirrored centre (offset round(5/2) = 2).
    np.testing.assert_array_equal(views[13], src[1, 5:37, 5:37])
    np.testing.assert_array_equal(views[19], src[1, 2:34, 2:34][:, ::-1])
    same, v1 = client_views(src[:, :32, :32], tiny_spec, "none")
    assert v1 == 1 and same.shape == (3, 32, 32, 3)


def test_split_rows_covers_every_row_once():
    assert split_rows(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert split_rows(0, 4) == []


def test_windowed_keeps_order_and_bounds_the_requests_in_flight():
    in_flight = []
    peak = []

    def submit(i):
        in_flight.append(i)
        peak.append(len(in_flight))
        return i

    def collect(h):
        in_flight.remove(h)
        return h * 10

    out = list(windowed(range(20), submit, collect, max_in_flight=3))
    assert [r for _, r in out] == [i * 10 for i in range(20)]
    assert max(peak) == 3


def test_encoded_files_of_different_lengths_are_zero_padded_rows():
    info = ModelInfo("m_ensemble", "images_encoded", "UINT8", (-1,), "probabilities", 8, {})
    arr = encode_batch([b"\x01\x02\x03", b"\x04"], info)
    np.testing.assert_array_equal(arr, [[1, 2, 3], [4, 0, 0]])
    as_bytes = encode_batch([b"ab", b"c"], ModelInfo("m", "x", "BYTES", (1,), "p", 8, {}))
    assert as_bytes.shape == (2, 1) and as_bytes[1, 0] == b"c"


def test_client_score_and_slides_import_neither_torch_nor_dali():
    code = textwrap.dedent("""
        import sys
        import serving.client.patch_client, serving.jobs.engine, serving.jobs.dask_executor, serving.slides.tiling
        import serving.slides.heatmap, serving.jobs.output, serving.inputs.registry, serving.server.embedded
        import patchserve.commands.score, patchserve.commands.serve
        bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.') or m.startswith('nvidia.dali'))
        print(','.join(bad))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_a_features_only_model_is_refused_by_the_client_naming_the_model():
    from serving.client.identity import check_input
    from serving.client.model_info import ModelInfo
    from serving.core.errors import SpecMismatchError
    from serving.core.spec import ModelSpec

    spec = ModelSpec(name="feats", class_names=(), feature_layer="layer4", input_height=32, input_width=32,
                     mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    info = ModelInfo("feats", spec.input_name, "UINT8", (32, 32, 3), spec.features_name, 8, {})
    with pytest.raises(SpecMismatchError, match="--model feats: a features-only model .*layer4.* no probabilities"):
        check_input(info, spec)
    check_input(info, spec.replace(class_names=("a", "b")))  # the same model with classes is scored
