"""Stain normalisation inside the model: Macenko and Reinhard, per patch, in torch operations ONNX exports.

The model's first step (training/model.py): every path that feeds the model
pixels (training after augmentation, evaluate, every client, a plain Triton
client) gets normalised patches without a line of its own. The target's
parameters live in the spec (``stain_normalization``); they are buffers here,
initializers in the exported graph, and the gate holds the three together.

- Macenko (Macenko et al., ISBI 2009, as torchstain's numpy normaliser does
  it: Io 240, alpha 1, beta 0.15): optical density; the pixels with every
  channel's OD above beta; the plane of the two largest eigenvectors of their
  covariance (power iteration, fixed steps: no ``eigh`` in ONNX); the
  alpha-th and (100 - alpha)-th percentile angles (a sort and a gather); the
  stain vectors, haematoxylin first; least-squares concentrations (a closed
  2 x 2 inverse); the 99th percentile concentration of each stain scaled to
  the target's; the image rebuilt with the target's stain vectors.
- Reinhard (as torchstain's): CIE L*a*b* (sRGB, D65), each channel's mean and
  std made the target's.

A patch with under ``MIN_TISSUE`` of its pixels stained (white background,
most of a slide's edge), a single stain (``SINGLE_STAIN_RATIO``) or a
singular unmixing, passes through unchanged (Reinhard: too few stained pixels
or no variance); no patch gives NaN.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

METHODS = ("macenko", "reinhard")
IO, ALPHA, BETA = 240.0, 1.0, 0.15
MIN_TISSUE = 0.01  # share of a patch's pixels that must be stained for it to be normalised
MIN_TISSUE_PIXELS = 16  # and at least this many
# A second eigenvalue of the stained pixels' OD covariance under this share of the first: one stain only
# (uint8 rounding leaves about 1e-4; real H&E tiles of the SVS 0.037 and more, synthetic patches 0.005).
SINGLE_STAIN_RATIO = 1e-3
MIN_LAB_STD = 0.05  # Reinhard: a channel flatter than this (one colour, float noise aside) passes through
TARGET_MIN_TISSUE = 0.05  # share of a target's pixels that must be stained
POWER_STEPS = 40
_EPS = 1e-6
_RGB2XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
_WHITE = (0.95047, 1.0, 1.08883)
_XYZ2RGB = tuple(tuple(float(v) for v in row) for row in np.linalg.inv(np.array(_RGB2XYZ)))  # a constant


def _percentile(sorted_values: torch.Tensor, count: torch.Tensor, q: float) -> torch.Tensor:
    """numpy's linear percentile of the first ``count`` values of each row of ``sorted_values`` (N x P)."""
    pos = q / 100.0 * (count.to(sorted_values.dtype) - 1.0).clamp(min=0.0)
    lo = torch.floor(pos)
    hi = torch.minimum(lo + 1.0, (count - 1).clamp(min=0).to(lo.dtype))
    frac = (pos - lo).unsqueeze(1)
    a = torch.gather(sorted_values, 1, lo.long().unsqueeze(1))
    b = torch.gather(sorted_values, 1, hi.long().unsqueeze(1))
    return (a + (b - a) * frac).squeeze(1)


def _quantile(values: torch.Tensor, mask: torch.Tensor | None, q: float) -> torch.Tensor:
    """numpy's linear ``q``-th percentile of each row's masked values (N x P): from the tail's ``topk`` alone
    (q within 1% of 0 or 100), not a sort of every pixel."""
    p = values.shape[1]
    tail = min(p, int(math.floor(min(q, 100.0 - q) / 100.0 * (p - 1))) + 2)
    count = mask.sum(dim=1) if mask is not None else torch.full(values.shape[:1], p, dtype=torch.int64,
                                                                device=values.device)
    low = q < 50.0
    if mask is not None:
        values = torch.where(mask, values, torch.full_like(values, 1e9 if low else -1e9))
    ordered = torch.topk(values, tail, dim=1, largest=not low, sorted=True).values
    # In the tail's order the percentile sits (q or 100 - q)% of the way in: linear between two neighbours.
    return _percentile(ordered, count, q if low else 100.0 - q)


