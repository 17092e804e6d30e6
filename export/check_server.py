"""check-export's server stage: load the python flavours into the real embedded
Triton server and compare its answers with ONNX Runtime (and DALI) in-process."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from export import triton_config as tc
from export.check_report import FAIL, OK, CheckRow
from export.onnx_export import ort_session
from serving.errors import PatchserveError

# The python flavour runs the same ONNX file with the same runtime: only
# batching and thread scheduling differ, which moves float sums by ~1e-7.
SERVER_ATOL = 1e-5


def _smooth_png(spec, seed: int) -> bytes:
    from export.build import _smooth_images, encode

    return encode(_smooth_images(spec, seed + 1)[seed], "PNG")


def _infer(client, model: str, name: str, array: np.ndarray, output: str) -> np.ndarray:
    import tritonclient.grpc as grpcclient

    tensor = grpcclient.InferInput(name, list(array.shape), "UINT8")
    tensor.set_data_from_numpy(array)
    result = client.infer(model, [tensor], outputs=[grpcclient.InferRequestedOutput(output)])
    return result.as_numpy(output)


def _link_repo(repo: Path, needs: list[dict], workdir: Path) -> Path:
    """A repository of links to the checked models (and the steps of a checked ensemble)."""
    linked = workdir / "repo"
    linked.mkdir()
    names = {n["name"] for n in needs}
    for need in needs:
        if need["role"] == "ensemble":
            names |= {s.model_name for s in need["config"].ensemble_scheduling.step}
    for name in sorted(names):
        if (repo / name).is_dir():
            (linked / name).symlink_to((repo / name).resolve(), target_is_directory=True)
    return linked


def _expected(need: dict, inputs: np.ndarray, sessions: dict, repo: Path) -> np.ndarray:
    spec, role = need["spec"], need["role"]
    if role in ("classifier", "tta"):
        return sessions[need["name"]].run([spec.output_name], {spec.input_name: inputs})[0]
    from export.preprocess import run_serialized

    dali = need["version_dir"] / tc.DALI_FILE if role == "preprocess" else None
    if role == "ensemble":
        pre = repo / spec.preprocess_model_name
        versions = sorted((int(p.name) for p in pre.iterdir() if p.name.isdigit()), reverse=True)
        dali = pre / str(versions[0]) / tc.DALI_FILE
    pixels = np.stack(run_serialized(dali, list(inputs), input_name=spec.encoded_name,
                                     batch_size=spec.max_batch_size))
    if role == "preprocess":
        return pixels
    cls = sessions.get(spec.name) or ort_session(_onnx_of(repo, spec.name))
    return cls.run([spec.output_name], {spec.input_name: pixels})[0]


def _onnx_of(repo: Path, name: str) -> Path:
    folder = repo / name
    versions = sorted((int(p.name) for p in folder.iterdir() if p.name.isdigit()), reverse=True)
    return folder / str(versions[0]) / tc.ONNX_FILE


def _inputs(need: dict, batch: int) -> tuple[str, np.ndarray]:
    spec, role = need["spec"], need["role"]
    if role in ("preprocess", "ensemble"):
        row = np.frombuffer(_smooth_png(spec, 0), dtype=np.uint8)
        return spec.encoded_name, np.repeat(row[None], batch, axis=0)
    dims = [d for d in need["config"].input[0].dims]
    rng = np.random.default_rng(batch)
    return spec.input_name, rng.integers(0, 256, size=(batch, *dims), dtype=np.uint8)


def server_rows(repo: Path, needs: list[dict]) -> list[CheckRow]:
    """Start the embedded server on the checked models; infer at batch 1 and at the max batch."""
    import tritonclient.grpc as grpcclient

    from serving.server import EmbeddedTriton

    rows = []
    sessions = {n["name"]: ort_session(n["onnx"]) for n in needs if n.get("onnx")}
    with tempfile.TemporaryDirectory(prefix="patchserve-check-") as tmp:
        linked = _link_repo(repo, needs, Path(tmp))
        try:
            server = EmbeddedTriton(linked, workdir=Path(tmp) / "work", startup_timeout_s=180).start()
        except PatchserveError as exc:
            return [CheckRow("server", "*", FAIL, f"the embedded Triton server did not load the repository: {exc}")]
        try:
            client = grpcclient.InferenceServerClient(server.urls.grpc)
            rows.append(CheckRow("server", "*", OK, f"embedded Triton loaded {len(list(linked.iterdir()))} models"))
            for need in needs:
                rows.append(_serve_one(client, need, sessions, repo))
            client.close()
        finally:
            server.close()
    return rows


def _serve_one(client, need: dict, sessions: dict, repo: Path) -> CheckRow:
    name, spec = need["name"], need["spec"]
    try:
        if not client.is_model_ready(name):
            return CheckRow("serve", name, FAIL, "not ready on the server")
        worst = 0.0
        for batch in sorted({1, need["config"].max_batch_size}):
            in_name, x = _inputs(need, batch)
            out_name = spec.input_name if need["role"] == "preprocess" else spec.output_name
            got = _infer(client, name, in_name, x, out_name)
            want = _expected(need, x, sessions, repo)
            if got.shape != want.shape:
                return CheckRow("serve", name, FAIL, f"batch {batch}: server shape {got.shape}, expected {want.shape}")
            worst = max(worst, float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max()))
        if worst > SERVER_ATOL:
            return CheckRow("serve", name, FAIL, f"server vs in-process max |diff| {worst:.3g} > {SERVER_ATOL}")
        return CheckRow("serve", name, OK, f"batch 1 and {need['config'].max_batch_size}: max |diff| {worst:.2g}")
    except Exception as exc:  # noqa: BLE001 - report the model, check the others
        return CheckRow("serve", name, FAIL, f"{type(exc).__name__}: {str(exc)[:300]}")
