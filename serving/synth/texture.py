"""Synthetic H&E-like tissue textures (the generator behind ``patchserve synth``).

Tissue is painted as haematoxylin and eosin concentrations and turned into RGB
through the Beer-Lambert law, so stain jitter and a second centre's stain are
changes of stain vectors, as in real scans. Textures are defined over global
pixel coordinates (:class:`Texture`), so a patch and a whole slide are windows
of the same generator. Geometry scales with the patch size: a patch of any
size shows the same field of view as one of ``REFERENCE_SIZE`` pixels.
numpy/PIL/h5py only: no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from serving.inputs.datasets import PCAM_CLASSES

REFERENCE_SIZE = 64  # the default patch size: nucleus radii below are in its pixels
# Kather-like colorectal tissue classes, the first six as in the users' data.
COLORECTAL_CLASSES = ("tumour", "stroma", "complex", "lympho", "debris", "mucosa", "adipose", "mucus")
# Optical density per unit concentration (R, G, B); after Ruifrok and Johnston,
# eosin tuned towards the pink of scanned H&E.
HAEMATOXYLIN = np.array([0.65, 0.70, 0.29], dtype=np.float32)
EOSIN = np.array([0.10, 0.85, 0.35], dtype=np.float32)
# The second centre stains with much more haematoxylin (about 1.6x its optical
# density, bluer) and less eosin: a change of how much of each stain a pixel
# seems to hold, as between hospitals. Normal tissue then looks as dark as
# tumour to a model that learnt colour, so accuracy on test_shifted drops.
SHIFTED_HAEMATOXYLIN = np.array([1.05, 1.05, 0.45], dtype=np.float32)
SHIFTED_EOSIN = np.array([0.06, 0.70, 0.25], dtype=np.float32)
SHIFT_HUE_DEG = 0.0


def class_names_for(n: int) -> tuple[str, ...]:
    """Class names of an ``n``-class synthetic set (2 -> normal, tumour)."""
    if n == 2:
        return PCAM_CLASSES
    if not 3 <= n <= len(COLORECTAL_CLASSES):
        raise ValueError(f"--classes: expected 2..{len(COLORECTAL_CLASSES)}, got {n}")
    return COLORECTAL_CLASSES[:n]


@dataclass(frozen=True)
class Look:
    """How one tissue class looks. Counts are per reference patch, sizes in its pixels."""

    eosin: float = 0.55
    haem: float = 0.05
    fibre: float = 0.22
    fibre_period: float = 7.0
    patchiness: float = 0.15
    nuclei: tuple[float, float] = (4.0, 13.0)  # count range per patch
    radius: tuple[float, float] = (2.3, 3.0)
    elongation: float = 0.15
    irregular: float = 0.03
    darkness: tuple[float, float] = (1.3, 1.7)
    rim: float = 0.3
    spindle: bool = False  # nuclei aligned with the fibres
    lymphocytes: tuple[float, float] = (0.0, 0.0)
    fragments: tuple[float, float] = (0.0, 0.0)
    vacuoles: tuple[float, float] = (0.0, 0.0)
    glands: tuple[float, float] = (0.0, 0.0)
    mucus: float = 0.0


NORMAL = Look()
TUMOUR = Look(eosin=0.45, haem=0.16, fibre=0.1, nuclei=(10.0, 26.0), radius=(2.8, 4.6), elongation=0.45,
              irregular=0.22, darkness=(1.8, 2.6), rim=0.45)
LOOKS = {
    "normal": NORMAL,
    "tumour": TUMOUR,
    "stroma": Look(eosin=0.7, fibre=0.7, fibre_period=5.0, nuclei=(2.0, 6.0), radius=(2.0, 2.6),
                   elongation=1.6, spindle=True),
    "complex": Look(eosin=0.6, fibre=0.4, patchiness=0.3, nuclei=(5.0, 10.0), radius=(2.4, 3.4),
                    irregular=0.15, lymphocytes=(5.0, 12.0), vacuoles=(0.0, 2.0)),
    "lympho": Look(eosin=0.35, fibre=0.05, nuclei=(0.0, 3.0), lymphocytes=(45.0, 70.0)),
    "debris": Look(eosin=0.75, fibre=0.05, patchiness=0.3, nuclei=(0.0, 2.0), fragments=(20.0, 40.0)),
    "mucosa": Look(eosin=0.5, fibre=0.1, nuclei=(0.0, 2.0), glands=(1.0, 2.0)),
    "adipose": Look(eosin=0.5, fibre=0.0, nuclei=(0.0, 1.0), vacuoles=(12.0, 18.0)),
    "mucus": Look(eosin=0.12, haem=0.1, fibre=0.25, fibre_period=11.0, patchiness=0.5, nuclei=(0.0, 1.5),
                  mucus=0.35),
}


def looks_for(n: int) -> tuple[Look, ...]:
    return tuple(LOOKS[c] for c in class_names_for(n))


def blend(a: Look, b: Look, t: float) -> Look:
    """The look a fraction ``t`` of the way from ``a`` to ``b`` (numbers and ranges interpolated)."""
    def mix(x, y):
        if isinstance(x, bool):
            return x if t < 0.5 else y
        if isinstance(x, tuple):
            return tuple(mix(u, v) for u, v in zip(x, y))
        return (1.0 - t) * x + t * y

    return Look(**{f: mix(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__})


# How far a patch's look strays towards another class: t ~ overlap * Beta(2, 5).
# With overlap 1 about one patch in nine lies past the midpoint and looks more
# like the other class (Bayes accuracy about 0.89 for two classes), so a model
# cannot reach 1.0 however long it trains.
OVERLAP_BETA = (2.0, 5.0)


def patch_look(rng: np.random.Generator, class_index: int, num_classes: int, overlap: float) -> Look:
    """The look of one patch: its class's, blended towards a random other class by ``overlap``."""
    looks = looks_for(num_classes)
    if overlap <= 0:
        return looks[class_index]  # no draws: the patches of overlap 0 are those of earlier versions
    other = int(rng.integers(num_classes - 1))
    other += other >= class_index
    t = overlap * float(rng.beta(*OVERLAP_BETA))
    return blend(looks[class_index], looks[other], t)


