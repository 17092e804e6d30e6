"""Server-side multi-crop TTA as one graph: patches in, averaged probabilities out.

The crop boxes come from :func:`serving.core.views.view_boxes`, the same geometry
the client and evaluation use, and are baked into the graph as constant
slices, so the server and the client cannot disagree on a view.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from serving.core.spec import ModelSpec
from serving.core.views import view_boxes

TTA_EXPORT_MODES = ("five", "ten")


class TTAModel(nn.Module):
    """uint8 NHWC at the spec's source size -> class probabilities averaged over the views; with the spec's
    features, also the features averaged over the views (a features-only model: those alone), in
    :func:`tta_outputs` order."""

    def __init__(self, classifier: nn.Module, spec: ModelSpec, mode: str):
        super().__init__()
        if mode not in TTA_EXPORT_MODES:
            raise ValueError(f"Invalid TTA views {mode!r}. Only {', '.join(TTA_EXPORT_MODES)} are supported.")
        self.classifier = classifier
        self.mode = mode
        self.crop_hw = spec.input_hw
        self.boxes = tuple(view_boxes(mode, spec.source_hw, spec.input_hw))
        self.feature_layer = spec.feature_layer

    def forward(self, images_nhwc_u8: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        ch, cw = self.crop_hw
        # Cast first, so the uint8 input feeds only a Cast (TensorRT accepts uint8 nowhere
        # else); crops and flips of the float copy are the same integers.
        images = images_nhwc_u8.float()
        views = []
        for top, left, flip in self.boxes:
            crop = images[:, top:top + ch, left:left + cw, :]
            views.append(torch.flip(crop, dims=[2]) if flip else crop)
        # View-major stacking: one classifier call on N * V images.
        n, v = images.shape[0], len(self.boxes)
        logits, features = self.classifier.logits_and_features(torch.cat(views, dim=0), self.feature_layer)
        out: tuple[torch.Tensor, ...] = ()
        if logits is not None:
            out = (torch.softmax(logits.float(), dim=1).reshape(v, n, -1).mean(dim=0),)
        if features is not None:
            out += (features.float().reshape(v, n, -1).mean(dim=0),)
        # A model without features keeps its one output, as before.
        return out[0] if len(out) == 1 and features is None else out


def tta_outputs(spec: ModelSpec) -> list[str]:
    """The TTA graph's outputs in :class:`TTAModel`'s order: the averaged probabilities (models with classes),
    then the averaged features (models with a feature_layer)."""
    return ([] if spec.features_only else [spec.output_name]) + ([spec.features_name] if spec.has_features else [])
