"""Loader throughput on equal work: the training DALI pipeline against a
torchvision DataLoader (PIL) with the same operations, the same parameters,
the same interpolation (one flag, ``--interpolation``, for both arms), the
same worker count and the same files, on PNG and on JPEG. Arms interleaved.

Target: DALI at least 2.0x the DataLoader.

The colour operation is the same on both arms: DALI's ``fn.color_twist``
(brightness, contrast, saturation, hue as one 3x3 matrix in YIQ plus an
offset) and, in the DataLoader, :class:`ColorTwist`, that same matrix applied
in torch. torchvision's ``ColorJitter`` does something else (four separate
passes in random order, hue through HSV), which is why it is not used here.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import Target, bar_plot, interleave, ratio_target, timing_row, write_results

ARM_PREFETCH_DEPTH = 2  # the DALI arm's; training keeps its own (training/pipeline.py)
AUGMENT = dict(hflip_prob=0.5, vflip_prob=0.5, rotation_deg=20.0, brightness=0.1, contrast=0.1,
               saturation=0.1, hue=0.02, scale_min=0.5)
INTERPOLATIONS = ("nearest", "linear")
DEFAULT_INTERPOLATION = "nearest"  # torchvision RandomRotation's default

# RGB <-> YIQ, the colour space of DALI's color_twist hue rotation and saturation.
_RGB2YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.321), (0.211, -0.523, 0.311))


def twist_matrix(brightness: float, contrast: float, saturation: float, hue_deg: float):
    """(3x3 matrix, offset) of DALI's color_twist: hue rotation and saturation in YIQ, then contrast
    about mid-grey and brightness, so ``out = M @ rgb + offset``."""
    import numpy as np

    t = np.array(_RGB2YIQ)
    c, s = math.cos(math.radians(hue_deg)), math.sin(math.radians(hue_deg))
    hue_sat = np.array([[1, 0, 0], [0, c * saturation, -s * saturation], [0, s * saturation, c * saturation]])
    m = brightness * contrast * (np.linalg.inv(t) @ hue_sat @ t)
    offset = brightness * (1.0 - contrast) * 128.0
    return m.astype(np.float32), float(offset)


class ColorTwist:
    """DALI's color_twist in torch on a CHW uint8 tensor, factors drawn as the DALI arm draws them."""

    def __init__(self, brightness: float, contrast: float, saturation: float, hue: float):
        self.b, self.c, self.s, self.h = brightness, contrast, saturation, hue

    def __call__(self, img):
        import random

        import torch

        m, offset = twist_matrix(random.uniform(1 - self.b, 1 + self.b), random.uniform(1 - self.c, 1 + self.c),
                                 random.uniform(1 - self.s, 1 + self.s), random.uniform(-self.h, self.h) * 360.0)
        out = torch.einsum("ij,jhw->ihw", torch.from_numpy(m), img.float()) + offset
        return out.round_().clamp_(0, 255).to(torch.uint8)


def op_lists(augment: dict, interpolation: str, size: int) -> tuple[list[str], list[str]]:
    """The operations of each arm, in order, for the side-by-side table."""
    a = augment
    crop = f"area {a['scale_min']}-1, ratio 3/4-4/3, to {size}x{size}, {interpolation}"
    dali = ["fn.decoders.image (CPU)", f"fn.resize with a random ROI ({crop})",
            f"fn.flip (h {a['hflip_prob']}, v {a['vflip_prob']})",
            f"fn.rotate (+-{a['rotation_deg']} deg, {interpolation}, fill 255)",
            f"fn.color_twist (b {a['brightness']}, c {a['contrast']}, s {a['saturation']}, h {a['hue']})"]
    tv = ["PIL Image.open + convert('RGB')", f"RandomResizedCrop ({crop})",
          f"RandomHorizontalFlip {a['hflip_prob']} + RandomVerticalFlip {a['vflip_prob']}",
          f"RandomRotation (+-{a['rotation_deg']} deg, {interpolation}, fill 255)",
          "ColorTwist: fn.color_twist's matrix in torch (same factors)"]
    return dali, tv


