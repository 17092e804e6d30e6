"""``patchserve score``: score folders, manifests, HDF5 files and whole slides against Triton."""

from __future__ import annotations

import argparse

from serving.client_config import CLIENT_TTA_MODES, PROTOCOLS


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Score patches against a Triton server and stream the rows to Parquet or CSV.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="class-folder tree, image folder, CSV manifest, PCam HDF5 file, whole-slide image, "
                        "folder of slides or slide manifest (CSV: slide[,roi][,mpp])")
    p.add_argument("--url", action="append", required=True, metavar="HOST:PORT",
                   help="server address (gRPC port unless --protocol http); repeat to spread work across servers")
    p.add_argument("--model", required=True, help="name of the served classifier")
    p.add_argument("--out", required=True,
                   help="output file, .parquet or .csv (with --scheduler/--workers: a Parquet dataset folder)")
    p.add_argument("--protocol", default="grpc", choices=PROTOCOLS)
    p.add_argument("--tta", default="none", choices=CLIENT_TTA_MODES,
                   help="views averaged per patch on the client, or 'server' for the server-side TTA model")
    p.add_argument("--send", default="pixels", choices=("pixels", "encoded"),
                   help="'encoded' ships the files' bytes to the ensemble (image files only)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per request (default: the server's max)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight per server")
    p.add_argument("--split", default=None, help="train, val or test, for inputs with split folders or a split column")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="start over when OUT (or its unfinished OUT.parts) exists; without it and without "
                        "--resume such a job is refused, so finished work is never deleted by accident")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                   help="continue an interrupted job from OUT.parts")
    p.add_argument("--timeout-s", type=float, default=60.0)
    p.add_argument("--retries", type=int, default=3)
    p.add_argument("--backoff-s", type=float, default=0.5)
    p.add_argument("--wait", action=argparse.BooleanOptionalAction, default=False,
                   help="when the server goes away mid-job, keep retrying until it is back (restarts) instead of "
                        "stopping with the finished parts kept for --resume")
    p.add_argument("--wait-timeout-s", type=float, default=600.0, help="how long --wait waits for the server")
    p.add_argument("--shared-memory", action=argparse.BooleanOptionalAction, default=False,
                   help="pass tensors through system shared memory (client and server on one host)")
    p.add_argument("--read-threads", type=int, default=2)
    p.add_argument("--part-rows", type=int, default=4096, help="rows per output part")
    p.add_argument("--stop-after-parts", type=int, default=None,
                   help="stop after writing this many parts (chunked runs; continue with --resume)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    d = p.add_argument_group("Dask (past one client machine; without these flags the job runs in this process)")
    d.add_argument("--scheduler", default=None, metavar="tcp://HOST:PORT",
                   help="run the job on this existing Dask cluster (dask-jobqueue, dask-kubernetes, dask scheduler); "
                        "every worker must see the inputs and OUT at the same paths")
    d.add_argument("--workers", type=int, default=None, metavar="N",
                   help="start a local Dask cluster of N worker processes on this machine")
    d.add_argument("--unit-patches", type=int, default=1024,
                   help="patches per unit of work for folders, manifests and HDF5 (a slide is one unit)")
    d.add_argument("--threads-per-worker", type=int, default=2,
                   help="units scored at once by each --workers process (each thread keeps its own connections)")
    s = p.add_argument_group("whole slides")
    s.add_argument("--mpp-target", type=float, default=None, help="microns per pixel to tile at (default: level 0)")
    s.add_argument("--level", type=int, default=None, help="tile at this pyramid level instead of --mpp-target")
    s.add_argument("--mpp", type=float, default=None, help="level-0 microns per pixel when the slide records none")
    s.add_argument("--stride", type=int, default=None, help="tile stride in target pixels (default: the patch size)")
    s.add_argument("--overlap", type=int, default=0, help="tile overlap in target pixels (instead of --stride)")
    s.add_argument("--min-tissue", type=float, default=0.5, help="minimum tissue fraction of a tile")
    s.add_argument("--tissue-mask", default=None, help="PNG tissue mask (non-zero = tissue) instead of Otsu")
    s.add_argument("--heatmap-class", default=None, help="class drawn in the heatmap (default: the last class)")
    return p


def main(args: argparse.Namespace) -> int:
    from serving.score import ScoreConfig, run_score
    from serving.slides import TilingConfig

    tiling = TilingConfig(mpp_target=args.mpp_target, level=args.level, stride=args.stride, overlap=args.overlap,
                          min_tissue=args.min_tissue, tissue_mask=args.tissue_mask, mpp=args.mpp)
    cfg = ScoreConfig(inputs=tuple(args.inputs), urls=tuple(args.url), model=args.model, out=args.out,
                      protocol=args.protocol, tta=args.tta, send=args.send, batch_size=args.batch_size,
                      concurrency=args.concurrency, split=args.split, resume=args.resume, overwrite=args.overwrite, timeout_s=args.timeout_s,
                      retries=args.retries, backoff_s=args.backoff_s, wait=args.wait,
                      wait_timeout_s=args.wait_timeout_s, shared_memory=args.shared_memory,
                      read_threads=args.read_threads, part_rows=args.part_rows,
                      stop_after_parts=args.stop_after_parts, tiling=tiling, heatmap_class=args.heatmap_class,
                      progress=args.progress)
    if args.scheduler is not None or args.workers is not None:
        from serving.dask_score import DistributedConfig, run_dask_score

        dcfg = DistributedConfig(scheduler=args.scheduler, workers=args.workers, unit_patches=args.unit_patches,
                                 threads_per_worker=args.threads_per_worker)
        result = run_dask_score(cfg, dcfg)
    else:
        result = run_score(cfg)
    if result.stopped:
        return 3
    for path in (*result.heatmaps, *result.geojsons):
        print(f"wrote {path}")
    return 0
