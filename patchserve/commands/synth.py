"""``patchserve synth OUT``: write a deterministic synthetic dataset (and slide)."""

from __future__ import annotations

import argparse
from pathlib import Path


def get_args_parser() -> argparse.ArgumentParser:
    from serving.synth.dataset import DEFAULT_OVERLAP, FORMATS, MAX_CLASSES

    p = argparse.ArgumentParser(
        description="Write deterministic synthetic H&E-like patches as class folders (train/val/test and a "
                    "stain-shifted test_shifted), a CSV manifest, PatchCamelyon-style HDF5 files and optionally "
                    "a pyramidal whole-slide image with ground-truth masks.")
    p.add_argument("out", type=Path, help="output folder (must be empty unless --overwrite)")
    p.add_argument("--classes", type=int, default=2,
                   help=f"number of classes, 2..{MAX_CLASSES} (2: normal/tumour; more: colorectal tissue types)")
    p.add_argument("--per-class", type=int, default=60,
                   help="images of the largest class, over train+val+test (at least 3)")
    p.add_argument("--imbalance", type=float, default=1.0,
                   help="ratio of the largest (first) class to the smallest, >= 1 (3: the chest X-ray study's 3:1)")
    p.add_argument("--overlap", type=float, default=DEFAULT_OVERLAP,
                   help="how far patches stray towards another class's morphology and stain, 0..1 "
                        "(0: classes apart, a model reaches 1.0)")
    p.add_argument("--label-noise", type=float, default=0.0,
                   help="share of train/val images filed under a wrong class, 0..0.5 (synth.json lists them)")
    p.add_argument("--size", type=int, default=64, help="patch side in pixels, 16..1024")
    p.add_argument("--format", dest="fmt", default="png", help=f"image format: {', '.join(FORMATS)}")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    p.add_argument("--slide", action=argparse.BooleanOptionalAction, default=False,
                   help="also write slides/slide_0.tiff with tumour and tissue masks")
    p.add_argument("--slide-size", type=int, default=4096, help="slide level-0 width in pixels (height is 3/4)")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="replace the synthetic data already in OUT (other files are kept)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show progress bars")
    return p


def main(args: argparse.Namespace) -> int:
    from serving.synth.dataset import synthesize

    s = synthesize(args.out, classes=args.classes, per_class=args.per_class, imbalance=args.imbalance,
                   size=args.size, fmt=args.fmt, seed=args.seed, slide=args.slide, slide_size=args.slide_size,
                   overwrite=args.overwrite, overlap=args.overlap, label_noise=args.label_noise,
                   progress=args.progress)
    width = max(len(c) for c in s.class_names)
    print(f"wrote {len(s.files)} files to {s.out} ({args.size}x{args.size} {args.fmt}, seed {args.seed})")
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
