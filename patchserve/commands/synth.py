"""``patchserve synth OUT``: write a deterministic synthetic dataset (and slide).

The data's options are the fields of :class:`serving.synth.dataset.SynthConfig`;
the parser is generated from them.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from serving.options import add_options, from_args
from serving.synth.dataset import SynthConfig


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Write deterministic synthetic H&E-like patches as class folders (train/val/test and a "
                    "stain-shifted test_shifted), a CSV manifest, PatchCamelyon-style HDF5 files and optionally "
                    "a pyramidal whole-slide image with ground-truth masks.")
    p.add_argument("out", type=Path, help="output folder (must be empty unless --overwrite)")
    add_options(p, SynthConfig)
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="replace the synthetic data already in OUT (other files are kept) (default: off)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="show progress bars (default: on)")
    return p


def main(args: argparse.Namespace) -> int:
    from serving.synth.dataset import synthesize

    cfg = from_args(SynthConfig, args)
    s = synthesize(args.out, overwrite=args.overwrite, progress=args.progress, **dataclasses.asdict(cfg))
    width = max(len(c) for c in s.class_names)
    print(f"wrote {len(s.files)} files to {s.out} ({cfg.size}x{cfg.size} {cfg.fmt}, seed {cfg.seed})")
    print(f"  {'split':<13}" + " ".join(f"{c:>{width}}" for c in s.class_names) + "  total")
    for split, per in s.counts.items():
        print(f"  {split:<13}" + " ".join(f"{per[c]:>{width}}" for c in s.class_names) + f"  {s.total(split):>5}")
    print(f"  manifest      {s.manifest}")
    print(f"  hdf5          {s.hdf5['train'][0].parent}/{{{','.join(s.hdf5)}}}_{{x,y}}.h5")
    if s.slide is not None:
        print(f"  slide         {s.slide}")
        print(f"  masks         {s.slide_mask} (tumour), {s.slide_tissue_mask} (tissue), {s.slide_mask_json}")
    print(f"  description   {s.info}")
    return 0
