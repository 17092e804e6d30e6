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
    """uint8 NHWC at the spec's source size -> class probabilities averaged over the views."""

    def __init__(self, classifier: nn.Module, spec: ModelSpec, mode: str):
        super().__init__()
        if mode not in TTA_EXPORT_MODES:
            raise ValueError(f"Invalid TTA views {mode!r}. Only {', '.join(TTA_EXPORT_MODES)} are supported.")
        self.classifier = classifier
        self.mode = mode
        self.crop_hw = spec.input_hw
        self.boxes = tuple(view_boxes(mode, spec.source_hw, spec.input_hw))

    def forward(self, images_nhwc_u8: torch.Tensor) -> torch.Tensor:
        ch, cw = self.crop_hw
        # Cast first, so the uint8 input feeds only a Cast (TensorRT accepts uint8 nowhere
        # else); crops and flips of the float copy are the same integers.
        images = images_nhwc_u8.float()
        views = []
        for top, left, flip in self.boxes:
            crop = images[:, top:top + ch, left:left + cw, :]
            views.append(torch.flip(crop, dims=[2]) if flip else crop)
        # View-major stacking: one classifier call on N * V images.
        n = images.shape[0]
        logits = self.classifier(torch.cat(views, dim=0)).float()
        probs = torch.softmax(logits, dim=1)
        return probs.reshape(len(self.boxes), n, -1).mean(dim=0)
