"""The parity matrix's images: sizes, modes and EXIF orientations, written as real files.

Shared by tests/unit/test_preprocess.py and tests/integration/test_preprocess_parity.py.
The spec they are meant for has a 32 px input and a 37 px source size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from serving.synth.dataset import make_patch

# Stored pixels that PIL's exif_transpose turns back into the upright image.
_INVERSE = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
            7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}
SIZES = {"smaller": 20, "equal": 32, "source": 37, "larger": 50}


def upright_exif_image() -> np.ndarray:
    """A non-square tissue image (50 x 36): every orientation mistake changes it."""
    return make_patch(np.random.default_rng(11), 1, 50)[:, :36].copy()


def write_matrix(folder: Path) -> dict[str, Path]:
    """Write every case into class folders ``normal/`` and ``tumour/``; name -> path."""
    rng = np.random.default_rng(7)
    base = {k: make_patch(rng, i % 2, n) for i, (k, n) in enumerate(SIZES.items())}
    files: dict[str, Path] = {}

    def save(name: str, cls: str, img: Image.Image, **kw) -> None:
        path = folder / cls / name
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, **kw)
        files[name] = path

    for i, (k, img) in enumerate(base.items()):
        save(f"rgb_{k}.png", ("normal", "tumour")[i % 2], Image.fromarray(img))
    eq = base["equal"]
    save("rgb_equal.jpg", "tumour", Image.fromarray(eq), quality=95)
    save("rgb_larger.jpg", "normal", Image.fromarray(base["larger"]), quality=95)
    save("grey_equal.png", "normal", Image.fromarray(eq).convert("L"))
    rgba = np.dstack([eq, np.tile(np.linspace(0, 255, 32).astype(np.uint8), (32, 1))])
    save("rgba_equal.png", "tumour", Image.fromarray(rgba, mode="RGBA"))
    save("palette_equal.png", "normal", Image.fromarray(eq).quantize(64))
    grey16 = np.asarray(Image.fromarray(eq).convert("L"), np.uint16) * 257 + 100
    save("grey16_equal.png", "tumour", Image.fromarray(grey16))
    save("cmyk_equal.jpg", "normal", Image.fromarray(eq).convert("CMYK"), quality=95)
    upright = Image.fromarray(upright_exif_image())
    for o, inv in _INVERSE.items():
        stored = upright if inv is None else upright.transpose(inv)
        exif = Image.Exif()
        exif[0x0112] = o
        save(f"exif_{o}.jpg", ("normal", "tumour")[o % 2], stored, quality=98, subsampling=0,
             exif=exif.tobytes())
    return files
