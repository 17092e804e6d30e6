"""What stain normalisation inside the model costs: served throughput of the
same resnet18 without it, with Macenko and with Reinhard (one repository, one
Triton server, the arms interleaved), and the same three graphs in process
(ONNX Runtime), as ratios to the unnormalised model measured in one run.

The targets are fitted to synthetic H&E patches (no download, no slide
needed); the patches sent are H&E too, so the normaliser does its work rather
than passing background through (it computes both branches either way).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import interleave, write_results

SIZE, BATCH, REQUESTS_FULL, REQUESTS_QUICK = 96, 32, 24, 8
METHODS = ("macenko", "reinhard")


def _patches(n: int, size: int, seed: int) -> np.ndarray:
    from serving.synth.dataset import make_patch

    rng = np.random.default_rng(seed)
    return np.stack([make_patch(rng, i % 2, size) for i in range(n)])


def _export(folder: Path):
    """The three models in one repository: name -> spec."""
    from export.build import export_run
    from serving.core.spec import ModelSpec
    from training.checkpoint import write_random_run
    from training.stain_norm import fit_target

    target = list(_patches(64, SIZE, seed=1))
    specs = {}
    for method in (None, *METHODS):
        name = f"stain_{method or 'none'}"
        spec = ModelSpec(name=name, class_names=("normal", "tumour"), input_height=SIZE, input_width=SIZE,
                         mean=(0.7, 0.55, 0.7), std=(0.15, 0.2, 0.15), max_batch_size=BATCH,
                         stain_normalization=fit_target(target, method) if method else None)
        run = write_random_run(folder / f"run_{name}", spec)
        export_run(run, folder / "repo", formats=("python",), with_tta=False, with_dali=False,
                   overwrite=True)
        specs[name] = spec
    return folder / "repo", specs


def run(quick: bool, command: str, out: Path) -> dict:
    from benchmarks.common import ratio_target
    from export.onnx_export import ort_session
    from serving.client.patch_client import PatchClient
    from serving.server.embedded import EmbeddedTriton

    cores = os.cpu_count() or 1
    requests = REQUESTS_QUICK if quick else REQUESTS_FULL
    images = _patches(BATCH, SIZE, seed=2)
    rows, targets, results = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        repo, specs = _export(Path(tmp))
        sessions = {n: ort_session(repo / n / "1" / "model.onnx", threads=cores) for n in specs}

        def local(name):
            def go():
                for _ in range(requests):
                    sessions[name].run(None, {specs[name].input_name: images})
            return go

        in_process = interleave({n: local(n) for n in specs}, items=BATCH * requests, repeats=3 if quick else 5,
                                unit="patches/s")
        with EmbeddedTriton(repo) as server:
            clients = {n: PatchClient(server.urls.grpc, n, concurrency=4) for n in specs}
            try:
                served = interleave({n: (lambda n=n: clients[n].predict(np.concatenate([images] * requests)))
                                     for n in specs}, items=BATCH * requests, repeats=3 if quick else 5,
                                    unit="patches/s")
            finally:
                for c in clients.values():
                    c.close()
    for path, timings in (("in-process ONNX Runtime", in_process), ("served, gRPC, 4 requests in flight", served)):
        base = timings["stain_none"]
        for name, t in timings.items():
            method = name.removeprefix("stain_")
            rows.append({"path": path, "normalisation": method, "patches/s": t.rate, "min": t.rate_min,
                         "max": t.rate_max, "/ none": t.rate / base.rate})
            results.append({**t.to_dict(), "path": path})
            print(f"  {path}, {method}: {t.rate:.1f} patches/s ({t.rate / base.rate:.2f} of none)")
            if method != "none":
                # No target in the issue: the ratio is what a user pays for the normalisation.
                targets.append(ratio_target(f"{path}: {method} / none", t, base, 0.0))
    notes = [f"resnet18 at {SIZE}x{SIZE}, random weights, batches of {BATCH}, {requests} per repeat; server: the "
             f"default export (one python-backend instance, batches sliced over {cores} workers of one ONNX Runtime "
             f"thread each), dynamic batching; in process: one session "
             f"with {cores} threads. Client and server share the machine's {cores} cores.",
             "The normaliser runs on the input size in float32 (Macenko: optical density, a 3 x 3 covariance and 40 "
             "power-iteration steps per eigenvector, two top-k percentiles of the angles and one of the "
             "concentrations; Reinhard: two colour-space conversions), so its share of the cost grows as the "
             "network shrinks."]

    def plot(png: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.8))
        paths = list(dict.fromkeys(r["path"] for r in rows))
        methods = ["none", *METHODS]
        for i, method in enumerate(methods):
            vals = [next(r["patches/s"] for r in rows if r["path"] == p and r["normalisation"] == method)
                    for p in paths]
            ax.bar([j + (i - 1) * 0.27 for j in range(len(paths))], vals, 0.27, label=method)
        ax.set_xticks(range(len(paths)), paths, fontsize=8)
        ax.set_ylabel("patches/s (median)")
        ax.set_title("resnet18 with and without stain normalisation inside the model")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(png, dpi=100)
        plt.close(fig)

    summary = [{"what": f"{t.name.replace('served, gRPC, 4 requests in flight', 'served')} throughput",
                "ratio": f"{t.ratio:.2f} ({t.low:.2f}-{t.high:.2f})", "target": ""} for t in targets]
    write_results("stain", out=out, summary=summary, command=command, rows=rows,
                  columns=["path", "normalisation", "patches/s", "min", "max", "/ none"], targets=[], notes=notes,
                  payload={"results": results, "ratios": [t.to_dict() for t in targets]}, quick=quick, plot=plot)
    return {"rows": rows, "ratios": [t.to_dict() for t in targets]}
