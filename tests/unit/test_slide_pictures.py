"""The tissue pictures of a slide: the mask at once, the outline drawn beside the scoring, errors raised to the
unit that waits for them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from serving.core.errors import InputError
from serving.core.spec import ModelSpec
from serving.inputs.registry import plan_inputs
from serving.jobs.config import ScoreConfig
from serving.jobs.scorer import UnitJob
from serving.jobs.slide_outputs import slide_output, start_tissue_mask


def _work(synth_slide, out):
    spec = ModelSpec(name="m", class_names=("a", "b"), input_height=48, input_width=48, mean=(0.5,) * 3,
                     std=(0.2,) * 3, arch="resnet18", max_batch_size=8)
    cfg = ScoreConfig(inputs=(str(synth_slide / "slides" / "slide_0.tiff"),), urls=("localhost:1",), model="m",
                      out=str(out), progress=False)
    (unit,) = plan_inputs(cfg.inputs, unit_patches=cfg.unit_patches).units
    return unit.open(UnitJob(cfg, spec, "", None, "b").read_options())


def test_the_mask_is_written_at_once_and_the_outline_by_the_time_the_wait_returns(synth_slide, tmp_path):
    out = tmp_path / "scores.parquet"
    work = _work(synth_slide, out)
    try:
        wait = start_tissue_mask(out, work)
        mask = slide_output(out, work.info["name"], "tissue_mask.png")
        assert mask.exists() and work.mask_path == str(mask)  # before the wait: a no-tissue error names it
        written = wait()
        outline = slide_output(out, work.info["name"], "tissue.png")
        assert written == [mask, outline] and outline.exists()
        # The heatmap is drawn over the same thumbnail: read once, kept on the slide's work.
        assert isinstance(work.picture, np.ndarray) and work.picture.shape[2] == 3
        assert Image.open(outline).size == (work.picture.shape[1], work.picture.shape[0])
    finally:
        work.close()


def test_an_outline_that_cannot_be_written_fails_the_wait_not_the_thread(synth_slide, tmp_path):
    out = tmp_path / "scores.parquet"
    work = _work(synth_slide, out)
    try:
        slide_output(out, work.info["name"], "tissue.png").mkdir()  # a folder where the outline goes
        wait = start_tissue_mask(out, work)
        with pytest.raises(InputError, match="cannot write its tissue outline"):
            wait()
        # A unit failing already waits without a second error in its place.
        assert start_tissue_mask(out, work)(False) == [slide_output(out, work.info["name"], "tissue_mask.png")]
    finally:
        work.close()
