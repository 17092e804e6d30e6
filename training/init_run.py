"""``init-run``: a run folder from a local torchvision state dict, without training.

Most slide-level work starts from ImageNet weights and needs their features,
not a classifier trained here. This writes what ``train`` would (a checkpoint
with its spec and model config, ``spec.json``), so ``export`` and
``check-export --run`` take it like any run. Without ``--classes`` the model
is features-only (no head); with them it gets a linear head of random weights
(``--seed``), a starting point, not a classifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from serving.core.options import option
from serving.core.spec import ARCHITECTURES, FEATURE_LAYERS, IMAGENET_MEAN, IMAGENET_STD, ModelSpec
from training.errors import TrainingError


@dataclass(frozen=True)
class InitRunConfig:
    """The options of ``patchserve init-run``."""

    out: str = option(help="run folder to write", positional=True, metavar="RUN")
    pretrained: str = option(help="local torchvision ResNet state-dict file (e.g. ImageNet weights); its fc is "
                                  "dropped", metavar="FILE")
    arch: str = option("resnet50", "torchvision architecture of FILE", choices=ARCHITECTURES)
    features: str = option("layer4", "the features the exported model outputs: the global average pool of the "
                                     "last block (layer4) or of the third (layer3)", choices=FEATURE_LAYERS)
    classes: tuple[str, ...] = option((), "class names, e.g. normal,tumour: adds a linear head of random weights "
                                          "(train it to use it)", default_text="none: a features-only model")
    image_size: int = option(224, "model input height and width in pixels")
    mean: tuple[float, float, float] = option(IMAGENET_MEAN, "per-channel mean R,G,B in [0,1] the weights were "
                                                             "trained with (recorded in the spec)")
    std: tuple[float, float, float] = option(IMAGENET_STD, "per-channel std R,G,B in [0,1] the weights were "
                                                           "trained with (recorded in the spec)")
    mpp: float | None = option(None, "microns per pixel the model is to see (slides are scored at it)",
                               default_text="unknown")
    data: str | None = option(None, "patches for export's fixture images (recorded in the run)", metavar="DIR",
                              default_text="none: export uses synthetic tissue images")
    name: str | None = option(None, "model name", default_text="the run folder's name")
    max_batch_size: int = option(64, "the served model's max batch size (recorded in the spec)")
    seed: int = option(0, "seed of the random head (with --classes)")
    overwrite: bool = option(False, "replace a run folder that already holds a checkpoint")

    def __post_init__(self) -> None:
        if self.classes and len(self.classes) < 2:
            raise TrainingError(f"--classes: a classifier needs at least two classes, got {list(self.classes)}; "
                                "leave it out for a features-only model")
        if self.image_size < 1:
            raise TrainingError(f"--image-size: expected a positive integer, got {self.image_size}")
        if self.data is not None and not Path(self.data).exists():
            raise TrainingError(f"--data: no such file or folder {self.data}")


def init_run(cfg: InitRunConfig) -> Path:
    """Write the run folder of ``cfg`` and return it."""
    import torch  # here: building the command line must not import torch

    from training.checkpoint import BEST, LAST, save_checkpoint
    from training.data import safe_model_name
    from training.model import ModelConfig, build_model, load_pretrained_backbone

    out = Path(cfg.out)
    if not cfg.overwrite and any((out / f).exists() for f in (BEST, LAST)):
        raise TrainingError(f"RUN {out}: already holds a checkpoint; pass --overwrite to replace it")
    spec = ModelSpec(name=cfg.name or safe_model_name(out.resolve().name), class_names=tuple(cfg.classes),
                     input_height=cfg.image_size, input_width=cfg.image_size, mean=tuple(cfg.mean),
                     std=tuple(cfg.std), arch=cfg.arch, max_batch_size=cfg.max_batch_size, trained_mpp=cfg.mpp,
                     feature_layer=cfg.features)
    config = ModelConfig(arch=cfg.arch, num_classes=len(cfg.classes))
    torch.manual_seed(cfg.seed)
    model = build_model(spec, config)
    load_pretrained_backbone(model, cfg.pretrained)
    out.mkdir(parents=True, exist_ok=True)
    record = {"pretrained": str(Path(cfg.pretrained).resolve()), "epochs": 0, "seed": cfg.seed,
              "data": str(Path(cfg.data).resolve()) if cfg.data else None}
    save_checkpoint(out / LAST, model=model.eval(), spec=spec, model_config=config, train_config=record)
    (out / BEST).unlink(missing_ok=True)  # an overwritten run's best epoch is not this model
    spec.save(out / "spec.json")
    return out