def torchvision_loader(samples, size: int, batch_size: int, workers: int, augment: dict | None = None,
                       interpolation: str = DEFAULT_INTERPOLATION):
    """The users' notebook loader with the DALI arm's operations: PIL decode + torchvision, uint8 NHWC."""
    import torch
    from PIL import Image
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    a = {**AUGMENT, **(augment or {})}
    interp = InterpolationMode.NEAREST if interpolation == "nearest" else InterpolationMode.BILINEAR
    tf = transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(a["scale_min"], 1.0), ratio=(3 / 4, 4 / 3), interpolation=interp),
        transforms.RandomHorizontalFlip(a["hflip_prob"]),
        transforms.RandomVerticalFlip(a["vflip_prob"]),
        transforms.RandomRotation(a["rotation_deg"], interpolation=interp, fill=255),
        transforms.PILToTensor(),
        ColorTwist(a["brightness"], a["contrast"], a["saturation"], a["hue"]),
    ])

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return len(samples)

        def __getitem__(self, i):
            s = samples[i]
            with Image.open(s.source) as img:
                return tf(img.convert("RGB")).permute(1, 2, 0), s.label

    return torch.utils.data.DataLoader(Files(), batch_size=batch_size, shuffle=True, num_workers=workers,
                                       persistent_workers=workers > 0, drop_last=False)


def dali_epochs(samples, size: int, batch: int, threads: int, augment: dict, interpolation: str,
                prefetch_queue_depth: int | None = None):
    """An epoch function over one DALI pipeline built once and reset per epoch, as training does."""
    from training.pipeline import PREFETCH_DEPTH, AugmentConfig, TrainLoader

    loader = TrainLoader(samples, input_hw=(size, size), augment=AugmentConfig(**augment, interpolation=interpolation),
                         batch_size=batch, num_threads=threads,
                         prefetch_queue_depth=prefetch_queue_depth or PREFETCH_DEPTH)
    epoch = [0]

    def run_epoch() -> int:
        epoch[0] += 1
        count = 0
        for images, _ in loader.epoch(samples, seed=epoch[0]):
            count += images.shape[0]
        return count

    return run_epoch


def _torch_epochs(loader):
    def run_epoch() -> int:
        return sum(images.shape[0] for images, _ in loader)

    return run_epoch


