"""Options of a scoring job (``patchserve score``): one frozen dataclass, the command line generated from it.

Every field means the same on both executors (this process, or Dask with
``--workers`` / ``--scheduler``), except ``--stop-after-parts``, which only
this process honours (a Dask job is stopped by stopping it, and resumed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from serving.client.config import CLIENT_TTA_MODES, PROTOCOLS, SEND_MODES, check_send, check_tta, check_url
from serving.core.errors import FlagError, InputError
from serving.core.imageio import DEFAULT_MAX_IMAGE_PIXELS
from serving.core.options import option
from serving.inputs.datasets import SPLITS
from serving.jobs.dask_config import DaskConfig
from serving.jobs.output import check_output
from serving.slides.tiling import TilingConfig


@dataclass(frozen=True)
class ScoreConfig:
    """Everything ``patchserve score`` was asked to do; flags map one to one."""

    inputs: tuple[str, ...] = option(
        help="class-folder tree, image folder, CSV manifest, PCam HDF5 file, whole-slide image, folder of slides "
             "or slide manifest (CSV: slide[,roi][,mpp])",
        positional=True, metavar="INPUT")
    urls: tuple[str, ...] = option(
        help="server address (gRPC port unless --protocol http); repeat to spread work across servers",
        flag="--url", repeat=True, metavar="HOST:PORT")
    model: str = option(help="name of the served classifier")
    out: str = option(help="output file, .parquet or .csv, in this process and on Dask alike")
    protocol: str = option("grpc", "protocol to the servers", choices=PROTOCOLS)
    tta: str = option("none", "views averaged per patch on the client, or 'server' for the server-side TTA model",
                      choices=CLIENT_TTA_MODES)
    send: str = option("pixels", "'encoded' ships the files' bytes to the ensemble (image files only)",
                       choices=SEND_MODES)
    features: bool = option(False, "ask the server for the model's features output too (alone, for a "
                                   "features-only model): a fixed-size float32 list column 'features' in OUT "
                                   "(Parquet only), and per slide OUT-stem.SLIDE.features.h5 in the layout CLAM "
                                   "and TRIDENT read; part of the job's fingerprint")
    batch_size: int | None = option(None, "rows per request", default_text="the server's max batch size")
    concurrency: int = option(4, "requests in flight per server, from each unit being scored")
    split: str | None = option(None, "split to score, for inputs with split folders or a split column",
                               choices=SPLITS, default_text="every row, when the input has no splits")
    resume: bool = option(False, "continue an interrupted job from OUT.parts, in this process or on Dask; refused "
                                 "(exit 2, nothing changed) when the model, its weights, the options or the inputs "
                                 "differ from OUT.job.json")
    overwrite: bool = option(False, "start over when OUT (or its unfinished OUT.parts) exists; without it and "
                                    "without --resume such a job is refused, so finished work is never deleted by "
                                    "accident; never while another job holds OUT.lock")
    timeout_s: float = option(60.0, "seconds to wait for one request")
    retries: int = option(3, "retries of a failed request, with capped backoff")
    backoff_s: float = option(0.5, "first retry delay in seconds, doubled per retry")
    wait: bool = option(False, "when the server goes away mid-job, keep retrying until it is back (restarts) "
                               "instead of stopping with the finished parts kept for --resume")
    wait_timeout_s: float = option(600.0, "how long --wait waits for the server")
    shared_memory: bool = option(False, "pass tensors through system shared memory (client and server on one host)")
    read_threads: int = option(2, "threads reading and decoding the inputs of each unit being scored")
    unit_patches: int = option(1024, "patches per unit of work for folders, manifests and HDF5 (a slide is one "
                                     "unit); part of the job's fingerprint")
    units_in_flight: int = option(2, "units scored at once in this process, or in each --workers process (each "
                                     "keeps its own connections)", aliases=("--threads-per-worker",))
    part_rows: int = option(4096, "items per committed part within a unit (a slide's tiles are committed every "
                                  "this many); at most this many patches are rescored after a kill")
    stop_after_parts: int | None = option(None, "stop once this many parts are committed in this run (units in "
                                                "flight commit what they scored); continue with --resume; this "
                                                "process only", default_text="run to the end")
    tiling: TilingConfig = option(help="whole slides", default_factory=TilingConfig)
    heatmap_class: str | None = option(None, "class drawn in slide heatmaps", default_text="the last class")
    max_image_pixels: int = option(DEFAULT_MAX_IMAGE_PIXELS, "record an image whose header says width x height "
                                   "is larger as an error, undecoded (decompression bombs)")
    progress: bool = option(True, "progress bar")
    dask: DaskConfig = option(help="Dask, past one client machine (without --scheduler or --workers the job runs "
                                   "in this process)", default_factory=DaskConfig)

    def __post_init__(self) -> None:
        if not self.inputs:
            raise InputError("INPUT: give at least one folder, manifest, HDF5 file or slide")
        if not self.urls:
            raise InputError("--url: give at least one server as HOST:PORT")
        object.__setattr__(self, "urls", tuple(check_url(u) for u in self.urls))
        check_output(self.out)
        if self.features and Path(self.out).suffix.lower() != ".parquet":
            raise FlagError(f"--out {self.out}: --features writes a fixed-size float32 list column, which CSV "
                            "cannot hold; give --out NAME.parquet")
        if self.features and self.shared_memory:
            raise FlagError("--shared-memory: not with --features (the features travel inline); drop one of them")
        check_tta(self.tta)
        check_send(self.send, self.tta)
        # Any split folder of the tree (train, val, test, test_shifted...): a plain name, not a path.
        if self.split is not None and (not self.split or Path(self.split).name != self.split
                                       or self.split in (".", "..")):
            raise InputError(f"--split: expected the name of a split folder such as {', '.join(SPLITS)}, "
                             f"got {self.split!r}")
        if self.resume and self.overwrite:
            raise InputError("--resume and --overwrite: give one of them, not both")
        for name in ("read_threads", "part_rows", "unit_patches", "units_in_flight", "concurrency", "retries"):
            v = getattr(self, name)
            least = 0 if name == "retries" else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                what = "a non-negative" if least == 0 else "a positive"
                raise InputError(f"--{name.replace('_', '-')}: expected {what} integer, got {v!r}")
        if not self.wait_timeout_s > 0:
            raise InputError(f"--wait-timeout-s: expected a positive number of seconds, got {self.wait_timeout_s}")
        if isinstance(self.max_image_pixels, bool) or not isinstance(self.max_image_pixels, int) or \
                self.max_image_pixels < 1:
            raise InputError(f"--max-image-pixels: expected a positive integer, got {self.max_image_pixels!r}")
        if self.stop_after_parts is not None and self.stop_after_parts < 1:
            raise InputError(f"--stop-after-parts: expected a positive integer, got {self.stop_after_parts}")
        if self.stop_after_parts is not None and self.dask.enabled:
            raise FlagError("--stop-after-parts: this process only; a Dask job is stopped by stopping it "
                            "(Ctrl-C), and continued with --resume on either executor")

    def options(self) -> dict:
        """The scoring options that decide the rows (the fingerprint's ``options``)."""
        t = self.tiling
        # Only when asked for: a probabilities job keeps the fingerprint it had before features existed.
        features = {"features": True} if self.features else {}
        return {**features, "tta": self.tta, "send": self.send, "split": self.split, "unit_patches": self.unit_patches,
                "mpp_target": t.mpp_target, "level": t.level, "stride": t.stride, "overlap": t.overlap,
                "min_tissue": t.min_tissue, "mpp": t.mpp,
                "tissue_mask": str(Path(t.tissue_mask).resolve()) if t.tissue_mask else None}
