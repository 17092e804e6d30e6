"""Model factory: the spec's normalisation layer, a torchvision ResNet, a head.

The model takes ``uint8`` NHWC images: permuting NHWC to NCHW gives a
channels-last view for free, so the float conversion and normalisation are the
first layer and the only normalisation implementation (DESIGN.md). The cast
comes first: TensorRT takes uint8 only into a Cast, so in the exported graph
the uint8 input must feed nothing else (check-export verifies it). Training,
export and serving all run this module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

from serving.core.spec import ARCHITECTURES, HEADS, POOL_SIZES, ModelSpec
from training.errors import ModelConfigError



@dataclass(frozen=True)
class ModelConfig:
    """How to rebuild the network; stored in every checkpoint (nanoGPT style)."""

    arch: str = "resnet18"
    num_classes: int = 2
    head: str = "linear"  # "linear" or "mlp"
    hidden: tuple[int, ...] = (256, 100)
    dropout: float = 0.4
    pool_size: int = 1

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ModelConfigError(f"--arch: invalid architecture {self.arch!r}. Only {', '.join(ARCHITECTURES)} are supported.")
        if self.head not in HEADS:
            raise ModelConfigError(f"--head: invalid head {self.head!r}. Only linear and mlp are supported.")
        if self.pool_size not in POOL_SIZES:
            raise ModelConfigError(f"--pool-size: {self.pool_size} is not one of {POOL_SIZES}")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelConfigError(f"--dropout: expected a value in [0, 1), got {self.dropout}")
        if self.num_classes < 2:
            raise ModelConfigError(f"num_classes: a classifier needs at least two classes, got {self.num_classes}")
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if self.head == "mlp" and (not self.hidden or min(self.hidden) <= 0):
            raise ModelConfigError(f"--hidden: expected positive layer sizes for the mlp head, got {self.hidden}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**{**d, "hidden": tuple(d.get("hidden", ()))})


class Normalize(nn.Module):
    """uint8 NHWC -> float NCHW (channels-last memory), stain-normalised when the spec says so, then normalised
    by the spec's mean/std."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], stain: dict | None = None):
        super().__init__()
        from training.stain_norm import StainNormalizer

        self.stain = StainNormalizer(stain) if stain else None
        mean_t = torch.tensor(mean, dtype=torch.float32) * 255.0
        std_t = torch.tensor(std, dtype=torch.float32) * 255.0
        self.register_buffer("mean", mean_t.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("inv_std", (1.0 / std_t).view(1, 3, 1, 1), persistent=False)

    def forward(self, images_nhwc_u8: torch.Tensor) -> torch.Tensor:
        # Cast before the permute: the uint8 input feeds only a Cast in the ONNX graph.
        x = images_nhwc_u8.float().permute(0, 3, 1, 2)
        if self.stain is not None:
            x = self.stain(x)
        return (x - self.mean) * self.inv_std


class Classifier(nn.Module):
    """Normalize -> ResNet body -> adaptive pool -> head; returns logits.

    ``channels_last`` (a plain attribute, not saved) says whether the body
    receives the normaliser's channels-last tensor as it is, or a contiguous
    NCHW copy: the permute of NHWC input is channels-last already, so without
    the copy --no-channels-last would not change the memory format at all.
    """

    def __init__(self, spec: ModelSpec, config: ModelConfig):
        super().__init__()
        self.channels_last = True
        self.normalize = Normalize(spec.mean, spec.std, spec.stain_normalization)
        backbone = getattr(torchvision.models, config.arch)(weights=None)
        in_features = backbone.fc.in_features
        backbone.avgpool = nn.AdaptiveAvgPool2d(config.pool_size)
        backbone.fc = nn.Identity()
        self.backbone = backbone
        feat = in_features * config.pool_size * config.pool_size
        if config.head == "linear":
            self.head = nn.Linear(feat, config.num_classes)
        else:
            layers: list[nn.Module] = []
            prev = feat
            for h in config.hidden:
                layers += [nn.Linear(prev, h), nn.ReLU(inplace=True), nn.Dropout(config.dropout)]
                prev = h
            layers.append(nn.Linear(prev, config.num_classes))
            self.head = nn.Sequential(*layers)

    def forward(self, images_nhwc_u8: torch.Tensor) -> torch.Tensor:
        x = self.normalize(images_nhwc_u8)
        if not self.channels_last:
            x = x.contiguous()
        return self.head(self.backbone(x))


class ServedModel(nn.Module):
    """What export traces: probabilities and logits from uint8 NHWC images."""

    def __init__(self, classifier: Classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, images_nhwc_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.classifier(images_nhwc_u8).float()
        return torch.softmax(logits, dim=1), logits


def build_model(spec: ModelSpec, config: ModelConfig) -> Classifier:
    if config.arch != spec.arch:
        raise ModelConfigError(f"--arch {config.arch} disagrees with the spec's arch {spec.arch}")
    if config.num_classes != spec.num_classes:
        raise ModelConfigError(f"model has {config.num_classes} outputs but the spec names {spec.num_classes} classes")
    return Classifier(spec, config)


def load_pretrained_backbone(model: Classifier, path: str | Path) -> list[str]:
    """Load a torchvision ResNet state dict from a local file into the body.

    Returns the keys that were not loaded (the original ``fc``). Shapes that do
    not fit raise ModelConfigError naming the file and the first bad key.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelConfigError(f"--pretrained: no such file {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        raise ModelConfigError(f"--pretrained: {path} is not a loadable state dict ({exc})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelConfigError(f"--pretrained: {path} holds a {type(state).__name__}, expected a state dict")
    own = model.backbone.state_dict()
    body = {k: v for k, v in state.items() if not k.startswith("fc.")}
    for k, v in body.items():
        if k not in own:
            raise ModelConfigError(f"--pretrained: {path}: key {k!r} is not in a {type(model.backbone).__name__} body; is it the right --arch?")
        if tuple(own[k].shape) != tuple(v.shape):
            raise ModelConfigError(
                f"--pretrained: {path}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}; is it the right --arch?")
    missing = [k for k in own if k not in body]
    if missing:
        raise ModelConfigError(f"--pretrained: {path} lacks {len(missing)} weights of the body, e.g. {missing[0]!r}")
    model.backbone.load_state_dict(body, strict=True)
    return [k for k in state if k.startswith("fc.")]