def run(quick: bool, command: str, out: Path, interpolation: str = DEFAULT_INTERPOLATION) -> dict:
    from serving.inputs.datasets import discover
    from serving.synth.dataset import synthesize
    from training.pipeline import PREFETCH_DEPTH, dali_batch

    cores = os.cpu_count() or 1
    # One more than the cores for each loader: DALI's threads wait at each operator's end of batch (the cores
    # were 81-82% busy with as many threads as cores), and depth 2 with cores + 1 threads was the fastest
    # DALI setting of the sweep below in every run here; the DataLoader gets as many workers.
    workers, depth = cores + 1, ARM_PREFETCH_DEPTH
    size, batch = 96, 64
    per_class = 500 if quick else 2000
    repeats = 5 if quick else 9
    rows, timings, targets, summary = [], [], [], []
    sweep_rows = []
    dali_ops, tv_ops = op_lists(AUGMENT, interpolation, size)
    print("  DALI arm                                       | DataLoader arm")
    for d, t in zip(dali_ops, tv_ops):
        print(f"  {d:46s} | {t}")
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("png", "jpg"):
            data = Path(tmp) / fmt
            synthesize(data, classes=2, per_class=per_class, size=size, fmt=fmt, seed=0)
            samples = discover(data, split="train").samples
            loader = torchvision_loader(samples, size, batch, workers, AUGMENT, interpolation)
            arms = {f"DALI {fmt}": dali_epochs(samples, size, batch, workers, AUGMENT, interpolation,
                                               prefetch_queue_depth=depth),
                    f"DataLoader {fmt}": _torch_epochs(loader)}
            got = interleave(arms, items=len(samples), warmup=1, repeats=repeats)
            del loader
            for t in got.values():
                rows.append(timing_row(t, loader=t.name, images=t.items))
                timings.append(t.to_dict())
                print(f"  {t.name:16s} {t.rate:8.1f} images/s (min {t.rate_min:.1f}, max {t.rate_max:.1f})")
            target = ratio_target(f"DALI / DataLoader, {fmt}, equal work ({interpolation})", got[f"DALI {fmt}"],
                                  got[f"DataLoader {fmt}"], 2.0)
            targets.append(target)
            summary.append({"what": f"DALI / DataLoader, equal work ({interpolation}), 96 px {fmt.upper()}",
                            "ratio": f"{target.ratio:.2f} ({target.low:.2f}-{target.high:.2f})",
                            "target": f">= 2.0, {'met' if target.met else 'missed'}"})
            if fmt == "png":
                # Prefetch depth and threads of the DALI arm, interleaved: how the arm's were chosen.
                configs = {(depth, threads): dali_epochs(samples, size, batch, threads, AUGMENT, interpolation,
                                                         prefetch_queue_depth=depth)
                           for depth in (1, 2) for threads in sorted({1, cores, cores + 1})}
                swept = interleave({f"depth {d}, {t} threads": fn for (d, t), fn in configs.items()},
                                   items=len(samples), warmup=1, repeats=3 if quick else 5)
                for name, t in swept.items():
                    sweep_rows.append(timing_row(t, loader=f"DALI png, {name}", images=t.items))
                    print(f"  DALI png {name:20s} {t.rate:8.1f} images/s")
    rows += sweep_rows
    best = max(sweep_rows, key=lambda r: r["images/s"])
    notes = [f"{workers} workers each (DALI num_threads, DataLoader num_workers: the cores + 1), DALI prefetch depth "
             f"{depth}, batch {batch}, {size}x{size} "
             f"patches, {interpolation} interpolation on both arms; one epoch per repeat, arms interleaved; "
             "as in training, the DALI pipeline is built once and reset per epoch, and runs "
             f"{dali_batch(batch)} images a batch, handed out {batch} at a time "
             f"(training/pipeline.py DALI_MIN_BATCH: the fewer images a DALI batch, the longer its threads wait "
             "for each other between operators).",
             f"Prefetch depth and threads swept on PNG (last rows): fastest here was {best['loader']}; "
             f"training uses prefetch depth {PREFETCH_DEPTH} and as many threads as `--workers`.",
             "Colour: DALI's fn.color_twist and the DataLoader's ColorTwist apply the same 3x3 YIQ matrix and "
             "offset (torchvision's ColorJitter would be four passes and an HSV round trip: other work)."]
    for fmt in ("png", "jpg"):
        dali = next(t for t in timings if t["name"] == f"DALI {fmt}")
        torch_arm = next(t for t in timings if t["name"] == f"DataLoader {fmt}")
        if dali["cpu_per_item"] and torch_arm["cpu_per_item"]:
            use = {k: statistics.median(t["cpu_seconds"]) / (t["median_s"] * cores) for k, t in
                   (("dali", dali), ("torch", torch_arm))}
            notes.append(
                f"CPU per image, {fmt} (busy seconds of the whole machine, /proc/stat, median): DALI "
                f"{dali['cpu_per_item'] * 1e3:.2f} ms, DataLoader {torch_arm['cpu_per_item'] * 1e3:.2f} ms; the "
                f"{cores} cores were {use['dali']:.0%} busy under DALI and {use['torch']:.0%} under the DataLoader. "
                f"With both arms on all cores, DALI / DataLoader can reach at most the ratio of CPU per image, "
                f"{torch_arm['cpu_per_item'] / dali['cpu_per_item']:.2f}: that is what bounds it on this machine.")
            # How near DALI comes to that ceiling: the ratio of medians over the ratio of CPU per image.
            ceiling = torch_arm["cpu_per_item"] / dali["cpu_per_item"]
            measured = next(t for t in targets if t.name.startswith(f"DALI / DataLoader, {fmt},"))
            share = Target(f"DALI / DataLoader, {fmt}: share of its CPU-per-image ceiling ({ceiling:.2f})",
                           measured.ratio / ceiling, 0.9)
            targets.append(share)
            summary.append({"what": f"DALI / DataLoader, 96 px {fmt.upper()}: share of the CPU-per-image ceiling "
                                    f"{ceiling:.2f}", "ratio": f"{share.ratio:.2f}",
                            "target": f">= 0.9, {'met' if share.met else 'missed'}"})

    def plot(png: Path) -> None:
        bar_plot(png, [r["loader"] for r in rows], [r["images/s"] for r in rows],
                 title=f"Loader throughput, equal work ({interpolation})", xlabel="images/s (median)",
                 errors=[(r["min"], r["max"]) for r in rows])

    write_results("data", out=out, command=command + (f" --interpolation {interpolation}"),
                  rows=rows, columns=["loader", "images", "images/s", "min", "max"], targets=targets, notes=notes,
                  payload={"timings": timings, "interpolation": interpolation,
                           "tables": [{"columns": ["DALI arm", "DataLoader arm"],
                                       "rows": [[d, t] for d, t in zip(dali_ops, tv_ops)]}]},
                  quick=quick, plot=plot, summary=summary)
    return {"rows": rows, "targets": [t.to_dict() for t in targets]}
