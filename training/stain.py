"""HED stain augmentation: jitter each image in haematoxylin-eosin-DAB optical density.

A second hospital's scanner and staining change how much of each stain a
pixel appears to hold. Following Tellez et al. (2018), each training image is
taken to optical density (Beer-Lambert), unmixed into H, E and DAB
concentrations with Ruifrok and Johnston's stain vectors (the matrix
scikit-image's ``rgb2hed`` uses), each concentration is scaled by
``alpha ~ U(1 - scale, 1 + scale)`` and shifted by ``beta ~ U(-shift, shift)``
(one draw per image and channel, from the pipeline's seed), and the result is
mixed back to RGB. Built from DALI arithmetic and ``fn.coord_transform``, so
the same graph runs on the CPU and the GPU. :func:`hed_jitter_numpy` is the
reference the DALI graph is tested against.
"""

from __future__ import annotations

import numpy as np

from training.errors import TrainingError

# Rows: optical density (R, G, B) per unit of haematoxylin, eosin, DAB.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29],
                         [0.07, 0.99, 0.11],
                         [0.27, 0.57, 0.78]], dtype=np.float64)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
# Intensities I in 0..255 map to OD = -ln((I + 1) / 256): 0 for white, finite for black.
_LIGHT = 256.0
DEFAULT_STAIN_SCALE = 0.4
DEFAULT_STAIN_SHIFT = 0.05


def check_stain_options(scale: float, shift: float) -> None:
    """Validate the jitter strengths; errors name the flag."""
    if not 0.0 <= scale < 1.0:
        raise TrainingError(f"--stain-scale: expected a concentration scale jitter in [0, 1), got {scale}")
    if not 0.0 <= shift <= 1.0:
        raise TrainingError(f"--stain-shift: expected a concentration shift jitter in [0, 1], got {shift}")


def hed_jitter_numpy(image_hwc_u8: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """Reference: the image with H, E, DAB concentrations ``c * alpha + beta`` (float32 math as DALI's)."""
    x = image_hwc_u8.astype(np.float32)
    od = -np.log((x + 1.0) / np.float32(_LIGHT))
    conc = od @ HED_FROM_RGB.astype(np.float32)
    conc = conc * np.asarray(alpha, np.float32) + np.asarray(beta, np.float32)
    od2 = conc @ RGB_FROM_HED.astype(np.float32)
    rgb = np.float32(_LIGHT) * np.exp(-od2) - 1.0
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def apply_hed(images, alpha_diag, beta):
    """DALI graph: uint8 HWC ``images`` with concentrations scaled by ``alpha_diag`` (3x3) and shifted by ``beta``."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    od = -dmath.log((fn.cast(images, dtype=types.FLOAT) + 1.0) / _LIGHT)
    # coord_transform computes M @ v per pixel: the row-vector products above, transposed.
    conc = fn.coord_transform(od, M=HED_FROM_RGB.T.astype(np.float32).ravel().tolist())
    conc = fn.coord_transform(conc, M=alpha_diag, T=beta)
    od2 = fn.coord_transform(conc, M=RGB_FROM_HED.T.astype(np.float32).ravel().tolist())
    rgb = dmath.clamp(_LIGHT * dmath.exp(-od2) - 1.0, 0.0, 255.0)
    return fn.cast(rgb, dtype=types.UINT8)


def hed_params(rng: np.random.Generator, scale: float, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """One image's jitter: diag(alpha) as a 3x3 float32 matrix and beta (3,), the ranges of :func:`hed_jitter`.

    The training pipeline draws these in Python from the epoch's seed
    (training/epoch_source.py), so an epoch's jitter does not depend on the epochs before it.
    """
    alpha = rng.uniform(1.0 - scale, 1.0 + scale, size=3) if scale > 0 else np.ones(3)
    beta = rng.uniform(-shift, shift, size=3) if shift > 0 else np.zeros(3)
    return np.diag(alpha).astype(np.float32), beta.astype(np.float32)


def hed_jitter(images, *, scale: float, shift: float):
    """DALI graph: random per-image HED jitter (seeded by the pipeline's seed)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    check_stain_options(scale, shift)
    eye = types.Constant(np.eye(3, dtype=np.float32))
    # A full 3x3 draw masked by the identity is the per-image diagonal matrix diag(alpha).
    alpha = fn.random.uniform(range=[1.0 - scale, 1.0 + scale], shape=[3, 3]) * eye if scale > 0 else eye
    beta = fn.random.uniform(range=[-shift, shift], shape=[3]) if shift > 0 else 0.0
    return apply_hed(images, alpha, beta)
