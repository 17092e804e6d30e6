"""Which requests one group of patches becomes: model, array and views per patch, at most a batch each.

Pixels go to the classifier (client-side TTA views cut here) or, with
``tta="server"``, to the server-side TTA model; encoded bytes go to the
ensemble. Whole patches per request where they fit, so a patch's views
travel together and are averaged once they are back.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from serving.client.batching import all_at, check_images, client_views, encode_batch, split_rows
from serving.client.config import check_send, check_tta, info_tta_views
from serving.client.model_info import ModelInfo
from serving.core.errors import SpecMismatchError
from serving.core.spec import ModelSpec

Request = tuple[ModelInfo, np.ndarray, int]  # model, rows to send, views per patch


def plan_requests(images: np.ndarray | Sequence, spec: ModelSpec, tta: str, send: str, *,
                  classifier: ModelInfo, info_of: Callable[[str], ModelInfo],
                  rows_of: Callable[[ModelInfo], int]) -> list[Request]:
    """The requests for one group of prepared patches (serving/core/preprocess.py), or of encoded files.

    ``info_of(name)`` gives a served model's config, ``rows_of(info)`` the rows one request may carry.
    """
    check_send(send, tta)
    if send == "encoded":
        info = info_of(spec.ensemble_model_name)
        return [(info, encode_batch(images[sl], info), 1) for sl in split_rows(len(images), rows_of(info))]
    check_tta(tta)
    images = check_images(images, spec)
    if tta == "server":
        tta_info = info_of(spec.tta_model_name)
        if all_at(images, spec.source_hw):
            src = np.stack(images) if not isinstance(images, np.ndarray) else images
            return [(tta_info, src[sl], 1) for sl in split_rows(len(src), rows_of(tta_info))]
        # Input-size patches are never resized up: their views (every one the whole patch)
        # are cut here and sent to the classifier, which is what the TTA model would compute.
        tta = info_tta_views(tta_info)
    if tta not in spec.tta_views:
        raise SpecMismatchError(f"--tta {tta}: the model supports only {', '.join(spec.tta_views)}")
    views, v = client_views(images, spec, tta)
    rows = rows_of(classifier)
    per = max(1, rows // v) * v if v <= rows else rows
    return [(classifier, views[sl], v) for sl in split_rows(len(views), per)]
