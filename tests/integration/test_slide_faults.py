"""Slides that go wrong: a corrupt tile, no tissue, a target resolution the pyramid cannot serve."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from patchserve.cli import main as cli
from serving.jobs.output import read_results


def _score(server, *args) -> int:
    return cli(["score", *map(str, args), "--url", server.grpc, "--model", server.spec.name, "--no-progress"])


def _errors(path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))[1:]


@pytest.fixture(scope="module")
def corrupt_slide(tmp_path_factory):
    """A synthetic slide whose level-0 TIFF tile in the middle of the tissue holds garbage bytes."""
    import tifffile

    from serving.synth.slide import TILE, write_slide

    folder = tmp_path_factory.mktemp("corrupt_slide")
    written = write_slide(folder, slide_size=1024, name="damaged")
    tissue = np.asarray(Image.open(written.tissue_mask)) > 0
    with tifffile.TiffFile(written.slide) as tif:
        page = tif.pages[0]
        across = -(-page.imagewidth // TILE)
        offsets, counts = page.dataoffsets, page.databytecounts
    # The tile with the most tissue: its patches are surely planned.
    ds = written.mask_downsample
    best = max(range(len(offsets)), key=lambda k: tissue[(k // across) * TILE // ds:((k // across) + 1) * TILE // ds,
                                                          (k % across) * TILE // ds:((k % across) + 1) * TILE // ds].sum())
    with open(written.slide, "r+b") as fh:
        fh.seek(offsets[best])
        fh.write(np.random.default_rng(0).integers(0, 256, counts[best], dtype=np.uint8).tobytes())
    tx, ty = (best % across) * TILE, (best // across) * TILE
    return written.slide, (tx, ty, tx + TILE, ty + TILE)


def test_a_corrupt_tile_is_recorded_the_slide_reopened_and_every_other_tile_scored(triton_server, corrupt_slide,
                                                                                   tmp_path, capsys):
    from serving.slides.tiling import TilingConfig, plan_tiles

    slide, (x0, y0, x1, y1) = corrupt_slide
    spec = triton_server.spec
    out = tmp_path / "results.parquet"
    assert _score(triton_server, slide, "--out", out) == 0
    grid = plan_tiles(slide, spec.input_hw, TilingConfig())
    inside = {(t.x, t.y) for t in grid.tiles if x0 <= t.x < x1 and y0 <= t.y < y1}
    assert inside and len(inside) < len(grid.tiles)
    rows = read_results(out)
    # OpenSlide's error state is sticky per handle: without reopening, every later tile failed too.
    assert {(r["x"], r["y"]) for r in rows} == {(t.x, t.y) for t in grid.tiles} - inside
    errors = _errors(tmp_path / "results.parquet.errors.csv")
    assert len(errors) == len(inside)
    assert all(e[0] == str(slide) and "tile (" in e[1] for e in errors)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"{len(inside)} inputs recorded as errors, listed in {tmp_path / 'results.parquet.errors.csv'}"
    mask = np.asarray(Image.open(tmp_path / "results.damaged.tissue_mask.png"))
    assert mask.shape == grid.mask.shape and ((mask > 0) == grid.mask).all()


def test_a_slide_without_tissue_is_reported_and_its_mask_written(triton_server, tmp_path, capsys):
    from serving.synth.slide import write_pyramid_tiff

    blank = tmp_path / "blank.tiff"
    write_pyramid_tiff(blank, [np.full((512, 512, 3), 240, np.uint8), np.full((128, 128, 3), 240, np.uint8)], 0.5)
    out = tmp_path / "results.csv"
    assert _score(triton_server, blank, "--out", out) == 0
    assert read_results(out) == []
    mask_png = tmp_path / "results.blank.tissue_mask.png"
    (source, reason), = _errors(tmp_path / "results.csv.errors.csv")
    assert source == str(blank)
    assert reason.startswith("no tissue found: no tile of the 16x16 grid at 0.5 um/px reaches --min-tissue 0.5 "
                             "(the tissue detection); nothing scored; see the mask")
    assert reason.endswith(str(mask_png))
    assert not np.asarray(Image.open(mask_png)).any()
    out_text = capsys.readouterr().out
    assert f"{blank}: no tissue found" in out_text
    assert out_text.strip().splitlines()[-1].startswith("1 inputs recorded as errors")


@pytest.mark.parametrize("target", ["1e6", "0.001"])
def test_an_mpp_target_the_pyramid_cannot_serve_is_an_error_at_once(triton_server, corrupt_slide, tmp_path, capsys,
                                                                    target):
    slide, _ = corrupt_slide
    assert _score(triton_server, slide, "--out", tmp_path / "r.parquet", "--mpp-target", target) == 2
    err = capsys.readouterr().err
    assert f"--mpp-target {float(target):g}: {slide} can serve 0.4762 to 16 um/px (level 0 is 0.5 um/px" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
