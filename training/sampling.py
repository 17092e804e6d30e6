"""Per-epoch sample order: shuffling, class balancing and equal shards.

The order depends only on (seed, epoch), so every rank computes the same list
and a resumed run replays an epoch exactly.
"""

from __future__ import annotations

import numpy as np


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """scikit-learn's 'balanced' weights: n / (k * count); absent classes get 0."""
    counts = class_counts(labels, num_classes).astype(np.float64)
    weights = np.zeros(num_classes)
    present = counts > 0
    weights[present] = len(labels) / (present.sum() * counts[present])
    return weights


def epoch_order(labels: np.ndarray, *, seed: int, epoch: int, batch_size: int, world_size: int = 1,
                balanced: bool = False, undersample: bool = False) -> np.ndarray:
    """Indices of the samples one epoch visits, for all ranks together.

    ``balanced`` draws with replacement, each class equally likely
    (oversampling the minority). ``undersample`` keeps, per class, as many
    samples as the smallest class has, drawn without replacement afresh each
    epoch, so over a run most majority images are seen. The list is cut to a multiple of
    ``world_size * batch_size`` (of ``world_size`` when smaller) so every rank
    runs the same number of steps; DDP hangs otherwise.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    rng = np.random.default_rng([int(seed), int(epoch)])
    if balanced and undersample:
        raise ValueError("balanced (oversampling) and undersample are exclusive")
    if undersample:
        present = [np.flatnonzero(labels == c) for c in np.unique(labels)]
        k = min(len(idx) for idx in present)
        kept = np.concatenate([rng.choice(idx, size=k, replace=False) for idx in present])
        order = rng.permutation(kept)
        n = len(order)
    elif balanced:
        counts = np.bincount(labels)
        p = 1.0 / counts[labels]
        order = rng.choice(n, size=n, replace=True, p=p / p.sum())
    else:
        order = rng.permutation(n)
    per_rank = n // world_size
    if per_rank % batch_size == 1 and per_rank > 1:
        per_rank -= 1
    return order[:per_rank * world_size]
