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
        if self.num_classes == 1 or self.num_classes < 0:
            raise ModelConfigError(f"num_classes: a classifier needs at least two classes (0: a features-only "
                                   f"model without a head), got {self.num_classes}")
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
    A features-only model (``num_classes`` 0) has no head: only
    :meth:`logits_and_features` runs it.
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
        self.pool_size = config.pool_size
        feat = in_features * config.pool_size * config.pool_size
        self.head: nn.Module | None
        if config.num_classes == 0:
            self.head = None
        elif config.head == "linear":
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
        if self.head is None:
            raise ModelConfigError("a features-only model has no head: it gives features, not logits")
        return self.logits_and_features(images_nhwc_u8, None)[0]

    def logits_and_features(self, images_nhwc_u8: torch.Tensor,
                            feature_layer: str | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits (None without a head) and the global-average-pooled output of ``feature_layer`` ("layer4",
        "layer3"; None: no features), from one pass through the body."""
        x = self.normalize(images_nhwc_u8)
        if not self.channels_last:
            x = x.contiguous()
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        x = b.layer3(b.layer2(b.layer1(x)))
        features = x.mean(dim=(2, 3)) if feature_layer == "layer3" else None
        if self.head is None and feature_layer == "layer3":
            return None, features  # the last block is not needed
        x = b.layer4(x)
        pooled = torch.flatten(b.avgpool(x), 1)
        if feature_layer == "layer4":
            # The head's own input when it pools to 1 x 1: the same numbers, computed once.
            features = pooled if self.pool_size == 1 else x.mean(dim=(2, 3))
        return (self.head(pooled) if self.head is not None else None), features


class ServedModel(nn.Module):
    """What export traces: from uint8 NHWC images, probabilities and logits, then the features when
    ``feature_layer`` is given (a features-only model: the features alone), in :func:`served_outputs` order."""

    def __init__(self, classifier: Classifier, feature_layer: str | None = None):
        super().__init__()
        if classifier.head is None and feature_layer is None:
            raise ModelConfigError("a features-only model needs its feature_layer")
        self.classifier = classifier
        self.feature_layer = feature_layer

    def forward(self, images_nhwc_u8: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, features = self.classifier.logits_and_features(images_nhwc_u8, self.feature_layer)
        out: tuple[torch.Tensor, ...] = ()
        if logits is not None:
            logits = logits.float()
            out = (torch.softmax(logits, dim=1), logits)
        return out + ((features.float(),) if features is not None else ())


def served_outputs(spec: ModelSpec) -> list[str]:
    """The classifier graph's outputs in :class:`ServedModel`'s order: probabilities and logits (models with
    classes), then the features (models with a feature_layer)."""
    names = [] if spec.features_only else [spec.output_name, spec.logits_name]
    return names + ([spec.features_name] if spec.has_features else [])


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
