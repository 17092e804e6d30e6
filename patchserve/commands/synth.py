"""``patchserve synth OUT``: write a deterministic synthetic dataset (and slide).

Every flag is a field of :class:`serving.synth.dataset.SynthJob` or of its
:class:`SynthConfig`; the parser is generated from them.
"""

from __future__ import annotations

import argparse

from serving.core.options import add_options, from_args
from serving.synth.dataset import SynthJob


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Write deterministic synthetic H&E-like patches as class folders (train/val/test and a "
                    "stain-shifted test_shifted), a CSV manifest, PatchCamelyon-style HDF5 files and optionally "
                    "a pyramidal whole-slide image with ground-truth masks.")
    add_options(p, SynthJob)
    return p


def main(args: argparse.Namespace) -> int:
    job = from_args(SynthJob, args)
    cfg = job.data
    s = job.run()
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
