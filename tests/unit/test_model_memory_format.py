"""--channels-last/--no-channels-last really changes the memory format the body sees."""

import torch

from training.model import ModelConfig, build_model


def _body_input_is_channels_last(model) -> bool:
    seen = {}

    def record(_module, args):  # returns None: a pre-hook's return value would replace the input
        seen["cl"] = args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous()

    hook = model.backbone.conv1.register_forward_pre_hook(record)
    model(torch.zeros((2, 32, 32, 3), dtype=torch.uint8))
    hook.remove()
    return seen["cl"]


def test_channels_last_model_feeds_channels_last_tensors(tiny_spec):
    model = build_model(tiny_spec, ModelConfig(num_classes=2)).eval()
    assert _body_input_is_channels_last(model)


def test_no_channels_last_feeds_contiguous_nchw(tiny_spec):
    model = build_model(tiny_spec, ModelConfig(num_classes=2)).eval()
    model.channels_last = False
    assert not _body_input_is_channels_last(model)


def test_normalisation_is_pinned_per_channel_in_rgb_order_with_an_asymmetric_mean():
    """Mean and std far apart per channel: a mean applied in BGR order, or one channel's std on another, moves the
    normalised values by whole units."""
    import torch

    from serving.core.spec import ModelSpec
    from training.model import Classifier, ModelConfig

    spec = ModelSpec(name="norm", class_names=("a", "b"), input_height=8, input_width=8, mean=(0.9, 0.5, 0.1),
                     std=(0.1, 0.2, 0.4))
    clf = Classifier(spec, ModelConfig(arch="resnet18", num_classes=2))
    rgb = torch.tensor([200, 100, 50], dtype=torch.uint8)
    x = rgb.view(1, 1, 1, 3).expand(2, 8, 8, 3).contiguous()
    got = clf.normalize(x)
    assert got.shape == (2, 3, 8, 8)
    want = [(200 / 255 - 0.9) / 0.1, (100 / 255 - 0.5) / 0.2, (50 / 255 - 0.1) / 0.4]
    for c in range(3):
        assert torch.allclose(got[:, c], torch.full((2, 8, 8), want[c]), atol=1e-5), (c, got[0, c, 0, 0].item())
