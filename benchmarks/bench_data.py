"""Loader throughput: the training DALI pipeline against a torchvision
DataLoader (PIL) with the same augmentations, the same worker count and the
same files, on PNG and on JPEG. Target: DALI at least 2.5x the DataLoader.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from benchmarks.common import Target, bar_plot, measure, write_results

AUGMENT = dict(hflip_prob=0.5, vflip_prob=0.5, rotation_deg=20.0, brightness=0.1, contrast=0.1,
               saturation=0.1, hue=0.02, scale_min=0.5)


def torchvision_loader(samples, size: int, batch_size: int, workers: int, augment: dict | None = None):
    """The users' notebook loader: PIL decode + torchvision transforms, uint8 NHWC batches."""
    import torch
    from PIL import Image
    from torchvision import transforms

    a = {**AUGMENT, **(augment or {})}
    tf = transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(a["scale_min"], 1.0), ratio=(3 / 4, 4 / 3)),
        transforms.RandomHorizontalFlip(a["hflip_prob"]),
        transforms.RandomVerticalFlip(a["vflip_prob"]),
        transforms.RandomRotation(a["rotation_deg"], fill=255),
        transforms.ColorJitter(a["brightness"], a["contrast"], a["saturation"], a["hue"]),
        transforms.PILToTensor(),
    ])

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return len(samples)

        def __getitem__(self, i):
            s = samples[i]
            with Image.open(s.source) as img:
                return tf(img.convert("RGB")).permute(1, 2, 0), s.label

    return torch.utils.data.DataLoader(Files(), batch_size=batch_size, shuffle=True, num_workers=workers,
                                       persistent_workers=True, drop_last=False)


def run(quick: bool, command: str) -> dict:
    from serving.sources import discover
    from training.pipeline import AugmentConfig, build_train_pipeline, iterate
    from serving.synth.dataset import synthesize

    workers = os.cpu_count() or 1
    size, batch = 96, 64
    # Epochs long enough that building the DALI pipeline (once per epoch, as
    # training does) is not what is measured.
    per_class = 500 if quick else 2000
    repeats = 3 if quick else 5
    variants = {"full": AUGMENT, "no rotation": {**AUGMENT, "rotation_deg": 0.0}}
    rows, timings, targets = [], [], []
    ratios: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("png", "jpg"):
            out = Path(tmp) / fmt
            synthesize(out, classes=2, per_class=per_class, size=size, fmt=fmt, seed=0)
            samples = discover(out, split="train").samples
            n = len(samples)
            for variant, aug in variants.items():
                def dali_epoch(samples=samples, aug=aug):
                    pipe = build_train_pipeline(samples, input_hw=(size, size), augment=AugmentConfig(**aug),
                                                batch_size=batch, num_threads=workers, seed=0)
                    pipe.build()
                    count = 0
                    for images, _ in iterate(pipe, samples):
                        assert images.shape[1:] == (size, size, 3)
                        count += images.shape[0]
                    return count

                loader = torchvision_loader(samples, size, batch, workers, aug)

                def torch_epoch(loader=loader):
                    count = 0
                    for images, _ in loader:
                        count += images.shape[0]
                    return count

                t_dali = measure(f"DALI {fmt}, {variant}", dali_epoch, items=n, repeats=repeats)
                t_torch = measure(f"DataLoader {fmt}, {variant}", torch_epoch, items=n, repeats=repeats)
                del loader
                for t in (t_dali, t_torch):
                    rows.append({"loader": t.name, "images": t.items, "images/s": t.rate, "min": t.rate_min,
                                 "max": t.rate_max})
                    timings.append(t.to_dict())
                    print(f"  {t.name:28s} {t.rate:8.1f} images/s (min {t.rate_min:.1f}, max {t.rate_max:.1f})")
                ratios[(fmt, variant)] = t_dali.rate / t_torch.rate
            targets.append(Target(f"DALI / DataLoader, {fmt}, full augmentation", ratios[(fmt, "full")], 2.5))
    notes = [f"{workers} workers each (DALI num_threads, DataLoader num_workers), batch {batch}, {size}x{size} "
             "patches; full augmentation: random resized crop (area 0.5-1), flips, rotation 20 degrees with white "
             "fill, colour jitter; one epoch per repeat, DALI pipeline built anew per epoch as training does.",
             "Without rotation DALI / DataLoader is " + ", ".join(
                 f"{ratios[(f, 'no rotation')]:.2f} ({f})" for f in ("png", "jpg")) +
             ": DALI's CPU rotation (fn.rotate; fn.warp_affine measured the same) costs about half its "
             "throughput, while PIL's rotate is cheap. On the CPU that is what keeps DALI under the 2.5x target; "
             "its GPU operators (mixed decoding, GPU warp) are where the margin is, and no GPU was lent here."]

    def plot(png: Path) -> None:
        bar_plot(png, [r["loader"] for r in rows], [r["images/s"] for r in rows], title="Loader throughput",
                 xlabel="images/s (median)", errors=[(r["min"], r["max"]) for r in rows])

    write_results("data", command=command, rows=rows, columns=["loader", "images", "images/s", "min", "max"],
                  targets=targets, notes=notes, payload={"timings": timings}, quick=quick, plot=plot)
    return {"rows": rows, "targets": [t.to_dict() for t in targets]}


if __name__ == "__main__":
    import sys

    quick = "--quick" in sys.argv
    run(quick=quick, command="python -m benchmarks.bench_data" + (" --quick" if quick else ""))