def _grid(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    return rng.uniform(-1.0, 1.0, (int(height / cell) + 3, int(width / cell) + 3)).astype(np.float32)


def _interp(grid: np.ndarray, cell: float, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Smooth value noise at global pixels [y0, y0+h) x [x0, x0+w)."""
    def axis(start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        t = (start + np.arange(n, dtype=np.float32)) / cell
        i = np.floor(t).astype(np.int64)
        f = t - i
        return i, f * f * (3.0 - 2.0 * f)  # smoothstep: no visible grid lines

    iy, fy = axis(y0, h)
    ix, fx = axis(x0, w)
    # Separable: interpolate the few grid rows along x first, then along y.
    lo = int(iy[0])
    rows = grid[lo:int(iy[-1]) + 2]
    along_x = rows[:, ix] * (1 - fx) + rows[:, ix + 1] * fx
    fy = fy[:, None]
    return along_x[iy - lo] * (1 - fy) + along_x[iy - lo + 1] * fy


# Blob table columns: centre y, x, semi-axes a, b, angle, irregularity, two
# phases, darkness, rim darkening. One row per nucleus, fragment or vacuole.
def _blobs(rng: np.random.Generator, n: int, height: int, width: int, radius: tuple[float, float],
           elongation: float, irregular: float, darkness: tuple[float, float], rim: float,
           angle: float | None = None, margin: float = 0.0) -> np.ndarray:
    t = np.empty((n, 10), dtype=np.float32)
    t[:, 0] = rng.uniform(-margin, height + margin, n)
    t[:, 1] = rng.uniform(-margin, width + margin, n)
    r = rng.uniform(*radius, n)
    stretch = 1.0 + rng.uniform(0, elongation, n)
    t[:, 2] = r * np.sqrt(stretch)
    t[:, 3] = r / np.sqrt(stretch)
    t[:, 4] = rng.uniform(0, math.pi, n) if angle is None else angle + rng.normal(0, 0.15, n)
    t[:, 5] = irregular * rng.uniform(0.5, 1.0, n)
    t[:, 6:8] = rng.uniform(0, 2 * math.pi, (n, 2))
    t[:, 8] = rng.uniform(*darkness, n)
    t[:, 9] = rim
    return t


def _paint_blobs(canvas: np.ndarray, blobs: np.ndarray, y0: int, x0: int) -> None:
    """Max-composite blobs onto ``canvas`` (window at global y0, x0), all at once."""
    h, w = canvas.shape
    if len(blobs) == 0:
        return
    cy, cx = blobs[:, 0] - y0, blobs[:, 1] - x0
    half = int(math.ceil(float(blobs[:, 2].max()) * (1 + float(blobs[:, 5].max())))) + 2
    keep = (cy > -half) & (cy < h + half) & (cx > -half) & (cx < w + half)
    b, cy, cx = blobs[keep], cy[keep], cx[keep]
    if len(b) == 0:
        return
    off = np.arange(-half, half + 1)
    py = np.floor(cy)[:, None, None] + off[None, :, None]
    px = np.floor(cx)[:, None, None] + off[None, None, :]
    dy, dx = py - cy[:, None, None], px - cx[:, None, None]
    c, s = np.cos(b[:, 4])[:, None, None], np.sin(b[:, 4])[:, None, None]
    u, v = dy * c + dx * s, dx * c - dy * s
    a, bb = b[:, 2, None, None], b[:, 3, None, None]
    ang = np.arctan2(v, u)
    irr = b[:, 5, None, None]
    wobble = 1.0 + irr * (np.cos(2 * ang + b[:, 6, None, None]) + 0.6 * np.cos(3 * ang + b[:, 7, None, None]))
    d = np.sqrt((u / a) ** 2 + (v / bb) ** 2) / wobble
    edge = np.clip((1.0 - d) * bb * 1.5, 0.0, 1.0)  # about one pixel of anti-aliasing
    rim = b[:, 9, None, None] * np.clip((d - 0.55) / 0.45, 0.0, 1.0) ** 2
    val = (b[:, 8, None, None] * (1.0 - b[:, 9, None, None] + rim) * edge).astype(np.float32)
    inside = (py >= 0) & (py < h) & (px >= 0) & (px < w) & (val > 0)
    idx = (py.astype(np.int64) * w + px.astype(np.int64))
    np.maximum.at(canvas.reshape(-1), idx[inside], val[inside])


class Texture:
    """One tissue class instantiated over a ``height`` x ``width`` region, rendered by windows."""

    def __init__(self, rng: np.random.Generator, look: Look, height: int, width: int, scale: float,
                 typical: bool = False) -> None:
        """``typical``: use the middle of each count range (a whole slide) instead of a random draw (a patch)."""
        self.look, self.scale = look, scale
        # Blobs centred just outside the region still reach into it; counts cover that margin
        # too, so a patch and a slide have the same density.
        m = 4.0 * scale
        area = (height + 2 * m) * (width + 2 * m) / (REFERENCE_SIZE * scale) ** 2  # in reference patches
        self.theta = float(rng.uniform(0, math.pi))
        self.coarse = _grid(rng, height, width, 18 * scale)
        self.fine = _grid(rng, height, width, 5 * scale)
        self.warp = _grid(rng, height, width, 24 * scale)

        def count(rangeval: tuple[float, float]) -> int:
            mean = (rangeval[0] + rangeval[1]) / 2 if typical else rng.uniform(*rangeval)
            return int(rng.poisson(mean * area)) if rangeval[1] > 0 else 0

        sc = lambda r: (r[0] * scale, r[1] * scale)  # noqa: E731
        L = look
        haem = _blobs(rng, count(L.nuclei), height, width, sc(L.radius), L.elongation, L.irregular,
                      L.darkness, L.rim, angle=-self.theta if L.spindle else None, margin=m)
        lymph = _blobs(rng, count(L.lymphocytes), height, width, sc((1.4, 2.0)), 0.1, 0.05, (2.2, 2.8), 0.1, margin=m)
        frag = _blobs(rng, count(L.fragments), height, width, sc((0.8, 2.4)), 0.8, 0.45, (0.3, 1.5), 0.0, margin=m)
        self.eosin_blobs = _blobs(rng, count(L.fragments) // 2, height, width, sc((1.5, 4.0)), 0.8, 0.4,
                                  (0.4, 0.9), 0.0, margin=m)
        self.white = np.concatenate([
            _blobs(rng, count(L.vacuoles), height, width, sc((8.0, 14.0)), 0.5, 0.12, (1.0, 1.0), 0.0, margin=m),
            _blobs(rng, count(L.glands), height, width, sc((7.0, 11.0)), 0.6, 0.05, (0.9, 1.0), 0.0, margin=m),
        ])
        self.haem_blobs = np.concatenate([haem, lymph, frag, self._gland_rings(rng, L)])

    def _gland_rings(self, rng: np.random.Generator, look: Look) -> np.ndarray:
        """Regular round nuclei lining each gland lumen."""
        if look.glands[1] <= 0 or len(self.white) == 0:
            return np.empty((0, 10), dtype=np.float32)
        rows = []
        for cy, cx, a, b, phi in self.white[:, :5]:
            n = max(6, int(2 * math.pi * (a + b) / 2 / (5.0 * self.scale)))
            t = np.linspace(0, 2 * math.pi, n, endpoint=False) + rng.uniform(0, 1)
            ring = _blobs(rng, n, 1, 1, (2.4 * self.scale, 2.9 * self.scale), 0.6, 0.03, (1.1, 1.4), 0.3)
            u, v = (a + 3.0 * self.scale) * np.cos(t), (b + 3.0 * self.scale) * np.sin(t)
            ring[:, 0] = cy + u * np.cos(phi) - v * np.sin(phi)
            ring[:, 1] = cx + u * np.sin(phi) + v * np.cos(phi)
            ring[:, 4] = t + phi  # long axis along the radius: columnar epithelium
            rows.append(ring)
        return np.concatenate(rows)

    def render(self, y0: int, x0: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Haematoxylin, eosin and mucus concentrations of a window (float32 h x w)."""
        L, s = self.look, self.scale
        coarse = _interp(self.coarse, 18 * s, y0, x0, h, w)
        fine = _interp(self.fine, 5 * s, y0, x0, h, w)
        warp = _interp(self.warp, 24 * s, y0, x0, h, w)
        yy = (y0 + np.arange(h, dtype=np.float32))[:, None]
        xx = (x0 + np.arange(w, dtype=np.float32))[None, :]
        phase = (xx * math.cos(self.theta) + yy * math.sin(self.theta)) * (2 * math.pi / (L.fibre_period * s))
        # Fibres: warped stripes, in bundles that fade in and out.
        fibres = (0.5 + 0.5 * np.cos(phase + 4.0 * warp)) ** 3 * (0.65 + 0.35 * coarse)
        eosin = L.eosin * (1 + 0.2 * coarse + L.patchiness * fine) * (1 - L.fibre * 0.6 + L.fibre * 1.2 * fibres)
        haem = L.haem * (1 + 0.4 * fine) + np.zeros_like(eosin)
        mucus = L.mucus * (1 + 0.5 * coarse + 0.4 * fine) * (0.6 + 0.6 * fibres) if L.mucus else None
        extra_eosin = np.zeros_like(eosin)
        _paint_blobs(extra_eosin, self.eosin_blobs, y0, x0)
        eosin += extra_eosin
        white = np.zeros_like(eosin)
        _paint_blobs(white, self.white, y0, x0)
        nuc = np.zeros_like(eosin)
        _paint_blobs(nuc, self.haem_blobs, y0, x0)
        clear = 1.0 - np.clip(white, 0.0, 1.0)
        # Nuclei push eosin aside; vacuoles and lumens are empty (white).
        eosin = eosin * clear * (1 - 0.5 * np.clip(nuc, 0, 1))
        haem = (haem * clear + nuc * (1 + 0.15 * fine)).astype(np.float32)
        if mucus is None:
            mucus = np.zeros_like(eosin)
        return haem, eosin.astype(np.float32), (mucus * clear).astype(np.float32)


MUCUS = np.array([0.45, 0.25, 0.08], dtype=np.float32)  # pale blue-grey


@dataclass(frozen=True)
class Stain:
    """Stain vectors, concentration scale, brightness, hue rotation, noise of one scan."""

    haem: tuple[float, float, float] = tuple(HAEMATOXYLIN.tolist())
    eosin: tuple[float, float, float] = tuple(EOSIN.tolist())
    strength: float = 1.0
    brightness: float = 1.0
    hue_deg: float = 0.0
    noise: float = 3.0

    @classmethod
    def jittered(cls, rng: np.random.Generator, shift: float = 0.0) -> "Stain":
        """A per-image stain: random jitter around the (optionally shifted) centre stain."""
        h = HAEMATOXYLIN + shift * (SHIFTED_HAEMATOXYLIN - HAEMATOXYLIN)
        e = EOSIN + shift * (SHIFTED_EOSIN - EOSIN)
        h = np.clip(h * rng.uniform(0.9, 1.1, 3), 0.01, None)
        e = np.clip(e * rng.uniform(0.9, 1.1, 3), 0.01, None)
        return cls(tuple(h.tolist()), tuple(e.tolist()), strength=float(rng.uniform(0.85, 1.15)) * (1 + 0.1 * shift),
                   brightness=float(rng.uniform(0.95, 1.03)), hue_deg=float(rng.normal(0, 3)) + SHIFT_HUE_DEG * shift,
                   noise=float(rng.uniform(2.0, 5.0)))


def _hue_matrix(deg: float) -> np.ndarray:
    """RGB -> RGB rotation of hue about the grey axis (keeps luminance roughly)."""
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    k = 1.0 / 3.0
    sq = math.sqrt(k)
    return np.array([
        [c + (1 - c) * k, k * (1 - c) - sq * s, k * (1 - c) + sq * s],
        [k * (1 - c) + sq * s, c + k * (1 - c), k * (1 - c) - sq * s],
        [k * (1 - c) - sq * s, k * (1 - c) + sq * s, c + k * (1 - c)],
    ], dtype=np.float32)


def to_rgb(haem: np.ndarray, eosin: np.ndarray, mucus: np.ndarray, stain: Stain,
           rng: np.random.Generator) -> np.ndarray:
    """Beer-Lambert: concentrations to uint8 RGB under ``stain``, plus sensor noise."""
    od = (haem[..., None] * np.asarray(stain.haem, np.float32) + eosin[..., None] * np.asarray(stain.eosin, np.float32)
          + mucus[..., None] * MUCUS) * stain.strength
    rgb = np.exp(-od) * (250.0 * stain.brightness)
    if stain.hue_deg:
        rgb = rgb @ _hue_matrix(stain.hue_deg).T
    if stain.noise:
        rgb += rng.standard_normal(rgb.shape, dtype=np.float32) * np.float32(stain.noise)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def make_patch(rng: np.random.Generator, class_index: int, size: int, stain_shift: float = 0.0,
               num_classes: int = 2, overlap: float = 0.0) -> np.ndarray:
    """One ``size`` x ``size`` uint8 RGB patch of class ``class_index``.

    ``stain_shift`` 0 is the training centre, 1 the second centre. The same
    ``rng`` state gives the same tissue under any stain (draws do not depend on it).
    ``overlap`` > 0 blends the class's look towards another class's (:func:`patch_look`).
    """
    look = patch_look(rng, class_index, num_classes, overlap)
    tex = Texture(rng, look, size, size, size / REFERENCE_SIZE)
    stain = Stain.jittered(rng, stain_shift)
    return to_rgb(*tex.render(0, 0, size, size), stain, rng)