def _top_eigenvector(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest eigenvalue's unit eigenvector of symmetric N x 3 x 3 matrices, and the eigenvalue."""
    v = torch.ones(cov.shape[0], 3, 1, dtype=cov.dtype, device=cov.device)
    for _ in range(POWER_STEPS):
        v = cov @ v
        v = v / v.norm(dim=1, keepdim=True).clamp(min=1e-12)
    value = (v.transpose(1, 2) @ cov @ v).squeeze(2).squeeze(1)
    return v.squeeze(2), value


def macenko_parameters(od: torch.Tensor, tissue: torch.Tensor):
    """Stain vectors (N x 3 x 2, haematoxylin first) and the validity of each row, from optical densities
    ``od`` (N x 3 x P) and the stained pixels ``tissue`` (N x P)."""
    w = tissue.to(od.dtype).unsqueeze(1)  # N x 1 x P
    count = tissue.sum(dim=1)
    n = count.to(od.dtype).clamp(min=2.0)
    mean = (od * w).sum(dim=2, keepdim=True) / n.view(-1, 1, 1)
    centred = (od - mean) * w
    cov = centred @ centred.transpose(1, 2) / (n.view(-1, 1, 1) - 1.0)
    v1, l1 = _top_eigenvector(cov)
    # The stained pixels' mean OD is positive: point the first eigenvector that way, so their angles sit
    # around 0 rather than around +-pi, where atan2 wraps.
    v1 = torch.where(((v1 * mean.squeeze(2)).sum(dim=1, keepdim=True) < 0), -v1, v1)
    deflated = cov - l1.view(-1, 1, 1) * (v1.unsqueeze(2) @ v1.unsqueeze(1))
    v2, l2 = _top_eigenvector(deflated)
    # Orthogonal to v1 whatever the iteration left (Gram-Schmidt once).
    v2 = v2 - (v2 * v1).sum(dim=1, keepdim=True) * v1
    v2 = v2 / v2.norm(dim=1, keepdim=True).clamp(min=1e-12)
    t1 = (od * v1.unsqueeze(2)).sum(dim=1)  # N x P
    t2 = (od * v2.unsqueeze(2)).sum(dim=1)
    phi = torch.atan2(t2, t1)
    lo = _quantile(phi, tissue, ALPHA)
    hi = _quantile(phi, tissue, 100.0 - ALPHA)
    v_min = v1 * torch.cos(lo).unsqueeze(1) + v2 * torch.sin(lo).unsqueeze(1)
    v_max = v1 * torch.cos(hi).unsqueeze(1) + v2 * torch.sin(hi).unsqueeze(1)
    h_first = (v_min[:, 0] > v_max[:, 0]).unsqueeze(1)
    h = torch.where(h_first, v_min, v_max)
    e = torch.where(h_first, v_max, v_min)
    stains = torch.stack([h, e], dim=2)  # N x 3 x 2
    valid = (count.to(od.dtype) >= MIN_TISSUE * od.shape[2]) & (count >= MIN_TISSUE_PIXELS) & \
        (l2 > SINGLE_STAIN_RATIO * l1.clamp(min=1e-12)) & (l1 > 1e-8)
    return stains, valid


def concentrations(od: torch.Tensor, stains: torch.Tensor):
    """Least-squares concentrations (N x 2 x P) of ``od`` (N x 3 x P) in ``stains`` (N x 3 x 2), and where the
    unmixing is not singular."""
    g = stains.transpose(1, 2) @ stains  # N x 2 x 2
    a, b, c, d = g[:, 0, 0], g[:, 0, 1], g[:, 1, 0], g[:, 1, 1]
    det = a * d - b * c
    ok = det.abs() > 1e-6
    safe = torch.where(ok, det, torch.ones_like(det))
    inv = torch.stack([torch.stack([d, -b], dim=1), torch.stack([-c, a], dim=1)], dim=1) / safe.view(-1, 1, 1)
    return inv @ (stains.transpose(1, 2) @ od), ok


class StainNormalizer(nn.Module):
    """Float RGB in [0, 255] (N x 3 x H x W) -> the same, stain-normalised to the spec's target."""

    def __init__(self, params: dict):
        super().__init__()
        self.method = params["method"]
        # Buffers from the spec's fields: constants of the exported graph, where the gate finds them
        # (export/check_agree.stain_problems).
        if self.method == "macenko":
            self.register_buffer("stain_matrix", torch.tensor(params["stain_matrix"], dtype=torch.float32))  # 2 x 3
            self.register_buffer("max_concentrations", torch.tensor(params["max_concentrations"], dtype=torch.float32))
        elif self.method == "reinhard":
            self.register_buffer("lab_mean", torch.tensor(params["lab_mean"], dtype=torch.float32))
            self.register_buffer("lab_std", torch.tensor(params["lab_std"], dtype=torch.float32))
        else:  # pragma: no cover - the spec validates the method
            raise ValueError(f"unknown stain normalisation {self.method!r}")

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        n, _, h, w = rgb.shape
        # Float32 whatever autocast says: logarithms, eigenvectors and percentiles in bf16 or fp16 drift.
        with torch.autocast(device_type=rgb.device.type, enabled=False):
            flat = rgb.float().reshape(n, 3, h * w)
            out = self._macenko(flat) if self.method == "macenko" else self._reinhard(flat)
        return out.reshape(n, 3, h, w).to(rgb.dtype)

    def _macenko(self, flat: torch.Tensor) -> torch.Tensor:
        od = -torch.log((flat + 1.0) / IO)
        tissue = (od >= BETA).all(dim=1)
        stains, valid = macenko_parameters(od, tissue)
        conc, ok = concentrations(od, stains)
        max_c = _quantile(conc.reshape(-1, conc.shape[2]), None, 99.0).reshape(-1, 2)
        ok = ok & valid & (max_c > _EPS).all(dim=1)
        scale = self.max_concentrations.view(1, 2) / torch.where(max_c > _EPS, max_c, torch.ones_like(max_c))
        rebuilt = IO * torch.exp(-(self.stain_matrix.t().unsqueeze(0) @ (conc * scale.unsqueeze(2))))
        rebuilt = rebuilt.clamp(0.0, 255.0)
        good = ok.view(-1, 1, 1) & torch.isfinite(rebuilt).all(dim=2, keepdim=True).all(dim=1, keepdim=True)
        return torch.where(good, rebuilt, flat)

    def _reinhard(self, flat: torch.Tensor) -> torch.Tensor:
        lab = rgb_to_lab(flat / 255.0)
        mean = lab.mean(dim=2, keepdim=True)
        std = lab.std(dim=2, keepdim=True, unbiased=False)
        normed = (lab - mean) / std.clamp(min=_EPS) * self.lab_std.view(1, 3, 1) + self.lab_mean.view(1, 3, 1)
        rgb = lab_to_rgb(normed) * 255.0
        od = -torch.log((flat + 1.0) / IO)
        stained = (od >= BETA).all(dim=1).to(flat.dtype).sum(dim=1)
        enough = (stained >= MIN_TISSUE * flat.shape[2]) & (stained >= MIN_TISSUE_PIXELS) & (std > MIN_LAB_STD).all(dim=1) \
            .view(-1)
        good = enough.view(-1, 1, 1) & torch.isfinite(rgb).all(dim=2, keepdim=True).all(dim=1, keepdim=True)
        return torch.where(good, rgb, flat)


def _matrix(rows, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(rows, dtype=like.dtype, device=like.device)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] (N x 3 x P) -> CIE L*a*b* (D65): L in [0, 100], a and b about 0 (torchstain's figures)."""
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055).clamp(min=0.0) ** 2.4, rgb / 12.92)
    xyz = _matrix(_RGB2XYZ, rgb) @ linear
    xyz = xyz / _matrix(_WHITE, rgb).view(1, 3, 1)
    f = torch.where(xyz > 0.008856, xyz.clamp(min=1e-12) ** (1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    x, y, z = f[:, 0], f[:, 1], f[:, 2]
    return torch.stack([116.0 * y - 16.0, 500.0 * (x - y), 200.0 * (y - z)], dim=1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`rgb_to_lab`, clipped to [0, 1]."""
    l_, a, b = lab[:, 0], lab[:, 1], lab[:, 2]
    y = (l_ + 16.0) / 116.0
    x = a / 500.0 + y
    z = y - b / 200.0
    f = torch.stack([x, y, z], dim=1)
    xyz = torch.where(f > 0.2068966, f ** 3, (f - 16.0 / 116.0) / 7.787) * _matrix(_WHITE, lab).view(1, 3, 1)
    rgb = _matrix(_XYZ2RGB, lab) @ xyz
    srgb = torch.where(rgb > 0.0031308, 1.055 * rgb.clamp(min=1e-12) ** (1.0 / 2.4) - 0.055, rgb * 12.92)
    return srgb.clamp(0.0, 1.0)


def fit_target(images_u8, method: str) -> dict:
    """The target's parameters from uint8 RGB images (H x W x 3 each), pooled as one image, by the method's own
    rule: Macenko's stain vectors and 99th percentile concentrations, Reinhard's LAB means and stds."""
    pixels = np.concatenate([np.asarray(im, np.float32).reshape(-1, 3) for im in images_u8])
    share = float((-np.log((pixels + 1.0) / IO) >= BETA).all(axis=1).mean())
    if share < TARGET_MIN_TISSUE:
        raise ValueError(f"the target holds too little stained tissue: {share:.1%} of its pixels, "
                         f"{TARGET_MIN_TISSUE:.0%} needed")
    flat = torch.from_numpy(pixels.T.copy()).unsqueeze(0)  # 1 x 3 x P
    with torch.no_grad():
        if method == "reinhard":
            lab = rgb_to_lab(flat / 255.0)
            return {"method": "reinhard", "lab_mean": [round(float(v), 6) for v in lab.mean(dim=2)[0]],
                    "lab_std": [round(float(v), 6) for v in lab.std(dim=2, unbiased=False)[0]]}
        od = -torch.log((flat.double() + 1.0) / IO)
        tissue = (od >= BETA).all(dim=1)
        stains, valid = macenko_parameters(od, tissue)
        conc, ok = concentrations(od, stains)
        max_c = _quantile(conc.reshape(2, -1), None, 99.0)
    if not bool(valid[0]) or not bool(ok[0]) or not math.isfinite(float(max_c.min())) or float(max_c.min()) <= 0:
        raise ValueError("the target holds one stain only: Macenko's two stain vectors cannot be fitted to it")
    return {"method": "macenko", "stain_matrix": [[round(float(v), 6) for v in stains[0, :, k]] for k in range(2)],
            "max_concentrations": [round(float(v), 6) for v in max_c]}
