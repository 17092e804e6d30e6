"""Bad and odd images in training (scan + DALI) and evaluation: listed and skipped, or decoded as serving does.

Already covered: training refuses bad files without --skip-bad, RGBA is
converted once into the run cache (test_train_data.py); empty class folder and
a single class are data errors naming them (test_train_data.py).
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from tests.fixtures_train import small_train_config
from tests.unit.test_bad_input_decode import RNG_IMAGE, jpeg_bytes, png_header_only

BAD = {"v_zero.png": "empty file (0 bytes)", "w_cut.jpg": "truncated or corrupt image",
       "x_text.png": "not an image file", "y_huge.png": "image too large"}


@pytest.fixture(scope="module")
def odd_tree(tmp_path_factory):
    """normal/ and tumour/ with four plain PNGs each, odd-but-valid files and broken ones."""
    root = tmp_path_factory.mktemp("odd_tree")
    rng = np.random.default_rng(1)
    for cls in ("normal", "tumour"):
        (root / cls).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / cls / f"plain_{i}.png")
    n, t = root / "normal", root / "tumour"
    Image.fromarray(RNG_IMAGE).save(n / "a_rgb.png")
    (n / "a_png_named.jpg").write_bytes((n / "a_rgb.png").read_bytes())
    Image.fromarray(RNG_IMAGE[:, :, 0]).save(n / "b_grey.png")
    Image.fromarray(np.dstack([RNG_IMAGE, np.full((40, 40), 255, np.uint8)]), "RGBA").save(n / "c_rgba.png")
    Image.fromarray(RNG_IMAGE).convert("P", palette=Image.ADAPTIVE).save(t / "d_palette.png")
    Image.fromarray(RNG_IMAGE[:, :, 1].astype(np.uint16) * 257).save(t / "e_16bit.png")
    Image.fromarray(RNG_IMAGE[:6, :6]).save(t / "g_tiny.png")
    (n / "v_zero.png").write_bytes(b"")
    (n / "w_cut.jpg").write_bytes(jpeg_bytes()[:600])
    (t / "x_text.png").write_bytes(b"not pixels\n")
    (t / "y_huge.png").write_bytes(png_header_only(45_000, 45_000))
    return root


GOOD = 8 + 7  # plain files + odd-but-valid ones


def _bad_list(path) -> dict[str, str]:
    with open(path, newline="") as fh:
        return {r["path"].rsplit("/", 1)[-1]: r["reason"] for r in csv.DictReader(fh)}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_scan_skips_broken_files_and_dali_decodes_the_rest_like_serving(odd_tree, tmp_path):
    from serving.core.imageio import load_rgb_u8
    from serving.inputs.datasets import discover
    from training.pipeline import build_eval_pipeline, iterate
    from training.scan import scan_samples

    scan = scan_samples(discover(odd_tree).samples, tmp_path / "cache", progress=False)
    assert sorted(p.rsplit("/", 1)[-1] for p, _ in scan.bad) == sorted(BAD)
    for p, why in scan.bad:
        assert why.startswith(BAD[p.rsplit("/", 1)[-1]]), (p, why)
    assert (len(scan.samples), scan.converted) == (GOOD, 3)  # RGBA, palette and 16-bit go through the cache
    from serving.core.spec import ModelSpec

    spec = ModelSpec(name="odd", class_names=("a", "b"), input_height=40, input_width=40, mean=(0.5,) * 3,
                     std=(0.25,) * 3)
    pipe = build_eval_pipeline(scan.samples, spec=spec, batch_size=GOOD, num_threads=1)
    (images, _), = list(iterate(pipe, scan.samples))
    assert tuple(images.shape) == (GOOD, 40, 40, 3)
    at = {o.rsplit("/", 1)[-1]: i for i, o in enumerate(scan.origins)}
    decoded = images.numpy()
    # DALI reads the PNG named .jpg by its content: the same pixels as the PNG, and as serving decodes them.
    np.testing.assert_array_equal(decoded[at["a_png_named.jpg"]], decoded[at["a_rgb.png"]])
    np.testing.assert_array_equal(decoded[at["a_rgb.png"]], RNG_IMAGE)
    for name in ("b_grey.png", "c_rgba.png", "e_16bit.png"):
        np.testing.assert_array_equal(decoded[at[name]], load_rgb_u8(next(odd_tree.rglob(name))))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_training_with_skip_bad_trains_on_the_rest_and_lists_what_it_skipped(odd_tree, tmp_path, capsys):
    import torch

    from training.train import train

    torch.set_num_threads(1)
    result = train(small_train_config(odd_tree, tmp_path / "run", val_fraction=0.5, skip_bad=True))
    said = capsys.readouterr().out
    assert (f"--skip-bad: left out {len(BAD)} unusable image file(s), all listed in "
            f"{tmp_path / 'run' / 'bad_files.csv'}:") in said
    for name in BAD:
        assert name in said
    assert len(result.history) == 1
    assert result.history[0]["train_samples"] + result.history[0]["val_samples"] == GOOD
    assert sorted(_bad_list(tmp_path / "run" / "bad_files.csv")) == sorted(BAD)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_evaluate_lists_broken_files_and_scores_every_other_image(random_run, odd_tree, tmp_path):
    from training.evaluate import evaluate_run

    r = evaluate_run(random_run, odd_tree, tmp_path / "eval", batch_size=8, workers=1, device="cpu",
                     dali_device="cpu", progress=False)
    assert r.metrics["num_samples"] == GOOD and len(r.paths) == GOOD
    assert not {p.rsplit("/", 1)[-1] for p in r.paths} & set(BAD)
    assert sorted(_bad_list(tmp_path / "eval" / "bad_files.csv")) == sorted(BAD)
